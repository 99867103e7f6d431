"""The attack lab's door into a node: what malware on an unlocked device reads (PROTOCOL.md §12).

Hazardous by design, and for `scenarios/` only. A running node's live session (memory), its
newest published bundle, and the secrets in its unlocked keystore, read by name here rather than
by reaching into the node's private attributes or record layouts from another package; when the
node's insides move, this module (and its test) moves with them, not a scenario silently.
`protocol/hazmat.py` is the matching door into the protocol objects these return.
"""

from __future__ import annotations

from node.home import NS_NODE, NS_SESSION
from node.keystore import Keystore
from node.node import Node
from protocol.identity import IdentityKey
from protocol.messages import PrekeyBundle
from protocol.prekeys import PrekeySecrets
from protocol.session import Session


def live_session(node: Node, peer: str) -> Session | None:
    """The session with `peer` as it is in the node's memory right now (the object itself)."""
    return node._session(peer)


def current_bundle(node: Node) -> PrekeyBundle:
    """The newest prekey bundle the node published."""
    return node._current_bundle()


def stored_identity(keystore: Keystore) -> IdentityKey:
    """The identity private key in an unlocked keystore (a software key; a token key is not there)."""
    raw = keystore.get(NS_NODE, "identity")
    if raw is None:
        raise LookupError("no identity key in this keystore")
    return IdentityKey.from_private_bytes(raw)


def stored_prekeys(keystore: Keystore) -> PrekeySecrets:
    """The private prekeys in an unlocked keystore (none before the node first started)."""
    raw = keystore.get(NS_NODE, "prekeys")
    return PrekeySecrets.from_bytes(raw) if raw is not None else PrekeySecrets()


def stored_sessions(keystore: Keystore) -> dict[str, Session]:
    """Every current session in an unlocked keystore, by peer, as last made durable."""
    sessions = {}
    for peer in keystore.names(NS_SESSION):
        state = keystore.get(NS_SESSION, peer)
        if state is not None:
            sessions[peer] = Session.from_bytes(state)
    return sessions
