"""What a node sent and the relay has not accepted yet, and the sends waiting for its ACCEPTED.

In memory only, at first: while the relay answers within moments (nearly always), writing an
envelope and deleting it again would cost two disk writes per message for nothing. It is written
once somebody is told it is queued (`send` timing out, or the relay down) and when the node stops
(`persist`). A crash before that loses only envelopes whose `send` had not returned yet. Records:
`outbox/<seq 20 digits>` = [msg_id, to, payload].
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack

from node.home import NS_OUTBOX, last_seq
from node.journal import Journal, Key, log_failure
from node.keystore import Keystore


@dataclass(slots=True)
class Outgoing:
    """An envelope sent but not yet accepted by the relay."""

    name: str
    to: str
    payload: bytes
    on_disk: bool = False


class Outbox:
    """The envelopes waiting for the relay (oldest first), and the sends waiting for ACCEPTED."""

    def __init__(self, keystore: Keystore, journal: Journal) -> None:
        self._journal = journal
        names = keystore.names(NS_OUTBOX)
        self._seq = last_seq(names)
        # msg_id → envelope, in the order they were sent (records left on disk by an earlier run first).
        self._envelopes: dict[bytes, Outgoing] = {}
        for name in names:
            packed = keystore.get(NS_OUTBOX, name)
            if packed is not None:
                msg_id, to, payload = msgpack.unpackb(packed)
                self._envelopes[msg_id] = Outgoing(name, to, payload, on_disk=True)
        # Sends waiting for ACCEPTED: msg_id → (deadline on the loop's clock, future), oldest first.
        self._accepted: dict[bytes, tuple[float, asyncio.Future[None]]] = {}
        self._expiry: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._envelopes)

    def __contains__(self, msg_id: bytes) -> bool:
        return msg_id in self._envelopes

    def items(self) -> Iterator[tuple[bytes, Outgoing]]:
        """(msg_id, envelope), oldest first (a copy: resending may change the outbox)."""
        return iter(list(self._envelopes.items()))

    def queue(self, msg_id: bytes, to: str, payload: bytes) -> None:
        """Keep an envelope until the relay accepts it, to resend it after a reconnect."""
        self._seq += 1
        self._envelopes[msg_id] = Outgoing(f"{self._seq:020d}", to, payload)

    def persist(self) -> asyncio.Future[None]:
        """Write every envelope still waiting for the relay to disk, fsynced (sends them on a restart)."""
        puts: dict[Key, bytes] = {}
        for msg_id, envelope in self._envelopes.items():
            if not envelope.on_disk:
                puts[(NS_OUTBOX, envelope.name)] = msgpack.packb([msg_id, envelope.to, envelope.payload])
                envelope.on_disk = True
        return self._journal.commit(puts, sync=True)

    def forget(self, msg_id: bytes) -> None:
        """The relay has the envelope (or refused it for good): drop it."""
        envelope = self._envelopes.pop(msg_id, None)
        if envelope is not None and envelope.on_disk:
            # No need to wait: were the delete lost in a crash, the resend is deduplicated by the relay.
            self._journal.commit({}, [(NS_OUTBOX, envelope.name)], sync=False).add_done_callback(log_failure)

    # --- sends waiting for ACCEPTED -------------------------------------------------------------------

    def await_accepted(self, msg_id: bytes, timeout: float) -> asyncio.Future[None]:
        """A future the relay's ACCEPTED for `msg_id` completes, or TimeoutError after `timeout`.

        One timer per node, armed for the oldest waiting send, instead of one per send: every send
        waits as long, so deadlines come in the order sends do.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        deadline = loop.time() + timeout
        self._accepted[msg_id] = (deadline, fut)
        if self._expiry is None:
            self._expiry = loop.call_at(deadline, self._expire_sends)
        return fut

    def accepted(self, msg_id: bytes) -> None:
        """The relay accepted `msg_id`: forget the envelope and wake its send."""
        self.forget(msg_id)
        waiting = self._accepted.pop(msg_id, None)
        if waiting is not None and not waiting[1].done():
            waiting[1].set_result(None)

    def stop_waiting(self, msg_id: bytes) -> None:
        """The send of `msg_id` no longer waits (answered, timed out or failed)."""
        self._accepted.pop(msg_id, None)

    def cancel_waiting(self) -> None:
        """The node stops: every send still waiting is cancelled."""
        for _, fut in self._accepted.values():
            if not fut.done():
                fut.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _expire_sends(self) -> None:
        loop = asyncio.get_running_loop()
        self._expiry = None
        now = loop.time()
        expired = []
        for msg_id, (deadline, fut) in self._accepted.items():
            if deadline > now:
                self._expiry = loop.call_at(deadline, self._expire_sends)
                break
            expired.append(msg_id)
            if not fut.done():
                fut.set_exception(TimeoutError())
        for msg_id in expired:
            del self._accepted[msg_id]
