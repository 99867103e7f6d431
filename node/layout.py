"""Where a node keeps what in its keystore: the namespaces (see node/node.py's docstring for the names)."""

from __future__ import annotations

NS_NODE = "node"
NS_BUNDLE = "bundle"
NS_SESSION = "session"
NS_PEER = "peer"
NS_OUTBOX = "outbox"
NS_INBOX = "inbox"
NS_SEEN = "seen"
NS_ARCHIVE = "archive"


def last_seq(names: list[str]) -> int:
    """The highest sequence number among records named by 20-digit sequence numbers (0 if none)."""
    return int(names[-1]) if names else 0
