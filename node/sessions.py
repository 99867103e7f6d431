"""The per-peer state a node keeps durable: the sessions held with each peer (current and archived,
protocol/peer.py), what it knows of each peer (`PeerRecord`), the ids of messages received from it,
and the rollback epoch committed with every fsynced session state (node/epoch.py).

Records: `session/<peer>`, `archive/<peer>`, `peer/<peer>`, `seen/<peer>:<msg id hex>`, `node/epoch`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from datetime import datetime

import msgpack
from cryptography import x509

from node.epoch import EpochFile, epoch_path
from node.journal import Journal, Key, succeeded
from node.keystore import Keystore
from node.layout import NS_ARCHIVE, NS_NODE, NS_PEER, NS_SEEN, NS_SESSION
from protocol import certs
from protocol.peer import Conversation
from protocol.session import Session

log = logging.getLogger("kmsnet.node")

#: Received message ids remembered per peer to tell a redelivery from a replay.
MAX_SEEN_PER_PEER = 5000
#: Earlier certificate serials remembered per peer identity key (renewals overlap by a few).
MAX_SERIALS = 16


@dataclass(frozen=True)
class PeerRecord:
    """What we know of a peer we have a session with."""

    name: str
    serial: int
    fingerprint: bytes
    identity: bytes
    state: str
    #: The peer's certificate (DER) the current session was made under: it ends at its notAfter,
    #: and an OCSP responder can be asked about it later.
    certificate: bytes
    #: Serials of the peer's earlier certificates for the same identity key (newest first): a CRL
    #: listing any of them ends the sessions too (PROTOCOL.md §10.5).
    serials: tuple[int, ...] = ()

    def pack(self) -> bytes:
        return msgpack.packb(
            [
                self.name,
                self.serial.to_bytes(20, "big"),
                self.fingerprint,
                self.identity,
                self.state,
                self.certificate,
                [s.to_bytes(20, "big") for s in self.serials],
            ]
        )

    @classmethod
    def unpack(cls, data: bytes) -> PeerRecord:
        name, serial, fp, identity, state, certificate, *rest = msgpack.unpackb(data)
        serials = tuple(int.from_bytes(s, "big") for s in rest[0]) if rest else ()  # none before the field existed
        return cls(name, int.from_bytes(serial, "big"), fp, identity, state, certificate, serials)

    @property
    def not_after(self) -> datetime:
        """When the certificate the current session was made under expires (and the session with it)."""
        return _not_after(self.certificate)


@functools.lru_cache(maxsize=256)
def _not_after(certificate: bytes) -> datetime:
    return x509.load_der_x509_certificate(certificate).not_valid_after_utc


class Sessions:
    """Every peer's sessions, record and received ids, loaded from the keystore on first use."""

    def __init__(self, keystore: Keystore, journal: Journal) -> None:
        self._keystore = keystore
        self._journal = journal
        self.conversations: dict[str, Conversation] = {}
        self._peers: dict[str, PeerRecord | None] = {}
        self._seen: dict[str, dict[bytes, None]] = {}
        # The rollback detector (node/epoch.py): the keystore's counter against the file's.
        self.epoch_file = EpochFile(epoch_path(keystore.path))
        held = keystore.get(NS_NODE, "epoch")
        self._epoch = int(held.decode()) if held is not None else 0
        #: The keystore is older than its epoch file: restored from a backup (see `drop_all`).
        self.rolled_back = self._epoch < self.epoch_file.read()
        self._epoch = max(self._epoch, self.epoch_file.read())

    def conversation(self, peer: str) -> Conversation:
        """The sessions held with `peer` (loaded from the keystore on first use)."""
        conversation = self.conversations.get(peer)
        if conversation is None:
            current = self._keystore.get(NS_SESSION, peer)
            archive = self._keystore.get(NS_ARCHIVE, peer)
            conversation = self.conversations[peer] = Conversation(
                Session.from_bytes(current) if current is not None else None,
                Conversation.archive_from_bytes(archive) if archive is not None else [],
            )
        return conversation

    def session(self, peer: str) -> Session | None:
        """The current session with `peer`, if any."""
        return self.conversation(peer).current

    def peer(self, name: str) -> PeerRecord | None:
        """What we know of `name`, if we ever had a session."""
        if name not in self._peers:
            packed = self._keystore.get(NS_PEER, name)
            self._peers[name] = PeerRecord.unpack(packed) if packed else None
        return self._peers[name]

    def peer_names(self) -> list[str]:
        """Every peer we ever had a session with."""
        return self._keystore.names(NS_PEER)

    def stage(self, peer: str, puts: dict[Key, bytes]) -> None:
        """Add the state of every session held with `peer` to a commit being prepared."""
        conversation = self.conversation(peer)
        if conversation.current is not None:
            puts[(NS_SESSION, peer)] = conversation.current.to_bytes()
        puts[(NS_ARCHIVE, peer)] = conversation.archive_bytes()

    def stage_peer(self, record: PeerRecord, puts: dict[Key, bytes]) -> None:
        """Add a peer record to a commit being prepared (and hold it from now on)."""
        puts[(NS_PEER, record.name)] = record.pack()
        self._peers[record.name] = record

    def note_peer(self, cert: certs.VerifiedCertificate, state: str, puts: dict[Key, bytes]) -> None:
        """Record the certificate a new session was made under (earlier serials of the same key kept)."""
        identity = cert.public_key.public_bytes_raw()
        previous = self.peer(cert.name)
        serials: tuple[int, ...] = ()
        if previous is not None and previous.identity == identity:
            # A renewal: the earlier certificates of this key still count for revocation.
            serials = tuple(s for s in dict.fromkeys((previous.serial, *previous.serials)) if s != cert.serial)
        record = PeerRecord(cert.name, cert.serial, cert.fingerprint, identity, state, cert.der, serials[:MAX_SERIALS])
        self.stage_peer(record, puts)

    def save(self, peer: str) -> asyncio.Future[None]:
        """Commit the sessions held with `peer`, fsynced (with the next rollback epoch)."""
        puts: dict[Key, bytes] = {}
        self.stage(peer, puts)
        return self.guard(peer, self.commit(puts))

    def commit(self, puts: dict[Key, bytes], deletes: list[Key] | None = None) -> asyncio.Future[None]:
        """Commit `puts` fsynced together with the next rollback epoch, which the epoch file then follows."""
        self._epoch += 1
        value = self._epoch
        puts[(NS_NODE, "epoch")] = str(value).encode()
        durable = self._journal.commit(puts, deletes or [], sync=True)
        durable.add_done_callback(lambda fut: self.epoch_file.advance(value) if succeeded(fut) else None)
        return durable

    def guard(self, peer: str, durable: asyncio.Future[None]) -> asyncio.Future[None]:
        """Forget the sessions held with `peer` in memory if the commit of their state fails: the next
        use reloads the last durable state. Encrypting on from a state that never reached the disk would,
        after a restart, send other plaintexts under message numbers that already left: the same (key, nonce)."""
        conversation = self.conversations.get(peer)

        def check(fut: asyncio.Future[None]) -> None:
            if not succeeded(fut) and self.conversations.get(peer) is conversation:
                del self.conversations[peer]
                log.error("session_not_saved", extra={"fields": {"peer": peer}})

        durable.add_done_callback(check)
        return durable

    def drop_all(self) -> list[str]:
        """The keystore is older than its epoch (restored from a backup): no session in it may encrypt
        again. Drop them all; returns the peers they were with (to start new ones with)."""
        peers = sorted(set(self._keystore.names(NS_SESSION)) | set(self._keystore.names(NS_ARCHIVE)))
        with self._keystore.transaction():
            for peer in peers:
                self._keystore.delete(NS_SESSION, peer)
                self._keystore.delete(NS_ARCHIVE, peer)
        self.conversations.clear()
        return peers

    def seen(self, peer: str) -> dict[bytes, None]:
        """The ids of messages received from `peer` (oldest first)."""
        seen = self._seen.get(peer)
        if seen is None:
            names = self._keystore.names(NS_SEEN, f"{peer}:")
            seen = self._seen[peer] = {bytes.fromhex(n.rsplit(":", 1)[1]): None for n in names}
        return seen

    def stage_seen(self, peer: str, msg_id: bytes, puts: dict[Key, bytes]) -> None:
        """Remember a received id (in a commit being prepared)."""
        puts[(NS_SEEN, f"{peer}:{msg_id.hex()}")] = b""
        self.seen(peer)[msg_id] = None

    def prune_seen(self, peer: str) -> list[Key]:
        """Forget the oldest remembered ids past twice the bound (an old id that comes back is refused
        by the ratchet anyway: it only tells a redelivery from a replay); the records to delete."""
        seen = self.seen(peer)
        if len(seen) <= MAX_SEEN_PER_PEER * 2:
            return []
        drop = list(seen)[: len(seen) - MAX_SEEN_PER_PEER]
        for msg_id in drop:
            del seen[msg_id]
        return [(NS_SEEN, f"{peer}:{m.hex()}") for m in drop]
