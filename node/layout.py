"""Where a node keeps what in its keystore: the namespaces (see node/node.py's docstring for the names)."""

from __future__ import annotations

# A peer engine's own records (protocol/peer.py names them).
from protocol.peer import NS_ARCHIVE as NS_ARCHIVE
from protocol.peer import NS_PEER as NS_PEER
from protocol.peer import NS_SEEN as NS_SEEN
from protocol.peer import NS_SESSION as NS_SESSION

NS_NODE = "node"
NS_BUNDLE = "bundle"
NS_OUTBOX = "outbox"
NS_INBOX = "inbox"


def last_seq(names: list[str]) -> int:
    """The highest sequence number among records named by 20-digit sequence numbers (0 if none)."""
    return int(names[-1]) if names else 0
