"""Helpers and fixtures of tests/node/test_rollback.py that other test modules use too."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from node.keystore import ARGON2_PROFILES, Keystore
from node.node import Node
from tests.support.pki import NOW


def reopen(path: Path, minutes: int) -> Node:
    """The node of the home at `path` again, `minutes` later (INITs made now are fresher than before)."""
    later = NOW + timedelta(minutes=minutes)
    return Node(Keystore.open(path, passphrase="test", argon2=ARGON2_PROFILES["test"]), clock=lambda: later)
