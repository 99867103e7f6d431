"""Where the relay keeps what must survive a crash: envelopes, prekey bundles, the CRL feed.

`Store` is the interface; `SqliteStore` is the default for one relay: SQLite in WAL mode with
`synchronous=FULL`, so an envelope the relay has acknowledged to its sender is on disk.
(`relay.redis_store.RedisStore` is the one for several relays.) Writes from many connections
are grouped (`relay.batching`): every queued write runs in one transaction, on the store's own
thread, in one hop, and each caller resumes once *its* write is committed. (aiosqlite hops
threads per statement, which defeats batching; the store therefore drives the stdlib `sqlite3`
on a single dedicated thread itself.)
"""

from __future__ import annotations

import asyncio
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from protocol.messages import OneTimePrekey
from relay.batching import BatchWriter, Settle
from relay.errors import QuotaExceeded, StoreUnavailable, StoreWriteRefused

#: Most envelopes waiting for one recipient.
DEFAULT_MAX_PENDING = 10_000
#: Most bytes waiting for one recipient.
DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024
#: Most envelopes, and bytes, one sender may have waiting for one recipient: its share of the
#: mailbox, so that no one sender can fill it and lock the others out.
DEFAULT_MAX_PENDING_PER_SENDER = 2_500
DEFAULT_MAX_PENDING_BYTES_PER_SENDER = 16 * 1024 * 1024
#: Envelopes older than this are purged undelivered (seconds).
DEFAULT_MAX_AGE = 7 * 24 * 3600
#: Most one-time prekeys stored per node.
MAX_ONETIME_STORED = 1000

T = TypeVar("T")

#: What `Store.take_bundle` hands back: the signed bundle (an encoded BUNDLE frame without a one-time
#: prekey), the one-time prekey taken for this fetch if any was left, and how many are left.
TakenBundle = tuple[bytes, OneTimePrekey | None, int]


def pack_onetime(prekey: OneTimePrekey) -> bytes:
    """A one-time prekey as every store keeps it: msgpack [key_id, public, signature].

    The one format of a stored one-time prekey, shared by `SqliteStore` and `RedisStore`; callers
    of a store see `OneTimePrekey` values only."""
    return bytes(msgpack.packb([prekey.key_id, prekey.public, prekey.signature]))


def unpack_onetime(stored: bytes) -> OneTimePrekey:
    """The one-time prekey `pack_onetime` stored."""
    key_id, public, signature = msgpack.unpackb(stored)
    return OneTimePrekey(int(key_id), bytes(public), bytes(signature))


@dataclass(frozen=True, slots=True)
class Envelope:
    """An opaque end-to-end payload on its way from `sender` to `recipient`."""

    seq: int
    msg_id: bytes
    sender: str
    recipient: str
    payload: bytes
    stored_at: int  # milliseconds since the epoch

    def __repr__(self) -> str:
        return f"Envelope(#{self.seq} {self.msg_id.hex()[:8]}, {self.sender}->{self.recipient}, {len(self.payload)} B)"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-recipient mailbox bounds, and each sender's share of a mailbox."""

    max_pending: int = DEFAULT_MAX_PENDING
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    max_pending_per_sender: int = DEFAULT_MAX_PENDING_PER_SENDER
    max_pending_bytes_per_sender: int = DEFAULT_MAX_PENDING_BYTES_PER_SENDER
    max_age: float = DEFAULT_MAX_AGE


def share_full(sender: str, recipient: str, limit: str) -> str:
    """The words of a QuotaExceeded for a sender's full share of a mailbox (both stores say it)."""
    return f"{sender}'s share of the mailbox of {recipient} is full ({limit}): others may still write"


