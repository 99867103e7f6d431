"""Old home of the keystore namespaces, kept only for modules not yet pointed at `node.home`, which owns them."""

from __future__ import annotations

from node.home import NS_ARCHIVE as NS_ARCHIVE
from node.home import NS_BUNDLE as NS_BUNDLE
from node.home import NS_INBOX as NS_INBOX
from node.home import NS_NODE as NS_NODE
from node.home import NS_OUTBOX as NS_OUTBOX
from node.home import NS_PEER as NS_PEER
from node.home import NS_SEEN as NS_SEEN
from node.home import NS_SESSION as NS_SESSION
from node.home import last_seq as last_seq
