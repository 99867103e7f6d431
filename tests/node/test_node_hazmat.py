"""node.hazmat: the attack lab's reads of an unlocked keystore, against records the node's own codecs wrote."""

from __future__ import annotations

from typing import Any

import pytest

from node import hazmat
from node.home import NS_NODE, NS_SESSION
from node.keystore import Keystore
from protocol.identity import IdentityKey


def test_an_empty_keystore_holds_no_identity_no_prekeys_no_sessions() -> None:
    keystore = Keystore.memory()
    with pytest.raises(LookupError, match="no identity key"):
        hazmat.stored_identity(keystore)
    assert hazmat.stored_prekeys(keystore).signed_ids() == []
    assert hazmat.stored_sessions(keystore) == {}


def test_records_read_back_as_the_objects_the_node_stored(established: Any, bob_prekeys: Any) -> None:
    keystore = Keystore.memory()
    identity = IdentityKey.generate()
    session = established[0].session
    with keystore.transaction():
        keystore.put(NS_NODE, "identity", identity.private_bytes())
        keystore.put(NS_NODE, "prekeys", bob_prekeys.secrets.to_bytes())
        keystore.put(NS_SESSION, "bob", session.to_bytes())
    assert hazmat.stored_identity(keystore).public_bytes == identity.public_bytes
    assert hazmat.stored_prekeys(keystore).signed_ids() == bob_prekeys.secrets.signed_ids()
    (name, stored), *_ = hazmat.stored_sessions(keystore).items()
    assert (name, stored.transcript, stored.peer) == ("bob", session.transcript, session.peer)
