"""Delivery receipts, retry requests and re-sends: nothing a node accepts from its user is lost silently
(PROTOCOL.md §7.6, §7.7).

Receiver side. Once a TEXT is committed with its session state (durably delivered to the
application, or recognised as a copy of one already delivered), its id is *owed* a receipt; owed
ids are sent in one RECEIPT body per peer after `receipt_delay` (batched; at most MAX_IDS per
body). A receipt is never receipted. A frame from a peer that is refused although it names a
session (a MESSAGE that does not authenticate or decode, an INIT refused) makes its envelope id
owed a RETRY request, sent the same way once a session with the peer is open.

Sender side. Every TEXT sent stays in the history (sealed in the keystore) until its receipt
comes. It is sent again, with the same id and text, under the session's current chain:
- at once when the peer asks for it (RETRY naming the id of one of its transmissions);
- when no receipt came within `resend_after` × 2^(transmissions-1) seconds, if the peer has been
  heard from since the last transmission (a gap, or a lost receipt), or, up to `max_probes`
  times, even if not (the receipt of the last message may be the one that was lost).
It is reported FAILED, with the reason in the history, after `max_refusals` retry requests (it is
altered on the way every time), after `max_transmissions` transmissions with the peer heard from
meanwhile, once older than `max_age` without a receipt, or when more than `max_pending` messages
wait (the oldest goes). A receipt that still comes makes it DELIVERED: that is the truth.

The receiver shows a message once, by its id (node/history.py), however many copies arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import msgpack

from node.history import Entry, History, State
from node.home import NS_NODE
from node.journal import Key, log_failure
from protocol.body import MAX_IDS, Body, Receipt, RetryRequest, TextBody, encode

log = logging.getLogger("kmsnet.node")

#: Envelope ids of re-sent copies remembered (to map a retry request or an ACCEPTED back to the message).
MAX_COPIES = 20_000
#: Ids owed a receipt or a retry request per peer; past it the oldest are dropped (the sender re-sends).
MAX_OWED = 4096
#: The record `node/owed_receipts`: receipts a stopped node still owed, {peer: [id, ...]}.
OWED_RECORD = "owed_receipts"


@dataclass(frozen=True)
class DeliveryPolicy:
    """The bounds of receipts and re-sends (documented in PROTOCOL.md §7.7 and the README)."""

    #: Send receipts and retry requests, re-send what is not receipted. Off only in the attack lab,
    #: whose scripted scenarios count every envelope as nodes sent them before receipts existed.
    active: bool = True
    receipt_delay: float = 0.2
    resend_after: float = 30.0
    check_every: float = 1.0
    max_probes: int = 2
    max_refusals: int = 5
    max_transmissions: int = 8
    max_age: timedelta = timedelta(days=7)
    max_pending: int = 1000


@dataclass
class _Pending:
    """A message of ours waiting for its receipt (monotonic times, of the event loop)."""

    peer: str
    last_sent: float
    transmissions: int = 1
    probes: int = 0
    refusals: int = 0
    retry_wanted: bool = False


@dataclass
class _Owed:
    receipts: dict[bytes, None] = field(default_factory=dict)
    retries: dict[bytes, None] = field(default_factory=dict)


#: Encrypt DATA bytes on the open session with a peer and hand them to the relay: the envelope id,
#: or None when no session with the peer is open (or the peer may not be written to now).
SendBody = Callable[[str, bytes], Awaitable[bytes | None]]
#: Queue keystore writes (the node's journal); a future of their commit.
Commit = Callable[[dict[Key, bytes]], "asyncio.Future[None]"]


class Delivery:
    """Receipts owed, retry requests owed, and our messages waiting for a receipt, for one node."""

    def __init__(
        self,
        history: History,
        *,
        send_body: SendBody,
        commit: Commit,
        clock: Callable[[], datetime],
        connected: Callable[[], bool],
        policy: DeliveryPolicy | None = None,
    ) -> None:
        self.history = history
        self.policy = policy or DeliveryPolicy()
        self._send_body = send_body
        self._commit = commit
        self._clock = clock
        self._connected = connected
        self._owed: dict[str, _Owed] = {}
        self._flushing: set[str] = set()
        self._pending: dict[str, _Pending] | None = None
        self._copies: dict[bytes, str] = {}  # envelope id of a copy → message id (hex)
        self._heard: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._owed_on_disk = False
        self._checking = asyncio.Lock()  # one look at a time: a retry request and the timer may meet

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching our unreceipted messages (those left by an earlier run too), and send the
        receipts an earlier run still owed."""
        if self._task is None:
            owed = self.history.keystore.get(NS_NODE, OWED_RECORD)
            self._owed_on_disk = owed is not None
            for peer, ids in (msgpack.unpackb(owed) if owed is not None else {}).items():
                for msg_id in ids:
                    self._owe(peer, msg_id, receipt=True)
            self._task = asyncio.create_task(self._watch(), name="node-delivery")

    async def stop(self, flush_for: float = 2.0) -> None:
        """Send what is owed now (for at most `flush_for` seconds, while connected), then stop. Receipts
        still owed are kept in the keystore for the next start; retry requests are not (the sender's
        own re-sends cover them)."""
        if self._task is not None:
            self._task.cancel()
        if self._connected():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush_for):
                    for peer in list(self._owed):
                        await self._flush(peer, delay=False)
        tasks = [t for t in (self._task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._tasks.clear()
        owed = {peer: list(o.receipts) for peer, o in self._owed.items() if o.receipts}
        if owed:
            self.history.write_now({(NS_NODE, OWED_RECORD): msgpack.packb(owed)}, [])
        elif self._owed_on_disk:  # sent since: the record goes (the keystore is not touched otherwise)
            self.history.write_now({}, [(NS_NODE, OWED_RECORD)])
        self._owed_on_disk = bool(owed)

    def waiting(self) -> int:
        """Our messages sent and not yet receipted (nor failed)."""
        return len(self._tracked())

    # --- hooks of the node's send and receive paths ---------------------------------------------------

    def sent(self, peer: str, msg_id: bytes) -> None:
        """A TEXT of ours left (its first transmission, envelope id = message id)."""
        self._tracked()[msg_id.hex()] = _Pending(peer, _loop_time())
        self._bound()

    def accepted(self, envelope: bytes) -> None:
        """The relay holds the envelope: its message is STORED (if it was ours and still sending)."""
        msg_id = self._copies.get(envelope, envelope.hex())
        puts: dict[Key, bytes] = {}
        if self.history.mark(msg_id, State.STORED, puts):
            self._write(puts)

    def received(self, peer: str, body: Body, committed: asyncio.Future[None]) -> None:
        """A body from `peer` authenticated; `committed` completes once it is on disk with its session."""
        self._heard[peer] = _loop_time()
        if isinstance(body, Receipt):
            puts: dict[Key, bytes] = {}
            for raw in body.ids:
                msg_id = self._copies.get(raw, raw.hex())
                if self.history.mark(msg_id, State.DELIVERED, puts, peer=peer):
                    self._tracked().pop(msg_id, None)
            self._write(puts)
            return

        def after(fut: asyncio.Future[None]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                return  # not on disk: no receipt (the relay delivers it again)
            if isinstance(body, TextBody):
                self._owe(peer, body.msg_id, receipt=True)
            else:
                self._retry_wanted(peer, body.ids)

        committed.add_done_callback(after)

    def heard(self, peer: str) -> None:
        """Something from `peer` authenticated (a heartbeat, a session start)."""
        self._heard[peer] = _loop_time()

    def refused(self, peer: str, envelope: bytes) -> None:
        """A frame from `peer` was refused (not authentic, not decodable): ask for it again."""
        self._owe(peer, envelope, receipt=False)

    # --- receiver: owed receipts and retry requests ---------------------------------------------------

    def _owe(self, peer: str, msg_id: bytes, *, receipt: bool) -> None:
        if not self.policy.active:
            return
        owed = self._owed.setdefault(peer, _Owed())
        ids = owed.receipts if receipt else owed.retries
        ids[msg_id] = None
        while len(ids) > MAX_OWED:
            del ids[next(iter(ids))]
        if peer not in self._flushing:
            self._flushing.add(peer)
            self._spawn(self._flush(peer), f"node-receipts-{peer}")

    async def _flush(self, peer: str, *, delay: bool = True) -> None:
        try:
            if delay:
                await asyncio.sleep(self.policy.receipt_delay)  # let a burst gather into one body
            owed = self._owed.get(peer)
            while owed is not None and (owed.receipts or owed.retries):
                kind, ids = (Receipt, owed.receipts) if owed.receipts else (RetryRequest, owed.retries)
                batch = list(ids)[:MAX_IDS]
                if await self._send_body(peer, encode(kind(tuple(batch)))) is None:
                    # No open session: retry requests wait for one (the peer's reset brings it), and
                    # are asked for on the next refusal or delivery; receipts too.
                    return
                for msg_id in batch:
                    ids.pop(msg_id, None)
        except Exception as exc:  # noqa: BLE001 - a failed flush must not end the node; the sender re-sends
            log.info("receipt_not_sent", extra={"fields": {"peer": peer, "reason": str(exc)}})
        finally:
            if delay:
                self._flushing.discard(peer)

    # --- sender: re-sends and failures -----------------------------------------------------------------

    def _tracked(self) -> dict[str, _Pending]:
        if self._pending is None:
            now = _loop_time()
            self._pending = {e.msg_id: _Pending(e.peer, now, e.attempts) for e in self.history.pending()}
        return self._pending

    def _retry_wanted(self, peer: str, envelopes: tuple[bytes, ...]) -> None:
        for envelope in envelopes:
            msg_id = self._copies.get(envelope, envelope.hex())
            pending = self._tracked().get(msg_id)
            if pending is not None and pending.peer == peer:
                pending.retry_wanted = True
                pending.refusals += 1
        self._spawn(self._check(), "node-resend")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.policy.check_every)
            await self._check()

    async def _check(self) -> None:
        """Re-send what is due, and report what is past its bounds as FAILED."""
        async with self._checking:
            await self._check_now()

    async def _check_now(self) -> None:
        if not self.policy.active:
            return
        policy, now, wall = self.policy, _loop_time(), self._clock().timestamp()
        puts: dict[Key, bytes] = {}
        for msg_id, pending in list(self._tracked().items()):
            entry = self.history.sent(msg_id)
            if entry is None or not entry.state.pending:
                self._tracked().pop(msg_id, None)  # receipted (or cleared from the history)
                continue
            reason = self._give_up(entry, pending, wall)
            if reason is not None:
                self._fail(msg_id, reason, puts)
                continue
            heard = self._heard.get(pending.peer, 0.0) > pending.last_sent
            due = now - pending.last_sent >= policy.resend_after * 2 ** (pending.transmissions - 1)
            probe = due and not heard and pending.probes < policy.max_probes
            if not (pending.retry_wanted or (due and heard) or probe) or not self._connected():
                continue
            if await self._resend(entry, pending):
                pending.probes += 1 if probe and not pending.retry_wanted else 0
        self._write(puts)

    def _give_up(self, entry: Entry, pending: _Pending, wall: float) -> str | None:
        policy, peer = self.policy, pending.peer
        if pending.refusals >= policy.max_refusals:
            return f"{peer}'s node refused it {pending.refusals} times: it was altered on the way each time"
        if pending.transmissions >= policy.max_transmissions and not pending.retry_wanted:
            return f"no delivery receipt from {peer} after {pending.transmissions} transmissions"
        if wall - entry.sent_at > policy.max_age.total_seconds():
            return f"no delivery receipt from {peer} within {policy.max_age.days} days"
        return None

    async def _resend(self, entry: Entry, pending: _Pending) -> bool:
        """Send `entry` again, same id and text, under the current chain; False if no session is open."""
        body = TextBody(bytes.fromhex(entry.msg_id), round(entry.sent_at * 1000), entry.text)
        envelope = await self._send_body(pending.peer, encode(body))
        if envelope is None:
            return False
        self._copies[envelope] = entry.msg_id
        while len(self._copies) > MAX_COPIES:
            del self._copies[next(iter(self._copies))]
        pending.transmissions += 1
        pending.last_sent = _loop_time()
        pending.retry_wanted = False
        puts: dict[Key, bytes] = {}
        self.history.mark(entry.msg_id, State.SENDING, puts, attempt=True)
        self._write(puts)
        log.info("message_resent", extra={"fields": {"peer": pending.peer, "transmissions": pending.transmissions}})
        return True

    def _fail(self, msg_id: str, reason: str, puts: dict[Key, bytes]) -> None:
        self._tracked().pop(msg_id, None)
        if self.history.mark(msg_id, State.FAILED, puts, reason=reason):
            log.info("message_failed", extra={"fields": {"reason": reason}})

    def _bound(self) -> None:
        """More than `max_pending` messages wait: the oldest is reported failed."""
        tracked = self._tracked()
        puts: dict[Key, bytes] = {}
        while len(tracked) > self.policy.max_pending:
            oldest = next(iter(tracked))
            self._fail(oldest, f"more than {self.policy.max_pending} messages were waiting for a receipt", puts)
        self._write(puts)

    # --- plumbing ---------------------------------------------------------------------------------------

    def _write(self, puts: dict[Key, bytes]) -> None:
        if puts:
            self._commit(puts).add_done_callback(log_failure)

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()
