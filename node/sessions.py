"""The per-peer engines a node holds (protocol/peer.py), restored from the keystore on first use,
and the rollback epoch committed with every fsynced session state (node/epoch.py).

Records: `session/<peer>`, `archive/<peer>`, `peer/<peer>`, `seen/<peer>:<msg id hex>` (the engine's,
protocol/peer.py), `node/epoch`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from node.epoch import EpochFile, epoch_path
from node.home import NS_ARCHIVE, NS_NODE, NS_PEER, NS_SEEN, NS_SESSION
from node.journal import Journal, Key, succeeded
from node.keystore import Keystore
from protocol.peer import Peer
from protocol.session import Session

log = logging.getLogger("kmsnet.node")


class Sessions:
    """Every peer's engine, and the commits that make their state durable."""

    def __init__(self, keystore: Keystore, journal: Journal) -> None:
        self._keystore = keystore
        self._journal = journal
        #: The engines loaded so far, by peer name.
        self.engines: dict[str, Peer] = {}
        # The rollback detector (node/epoch.py): the keystore's counter against the file's.
        self.epoch_file = EpochFile(epoch_path(keystore.path))
        held = keystore.get(NS_NODE, "epoch")
        self._epoch = int(held.decode()) if held is not None else 0
        #: The keystore is older than its epoch file: restored from a backup (see `drop_all`).
        self.rolled_back = self._epoch < self.epoch_file.read()
        self._epoch = max(self._epoch, self.epoch_file.read())

    @property
    def epoch(self) -> int:
        """The rollback epoch of the last commit (what the node signs for the relay to echo)."""
        return self._epoch

    def catch_up(self, epoch: int) -> None:
        """Take a newer epoch learnt elsewhere (the relay's echo, node/epochecho.py), so the next
        commit moves past it and a copy of the keystore from before that login reads as older."""
        self._epoch = max(self._epoch, epoch)

    def get(self, peer: str) -> Peer:
        """The engine for `peer` (restored from the keystore on first use)."""
        engine = self.engines.get(peer)
        if engine is None:
            seen = self._keystore.names(NS_SEEN, f"{peer}:")
            engine = self.engines[peer] = Peer.restore(
                peer,
                session=self._keystore.get(NS_SESSION, peer),
                archive=self._keystore.get(NS_ARCHIVE, peer),
                record=self._keystore.get(NS_PEER, peer),
                seen=(bytes.fromhex(n.rsplit(":", 1)[1]) for n in seen),
            )
        return engine

    def session(self, peer: str) -> Session | None:
        """The current session with `peer`, open or closed, if any."""
        return self.get(peer).conversation.current

    def peer_names(self) -> list[str]:
        """Every peer we ever had a session with."""
        return self._keystore.names(NS_PEER)

    def commit(self, puts: dict[Key, bytes], deletes: Sequence[Key] = ()) -> asyncio.Future[None]:
        """Commit `puts` fsynced together with the next rollback epoch, which the epoch file then follows."""
        self._epoch += 1
        value = self._epoch
        puts[(NS_NODE, "epoch")] = str(value).encode()
        durable = self._journal.commit(puts, deletes, sync=True)
        durable.add_done_callback(lambda fut: self.epoch_file.advance(value) if succeeded(fut) else None)
        return durable

    def guard(self, peer: str, durable: asyncio.Future[None]) -> asyncio.Future[None]:
        """Forget the engine of `peer` in memory if the commit of its state fails: the next use reloads
        the last durable state. Encrypting on from a state that never reached the disk would, after a
        restart, send other plaintexts under message numbers that already left: the same (key, nonce)."""
        engine = self.engines.get(peer)

        def check(fut: asyncio.Future[None]) -> None:
            if not succeeded(fut) and self.engines.get(peer) is engine:
                del self.engines[peer]
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
        self.engines.clear()
        return peers