class Store(ABC):
    """The relay's durable state. Every method is safe to call from many tasks at once."""

    limits: Limits

    @abstractmethod
    async def open(self) -> None:
        """Open or create the store."""

    @abstractmethod
    async def close(self) -> None:
        """Finish queued writes and close."""

    @abstractmethod
    def put_nowait(
        self, msg_id: bytes, sender: str, recipient: str, payload: bytes, stored_at: int
    ) -> tuple[Envelope | None, asyncio.Future[None]]:
        """Queue an envelope for storage; the future completes once it is durable (only then may
        the sender be told), or fails with QuotaExceeded or StoreUnavailable.

        The envelope returned is the one to push to its recipient from memory at once, while it is
        being written; None when there is nothing to push: a retransmission of one still stored
        (the future is then already done), or a store that announces what it stored itself (Redis:
        every relay hears of it through the cluster bus). A store that knows the quota is exceeded
        without asking may raise QuotaExceeded at once."""

    @abstractmethod
    async def flush(self) -> None:
        """Wait until every write queued so far is committed (readers then see it)."""

    @abstractmethod
    async def pending(self, recipient: str, after: int = 0, limit: int = 256) -> list[Envelope]:
        """Envelopes waiting for `recipient` with a sequence number above `after`, oldest first."""

    @abstractmethod
    def delete_nowait(self, recipient: str, msg_id: bytes) -> asyncio.Future[bool]:
        """Queue the deletion of an envelope the recipient acknowledged: the future completes once
        it is committed, False if there was none."""

    @abstractmethod
    async def purge_expired(self, now_ms: int) -> int:
        """Drop envelopes past the age limit; the number dropped."""

    @abstractmethod
    async def put_bundle(self, name: str, bundle: bytes, onetime: Sequence[OneTimePrekey], replace: bool) -> None:
        """Store a node's signed bundle and (add or replace) its one-time prekeys."""

    @abstractmethod
    async def note_identity(self, name: str, identity: bytes) -> bool:
        """Record the identity key `name` logged in with; if another one was recorded, drop the
        one-time prekeys stored for it (signed under the old key, useless to initiators). True if
        that happened."""

    @abstractmethod
    async def swap_epoch(self, name: str, epoch: bytes | None) -> bytes | None:
        """The signed rollback epoch `name` gave at its previous login (opaque), replaced by `epoch`
        (kept as it is when None)."""

    @abstractmethod
    async def take_bundle(self, name: str) -> TakenBundle | None:
        """The bundle of `name`, one one-time prekey (removed as it is handed out), and how many are left."""

    @abstractmethod
    async def onetime_left(self, name: str) -> int:
        """One-time prekeys of `name` still to hand out."""

    @abstractmethod
    async def known(self, name: str) -> bool:
        """Whether `name` ever published a bundle here (a routable recipient)."""

    @abstractmethod
    async def put_crl(self, number: int, der: bytes) -> bool:
        """Keep the newest CRL for the feed; False (and nothing stored) if one with a higher
        number is held already: the feed never goes back, whichever relay is asked."""

    @abstractmethod
    async def get_crl(self) -> tuple[int, bytes] | None:
        """The newest CRL held, with its number."""

    @abstractmethod
    async def waiting(self, recipient: str) -> int:
        """Envelopes waiting for `recipient`."""

    async def healthy(self) -> bool:
        """Whether the store answers now (for /healthz)."""
        return True


_SCHEMA = """
CREATE TABLE IF NOT EXISTS envelopes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id BLOB NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    payload BLOB NOT NULL,
    stored_at INTEGER NOT NULL,
    UNIQUE (sender, msg_id)
);
CREATE INDEX IF NOT EXISTS envelopes_by_recipient ON envelopes (recipient, seq);
CREATE TABLE IF NOT EXISTS bundles (name TEXT PRIMARY KEY, bundle BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS onetime (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, prekey BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS onetime_by_name ON onetime (name, seq);
CREATE TABLE IF NOT EXISTS identities (name TEXT PRIMARY KEY, identity BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS epochs (name TEXT PRIMARY KEY, epoch BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS crl (id INTEGER PRIMARY KEY CHECK (id = 1), number TEXT NOT NULL, der BLOB NOT NULL);
"""

