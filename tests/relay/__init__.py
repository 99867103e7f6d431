"""Tests of relay/, the untrusted router, its stores and clusters."""
