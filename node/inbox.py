"""What a node hands its application: the stored inbox (messages and security events, until taken),
read through `deliveries()`, one channel in commit order; each item is shown only once its record is
on disk. (`events` is the same stream as objects, for an application that keeps no stored inbox: the
attack lab.)

Records: `inbox/<seq 20 digits>` = the `receive --json` item (node/events.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import msgpack

from node.eventbudget import MAX_STORED_EVENTS, EventBudget
from node.events import Delivered, SecurityEvent
from node.home import NS_INBOX, last_seq
from node.journal import Journal, Key, log_failure
from node.keystore import Keystore

log = logging.getLogger("kmsnet.node")


class Inbox:
    """The stored inbox and the application's queue of what was delivered."""

    def __init__(self, keystore: Keystore, journal: Journal, *, stored: bool) -> None:
        self._keystore = keystore
        self._journal = journal
        #: Keep items in the keystore until taken (NodeOptions.inbox).
        self.stored = stored
        self.events: asyncio.Queue[Delivered] = asyncio.Queue()
        # Set whenever a commit made something new visible (see `deliveries`).
        self._arrived = asyncio.Event()
        #: Called with what each `take` took: other readers of this node (the control socket's
        #: `receive` requests) see what the application took.
        self.listeners: list[Callable[[list[dict[str, Any]]], None]] = []
        #: Security events coalesced per peer (issue #13).
        self.budget = EventBudget()
        self._seq = last_seq(keystore.names(NS_INBOX))
        # How many items the stored inbox holds (counted once, then kept).
        self._count: int | None = None

    def stage(self, item: dict[str, Any], puts: dict[Key, bytes]) -> None:
        """Add `item` to a commit being prepared (nothing when the inbox is not stored)."""
        if self.stored:
            self._seq += 1
            puts[(NS_INBOX, f"{self._seq:020d}")] = msgpack.packb(item)

    def stage_event(self, event: SecurityEvent, now: datetime, puts: dict[Key, bytes]) -> SecurityEvent | None:
        """Log a security event and add it to a commit being prepared, if the budget admits it: the
        event to show once that commit is done (it may say how many like it were left out), or None."""
        log.info("security_event", extra={"fields": event.to_json()})
        admitted = self.budget.admit(event, now)
        if admitted is None or self._full():
            return None  # logged only
        self.stage(admitted.to_json(), puts)
        return admitted

    def emit(self, event: SecurityEvent, now: datetime) -> asyncio.Future[None]:
        """Record a security event in the inbox by itself; the application sees it once it is on disk."""
        record: dict[Key, bytes] = {}
        admitted = self.stage_event(event, now, record)
        durable = self._journal.commit(record, sync=False)  # still in commit order when only logged
        if admitted is None:
            return durable
        event = admitted

        def show(fut: asyncio.Future[None]) -> None:  # a callback, in commit order (see Node._on_deliver)
            if not fut.cancelled() and fut.exception() is None:
                self.show(event)
            else:
                log_failure(fut)

        durable.add_done_callback(show)
        return durable

    def show(self, item: Delivered) -> None:
        """`item` is on disk now: hand it to the application (called in commit order)."""
        self.events.put_nowait(item)
        self._arrived.set()

    async def deliveries(self) -> AsyncIterator[dict[str, Any]]:
        """Every stored message and event not yet taken, oldest first, then each new one as its commit
        completes (commit order), as `receive --json` items; each is taken (removed from the stored
        inbox, and told to the `listeners`) as it is handed out. Runs until cancelled."""
        while True:
            self._arrived.clear()
            for item in self.take():
                yield item
            await self._arrived.wait()

    def _full(self) -> bool:
        """Whether the stored inbox holds MAX_STORED_EVENTS security events (counted once, then kept)."""
        if self._count is None:
            self._count = len(self._keystore.names(NS_INBOX))
        self._count += 1
        return self._count > MAX_STORED_EVENTS

    def take(self) -> list[dict[str, Any]]:
        """Every message and event received and not yet taken, oldest first; they are removed."""
        out = []
        with self._keystore.transaction():
            for name in self._keystore.names(NS_INBOX):
                packed = self._keystore.get(NS_INBOX, name)
                if packed is not None:
                    out.append(msgpack.unpackb(packed))
                self._keystore.delete(NS_INBOX, name)
        self._count = 0
        if out:
            for listener in list(self.listeners):
                listener(out)
        return out
