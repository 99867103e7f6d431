"""Tests of protocol/, the sans-I/O core."""
