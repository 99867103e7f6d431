"""Colour for people on a terminal, never for a pipe, and never when NO_COLOR is set (no-color.org)."""

from __future__ import annotations

import os


def color(requested: bool | None = None) -> bool | None:
    """click's `color` argument: False when NO_COLOR is set (to anything but ""), else `requested`
    (None lets click colour a terminal only, False turns colour off)."""
    if os.environ.get("NO_COLOR"):
        return False
    return requested
