"""Fixtures for every room (pytest passes them by name; this file is never imported).

What they wrap lives in tests/support/ (the test PKI and its one "now" in tests/support/pki.py)."""

from __future__ import annotations

from datetime import datetime

import pytest

from protocol import handshake
from protocol.revocation import RevocationState
from tests.support.pki import ALICE, BOB, CA, MALLORY, NOW, ROGUE_CA, Ca, Node, Prekeys, establish, make_prekeys
from tests.support.softhsm import softhsm_token_fixture  # noqa: F401 - one session-wide SoftHSM token for every test module

# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def now() -> datetime:
    return NOW


@pytest.fixture(scope="session")
def ca() -> Ca:
    """The pinned test CA."""
    return CA


@pytest.fixture(scope="session")
def rogue_ca() -> Ca:
    """Another CA with the same name but its own key (nobody pins it)."""
    return ROGUE_CA


@pytest.fixture(scope="session")
def alice() -> Node:
    return ALICE


@pytest.fixture(scope="session")
def bob() -> Node:
    return BOB


@pytest.fixture(scope="session")
def mallory() -> Node:
    return MALLORY


@pytest.fixture
def crl_state(ca: Ca) -> RevocationState:
    """A fresh revocation state holding an empty CRL, fresh at NOW."""
    return ca.revocation()


@pytest.fixture
def bob_prekeys(bob: Node) -> Prekeys:
    """Bob's prekeys (HYBRID bundle, three one-time prekeys), fresh for each test."""
    return make_prekeys(bob)


@pytest.fixture
def alice_prekeys(alice: Node) -> Prekeys:
    """Alice's prekeys (HYBRID bundle, three one-time prekeys), fresh for each test."""
    return make_prekeys(alice)


@pytest.fixture
def established(ca: Ca, alice: Node, bob_prekeys: Prekeys) -> tuple[handshake.Initiated, handshake.Responded]:
    """A real HYBRID handshake alice -> bob (with a one-time prekey); message 0 is b"hello"."""
    return establish(ca, alice, bob_prekeys)