_Op = Callable[[sqlite3.Connection], Any]


class SqliteStore(Store):
    """The default store: one SQLite file, WAL, synchronous=FULL, grouped commits."""

    def __init__(self, path: str | Path, limits: Limits | None = None) -> None:
        self.path = str(path)
        self.limits = limits or Limits()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="relay-store")
        self._db: sqlite3.Connection | None = None
        self._writer: BatchWriter[_Op] = BatchWriter(self._commit, "relay-store-writer")
        # Mailbox sizes live in memory so that a quota check costs no query.
        self._count: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        #: The same per (recipient, sender): each sender's share.
        self._share: dict[tuple[str, str], list[int]] = {}
        self._known: set[str] = set()
        # Sequence numbers are handed out here, before the commit, so that an online recipient
        # can be sent an envelope while it is still being written; (sender, msg_id) of what is
        # stored, to recognise a retransmission without a query.
        self._seq = 0
        self._stored: set[tuple[str, bytes]] = set()

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def open(self) -> None:
        def setup() -> None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            for recipient, sender, count, size in db.execute(
                "SELECT recipient, sender, COUNT(*), SUM(LENGTH(payload)) FROM envelopes GROUP BY recipient, sender"
            ):
                self._count[recipient] = self._count.get(recipient, 0) + count
                self._bytes[recipient] = self._bytes.get(recipient, 0) + (size or 0)
                self._share[(recipient, sender)] = [count, size or 0]
            self._known.update(name for (name,) in db.execute("SELECT name FROM bundles"))
            self._stored.update(db.execute("SELECT sender, msg_id FROM envelopes"))
            (top,) = db.execute("SELECT MAX(seq) FROM envelopes").fetchone()
            (counter,) = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'envelopes'").fetchone() or (0,)
            self._seq = max(top or 0, counter or 0)
            self._db = db

        try:
            await self._run(setup)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open store {self.path}: {exc}") from exc
        self._writer.start()

    async def close(self) -> None:
        await self._writer.close()
        if self._db is not None:
            db, self._db = self._db, None
            await self._run(db.close)
        self._thread.shutdown(wait=True)

    def _batch(self, ops: list[_Op]) -> list[tuple[Any, BaseException | None]]:
        """Run `ops` in one transaction on the store thread: one fsync for all of them."""
        db = self._db
        assert db is not None
        results: list[tuple[Any, BaseException | None]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for op in ops:
                try:
                    results.append((op(db), None))
                except sqlite3.IntegrityError as exc:
                    # SQLite backs out only the failing statement (ON CONFLICT ABORT): a retransmitted
                    # msg_id is refused without sinking the rest of the batch.
                    results.append((None, exc))
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
                # Disk or database full, file read-only: SQLite's own words ("database or disk is
                # full"), for the sender's ERROR and the log; the next write tries again.
                raise StoreWriteRefused(f"the relay's store refuses writes ({exc})") from exc
            raise
        return results

    async def _commit(self, ops: list[_Op]) -> list[tuple[Any, BaseException | None]]:
        return await self._run(lambda: self._batch(ops))

    def _queue(self, op: _Op, settle: Settle | None = None) -> asyncio.Future[Any]:
        return self._writer.queue(op, settle)

    async def _write(self, op: _Op) -> Any:
        return await self._queue(op)

    async def flush(self) -> None:
        await self._writer.flush()

    def put_nowait(
        self, msg_id: bytes, sender: str, recipient: str, payload: bytes, stored_at: int
    ) -> tuple[Envelope | None, asyncio.Future[None]]:
        if (sender, msg_id) in self._stored:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return None, done
        if self._count.get(recipient, 0) >= self.limits.max_pending:
            raise QuotaExceeded(f"mailbox of {recipient} holds {self.limits.max_pending} envelopes")
        if self._bytes.get(recipient, 0) + len(payload) > self.limits.max_pending_bytes:
            raise QuotaExceeded(f"mailbox of {recipient} is over {self.limits.max_pending_bytes} bytes")
        share = self._share.setdefault((recipient, sender), [0, 0])
        if share[0] >= self.limits.max_pending_per_sender:
            raise QuotaExceeded(share_full(sender, recipient, f"{self.limits.max_pending_per_sender} envelopes"))
        if share[1] + len(payload) > self.limits.max_pending_bytes_per_sender:
            raise QuotaExceeded(share_full(sender, recipient, f"{self.limits.max_pending_bytes_per_sender} bytes"))
        self._seq += 1
        envelope = Envelope(self._seq, msg_id, sender, recipient, payload, stored_at)

        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO envelopes (seq, msg_id, sender, recipient, payload, stored_at) VALUES (?, ?, ?, ?, ?, ?)",
                (envelope.seq, msg_id, sender, recipient, payload, stored_at),
            )

        self._stored.add((sender, msg_id))
        self._count[recipient] = self._count.get(recipient, 0) + 1
        self._bytes[recipient] = self._bytes.get(recipient, 0) + len(payload)
        share[0] += 1
        share[1] += len(payload)

        def undo(value: None, error: BaseException | None) -> None:
            # Not stored after all: forget it, so that the sender's retransmission is taken afresh.
            if error is not None:
                self._stored.discard((sender, msg_id))
                self._count[recipient] -= 1
                self._bytes[recipient] -= len(payload)
                share[0] -= 1
                share[1] -= len(payload)

        return envelope, self._queue(op, undo)

    async def pending(self, recipient: str, after: int = 0, limit: int = 256) -> list[Envelope]:
        def query() -> list[Envelope]:
            assert self._db is not None
            rows = self._db.execute(
                "SELECT seq, msg_id, sender, payload, stored_at FROM envelopes "
                "WHERE recipient = ? AND seq > ? ORDER BY seq LIMIT ?",
                (recipient, after, limit),
            )
            return [Envelope(seq, m, s, recipient, p, t) for seq, m, s, p, t in rows]

        return await self._run(query)

    def _forget(self, rows: list[tuple[str, str, bytes, int]]) -> None:
        for recipient, sender, msg_id, size in rows:
            self._count[recipient] -= 1
            self._bytes[recipient] -= size
            self._stored.discard((sender, msg_id))
            share = self._share.get((recipient, sender))
            if share is not None:
                share[0] -= 1
                share[1] -= size
                if share[0] <= 0:
                    del self._share[(recipient, sender)]

    def delete_nowait(self, recipient: str, msg_id: bytes) -> asyncio.Future[bool]:
        def op(db: sqlite3.Connection) -> list[tuple[str, str, bytes, int]]:
            return db.execute(
                "DELETE FROM envelopes WHERE recipient = ? AND msg_id = ? "
                "RETURNING recipient, sender, msg_id, LENGTH(payload)",
                (recipient, msg_id),
            ).fetchall()

        def forget(rows: list[tuple[str, str, bytes, int]] | None, error: BaseException | None) -> bool:
            if error is not None or not rows:
                return False
            self._forget(rows)
            return True

        return self._queue(op, forget)

    async def purge_expired(self, now_ms: int) -> int:
        cutoff = now_ms - int(self.limits.max_age * 1000)

        def op(db: sqlite3.Connection) -> list[tuple[str, str, bytes, int]]:
            return db.execute(
                "DELETE FROM envelopes WHERE stored_at < ? RETURNING recipient, sender, msg_id, LENGTH(payload)",
                (cutoff,),
            ).fetchall()

        rows = await self._write(op)
        self._forget(rows)
        return len(rows)

    async def put_bundle(self, name: str, bundle: bytes, onetime: Sequence[OneTimePrekey], replace: bool) -> None:
        rows = [(name, pack_onetime(prekey)) for prekey in onetime]

        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO bundles (name, bundle) VALUES (?, ?)", (name, bundle))
            if replace:
                db.execute("DELETE FROM onetime WHERE name = ?", (name,))
            db.executemany("INSERT INTO onetime (name, prekey) VALUES (?, ?)", rows)
            # Keep the newest MAX_ONETIME_STORED: uploads never grow the table without bound.
            db.execute(
                "DELETE FROM onetime WHERE name = ? AND seq NOT IN "
                "(SELECT seq FROM onetime WHERE name = ? ORDER BY seq DESC LIMIT ?)",
                (name, name, MAX_ONETIME_STORED),
            )

        await self._write(op)
        self._known.add(name)

    async def note_identity(self, name: str, identity: bytes) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT identity FROM identities WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] == identity:
                return False
            db.execute("INSERT OR REPLACE INTO identities (name, identity) VALUES (?, ?)", (name, identity))
            if row is None:
                return False
            return db.execute("DELETE FROM onetime WHERE name = ?", (name,)).rowcount > 0

        changed: bool = await self._write(op)
        return changed

    async def swap_epoch(self, name: str, epoch: bytes | None) -> bytes | None:
        def op(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT epoch FROM epochs WHERE name = ?", (name,)).fetchone()
            if epoch is not None:
                db.execute("INSERT OR REPLACE INTO epochs (name, epoch) VALUES (?, ?)", (name, epoch))
            return bytes(row[0]) if row is not None else None

        held: bytes | None = await self._write(op)
        return held

    async def take_bundle(self, name: str) -> TakenBundle | None:
        def op(db: sqlite3.Connection) -> TakenBundle | None:
            row = db.execute("SELECT bundle FROM bundles WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            taken = db.execute(
                "DELETE FROM onetime WHERE seq = (SELECT MIN(seq) FROM onetime WHERE name = ?) RETURNING prekey",
                (name,),
            ).fetchone()
            (left,) = db.execute("SELECT COUNT(*) FROM onetime WHERE name = ?", (name,)).fetchone()
            return row[0], unpack_onetime(taken[0]) if taken else None, left

        # A write: the one-time prekey must be gone for good before anyone else can be handed it.
        result: TakenBundle | None = await self._write(op)
        return result

    async def known(self, name: str) -> bool:
        return name in self._known

    async def onetime_left(self, name: str) -> int:
        def query() -> int:
            assert self._db is not None
            (count,) = self._db.execute("SELECT COUNT(*) FROM onetime WHERE name = ?", (name,)).fetchone()
            return int(count)

        return await self._run(query)

    async def put_crl(self, number: int, der: bytes) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            # CRL numbers run to 2**159: kept as decimal text, since SQLite integers stop at 2**63,
            # and compared as such (the longer, then the greater text is the higher number).
            stored = db.execute(
                "INSERT INTO crl (id, number, der) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE "
                "SET number = excluded.number, der = excluded.der "
                "WHERE length(excluded.number) > length(number) "
                "OR (length(excluded.number) = length(number) AND excluded.number >= number) RETURNING id",
                (str(number), der),
            ).fetchall()
            return bool(stored)

        result: bool = await self._write(op)
        return result

    async def get_crl(self) -> tuple[int, bytes] | None:
        def query() -> tuple[int, bytes] | None:
            assert self._db is not None
            row = self._db.execute("SELECT number, der FROM crl WHERE id = 1").fetchone()
            return (int(row[0]), row[1]) if row else None

        return await self._run(query)

    async def waiting(self, recipient: str) -> int:
        return self.mailbox_size(recipient)

    def mailbox_size(self, recipient: str) -> int:
        """Envelopes waiting for `recipient`, from memory (no query)."""
        return self._count.get(recipient, 0)
