"""One module per scenario; `scenarios.registry` imports them in PRODUCT.md's order."""
