"""The conversation history: every message sent and received, sealed in the keystore, with its delivery state.

Keystore layout (namespace `history`, sealed like every record):

    history/<peer>:<seq 20 digits>:<in|out>:<message id hex>  →  [1, text, sent_at ms, state, reason or nil,
                                                                   attempts, updated ms]

The name carries everything an index needs (peer, order, direction, id), so the index is built
from the names alone, without unsealing a record. `seq` grows across all peers, so a peer's
records list in the order they were written. A sent message goes SENDING → STORED (the relay
holds it) → DELIVERED (the peer's receipt came, protocol/body.py), or FAILED with a reason; a
received one is RECEIVED. A state never goes back (a late "stored" after "delivered" is ignored),
except that a message reported failed whose receipt still comes is DELIVERED: that is the truth.

The history protects what it holds as the keystore does (AES-256-GCM under a key from the
passphrase): forward secrecy protects messages on the wire, not on a device whose keystore and
passphrase are taken. Hence the retention setting (`node/history_retention`, days; none kept:
forever) and `clear`.

Mutations that happen while the node runs (a send, a delivery, a receipt) are *staged* into the
commit the node is preparing (`puts`, `deletes`), so that a received message, its history record
and the session state reach the disk together. Mutations asked for by a person (`clear`,
`set_retention`) are written at once (`write_now`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

import msgpack

from node.errors import NodeError
from node.events import iso
from node.home import NS_NODE
from node.journal import Key
from node.keystore import Keystore

log = logging.getLogger("kmsnet.node")

NS_HISTORY = "history"
RETENTION_RECORD = "history_retention"
#: Records kept per peer; past it the oldest settled ones go (a pending message is kept until settled).
MAX_PER_PEER = 10_000
#: The newest this many records of a peer are what a chat shows on start.
SHOWN_ON_START = 200

Direction = Literal["in", "out"]


class State(StrEnum):
    """Delivery state of a history record (`history --json`'s `state`)."""

    SENDING = "sending"  # sealed and sent (or in the outbox); the relay has not said it holds it
    STORED = "stored"  # the relay holds it for the peer
    DELIVERED = "delivered"  # the peer's node committed it to its application (its receipt said so)
    FAILED = "failed"  # given up on: `reason` says why
    RECEIVED = "received"  # a message from the peer

    @property
    def pending(self) -> bool:
        """Sent, not yet receipted and not given up on."""
        return self in (State.SENDING, State.STORED)


# Forward only: a higher rank replaces a lower one (FAILED < DELIVERED: a late receipt is the truth).
_RANK = {State.SENDING: 0, State.STORED: 1, State.FAILED: 2, State.DELIVERED: 3, State.RECEIVED: 3}


class HistoryError(NodeError):
    """A history request that cannot be honoured (a bad retention value)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One message of a conversation. `sent_at`: seconds since the epoch (the sender's clock)."""

    msg_id: str
    peer: str
    direction: Direction
    text: str
    sent_at: float
    state: State
    reason: str | None = None
    #: Transmissions so far (a sent message re-sent after a retry request counts each).
    attempts: int = 1
    #: When the state last changed (seconds since the epoch, our clock).
    updated: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The `history --json` shape: one object per line."""
        record: dict[str, Any] = {
            "type": "history",
            "id": self.msg_id,
            "peer": self.peer,
            "direction": self.direction,
            "text": self.text,
            "sent_at": iso(self.sent_at),
            "state": self.state.value,
        }
        if self.direction == "out":
            record["attempts"] = self.attempts
        if self.reason is not None:
            record["reason"] = self.reason
        return record

    def pack(self) -> bytes:
        """The sealed record's value (peer, direction and id are in its name)."""
        return msgpack.packb(
            [1, self.text, round(self.sent_at * 1000), self.state.value, self.reason, self.attempts,
             round(self.updated * 1000)]
        )  # fmt: skip

    @classmethod
    def unpack(cls, name: str, value: bytes) -> Entry:
        """A record as written by `pack` under `name`."""
        peer, _, direction, msg_id = _parse_name(name)
        _, text, sent_at, state, reason, attempts, updated = msgpack.unpackb(value)
        return cls(msg_id, peer, direction, text, sent_at / 1000, State(state), reason, attempts, updated / 1000)

    def __repr__(self) -> str:  # never the text
        return f"Entry({self.direction} {self.peer} {self.msg_id[:8]} {self.state.value})"


def _parse_name(name: str) -> tuple[str, int, Direction, str]:
    peer, seq, direction, msg_id = name.split(":")
    return peer, int(seq), "in" if direction == "in" else "out", msg_id


class History:
    """The history of one node's keystore. One instance per process (it keeps an index of names)."""

    def __init__(self, keystore: Keystore, clock: Callable[[], datetime]) -> None:
        self.keystore = keystore
        self.clock = clock
        #: Called with each entry added or changed (the chat redraws its ✓ / ✓✓ from them).
        self.listeners: list[Callable[[Entry], None]] = []
        self._names: dict[tuple[str, Direction, str], str] | None = None
        self._out: dict[str, str] = {}  # message id → record name, for our own messages
        self._cache: dict[str, Entry] = {}  # record name → entry, as last staged or read
        self._seq = 0

    # --- the index ------------------------------------------------------------------------------------

    def _index(self) -> dict[tuple[str, Direction, str], str]:
        if self._names is None:
            self._names = {}
            for name in self.keystore.names(NS_HISTORY):
                self._remember(name)
            self.prune()
        return self._names

    def _remember(self, name: str) -> None:
        assert self._names is not None
        peer, seq, direction, msg_id = _parse_name(name)
        self._names[(peer, direction, msg_id)] = name
        if direction == "out":
            self._out[msg_id] = name
        self._seq = max(self._seq, seq)

    def _forget(self, name: str) -> None:
        assert self._names is not None
        peer, _, direction, msg_id = _parse_name(name)
        self._names.pop((peer, direction, msg_id), None)
        if direction == "out":
            self._out.pop(msg_id, None)
        self._cache.pop(name, None)

    def _entry(self, name: str) -> Entry | None:
        entry = self._cache.get(name)
        if entry is None:
            value = self.keystore.get(NS_HISTORY, name)
            if value is None:
                return None
            entry = self._cache[name] = Entry.unpack(name, value)
        return entry

    # --- what the node stages -------------------------------------------------------------------------

    def add(self, entry: Entry, puts: dict[Key, bytes]) -> None:
        """Stage a new record (the first send of a message, or a message received)."""
        self._index()
        self._seq += 1
        name = f"{entry.peer}:{self._seq:020d}:{entry.direction}:{entry.msg_id}"
        self._remember(name)
        stamped = replace(entry, updated=self._now())
        self._cache[name] = stamped
        puts[(NS_HISTORY, name)] = stamped.pack()
        self._tell(stamped)

    def sent(self, msg_id: str) -> Entry | None:
        """Our own message `msg_id` (hex), whoever it went to."""
        self._index()
        name = self._out.get(msg_id)
        return self._entry(name) if name is not None else None

    def has_received(self, peer: str, msg_id: str) -> bool:
        """Whether message `msg_id` from `peer` is in the history already (a re-sent copy is not shown twice)."""
        return (peer, "in", msg_id) in self._index()

    def mark(
        self,
        msg_id: str,
        state: State,
        puts: dict[Key, bytes],
        *,
        reason: str | None = None,
        peer: str | None = None,
        attempt: bool = False,
    ) -> Entry | None:
        """Move our message `msg_id` forward to `state` (staged); None if unknown or already past it.

        `peer`: only if the message went to this peer (a receipt counts only from its recipient).
        `attempt`: one more transmission (a re-send), whatever the state does.
        """
        entry = self.sent(msg_id)
        if entry is None or (peer is not None and entry.peer != peer):
            return None
        name = self._out[msg_id]
        forward = _RANK[state] > _RANK[entry.state]
        if not forward and not attempt:
            return None
        changed = replace(entry, attempts=entry.attempts + (1 if attempt else 0), updated=self._now())
        if forward:
            changed = replace(changed, state=state, reason=reason if state is State.FAILED else None)
        self._cache[name] = changed
        puts[(NS_HISTORY, name)] = changed.pack()
        self._tell(changed)
        return changed

    def pending(self) -> list[Entry]:
        """Our messages sent and neither receipted nor failed, oldest first (what may need re-sending)."""
        index = self._index()
        names = sorted((n for (_, d, _), n in index.items() if d == "out"), key=lambda n: _parse_name(n)[1])
        return [e for e in map(self._entry, names) if e is not None and e.state.pending]

    # --- what people read and ask for ---------------------------------------------------------------

    def peers(self) -> list[str]:
        """Every peer with a conversation in the history."""
        return sorted({peer for peer, _, _ in self._index()})

    def conversation(self, peer: str, limit: int | None = None) -> list[Entry]:
        """The messages exchanged with `peer`, oldest first; with `limit`, only the newest `limit`."""
        self._index()
        names = sorted(self.keystore.names(NS_HISTORY, f"{peer}:") + self._staged(peer))
        names = list(dict.fromkeys(names))
        if limit is not None:
            names = names[-limit:] if limit > 0 else []
        return [e for e in map(self._entry, names) if e is not None]

    def _staged(self, peer: str) -> list[str]:
        """Names staged in this process and perhaps not committed yet (the journal writes behind)."""
        return [n for n in self._cache if n.startswith(f"{peer}:")]

    @property
    def retention(self) -> timedelta | None:
        """How long records are kept (None: until cleared, up to MAX_PER_PEER per peer)."""
        value = self.keystore.get(NS_NODE, RETENTION_RECORD)
        return timedelta(days=int(value.decode())) if value is not None else None

    def set_retention(self, days: int | None) -> int:
        """Keep records `days` days (None: until cleared), applied at once; returns how many went."""
        if days is not None and days < 1:
            raise HistoryError("a retention is at least 1 day (to forget everything, clear the history)")
        with self.keystore.transaction():
            if days is None:
                self.keystore.delete(NS_NODE, RETENTION_RECORD)
            else:
                self.keystore.put(NS_NODE, RETENTION_RECORD, str(days).encode())
        self._index()
        return self.prune()

    def prune(self) -> int:
        """Delete what the retention and MAX_PER_PEER say is too old, at once (never a pending message);
        returns how many records went."""
        assert self._names is not None
        retention = self.retention
        cutoff = (self._now() - retention.total_seconds()) if retention is not None else None
        by_peer: dict[str, list[str]] = {}
        for (peer, _, _), name in self._names.items():
            by_peer.setdefault(peer, []).append(name)
        drop: list[str] = []
        for names in by_peer.values():
            names.sort(key=lambda n: _parse_name(n)[1])
            excess = len(names) - MAX_PER_PEER
            for i, name in enumerate(names):
                too_many = i < excess
                if not too_many and cutoff is None:
                    break  # oldest first: the rest are within the count, and no age limit is set
                entry = self._entry(name)
                if entry is None or entry.state.pending:
                    continue
                if too_many or (cutoff is not None and entry.updated < cutoff):
                    drop.append(name)
        self.write_now({}, [(NS_HISTORY, n) for n in drop])
        if drop:
            log.info("history_pruned", extra={"fields": {"records": len(drop)}})
        return len(drop)

    def clear(self, peer: str | None = None) -> int:
        """Delete every record (of `peer`, or of all), at once, and scrub the keystore's log; returns how many."""
        index = self._index()
        names = [n for (p, _, _), n in index.items() if peer is None or p == peer]
        self.write_now({}, [(NS_HISTORY, n) for n in names])
        self.keystore.scrub()
        return len(names)

    def write_now(self, puts: dict[Key, bytes], deletes: Iterable[Key]) -> None:
        """Apply a mutation to the keystore at once, in one transaction (not through a node's journal)."""
        deletes = list(deletes)
        if not puts and not deletes:
            return
        with self.keystore.transaction():
            for (ns, name), value in puts.items():
                self.keystore.put(ns, name, value)
            for ns, name in deletes:
                self.keystore.delete(ns, name)
        for ns, name in deletes:
            if ns == NS_HISTORY and self._names is not None:
                self._forget(name)

    def _now(self) -> float:
        return self.clock().timestamp()

    def _tell(self, entry: Entry) -> None:
        for listener in list(self.listeners):
            listener(entry)
