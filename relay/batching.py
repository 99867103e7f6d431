"""Grouped writes: many callers queue a write each, one writer task commits them together.

Both stores use it: SQLite runs a group in one transaction (one fsync), Redis sends a group as
one pipeline (one round trip, and with `appendfsync always` one fsync on the server). Each
caller resumes once *its* write is settled: durability per write, the throughput of a batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from relay.errors import RelayError, StoreUnavailable

#: Most writes committed in one group.
MAX_BATCH = 512

Op = TypeVar("Op")
#: Run on the event loop once a write is settled, before its future (value, error -> result): the
#: store's own bookkeeping, done inline rather than as one more callback per write. A RelayError it
#: raises becomes the write's error.
Settle = Callable[[Any, BaseException | None], Any]
#: Commit a group of writes; one (value, error) per write, in order. Raising fails the whole group.
Commit = Callable[[list[Op]], Awaitable[list[tuple[Any, BaseException | None]]]]


class BatchWriter(Generic[Op]):
    """A queue of writes and the task that commits them in groups."""

    def __init__(self, commit: Commit[Op], name: str) -> None:
        self._commit = commit
        self._name = name
        #: The writes in order; None after the last one (close): the writer task then ends.
        self._writes: asyncio.Queue[tuple[Op, asyncio.Future[Any], Settle | None] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._outstanding: set[asyncio.Future[Any]] = set()

    def start(self) -> None:
        """Start the writer task (on the running loop)."""
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        if self._task is not None:
            await self._writes.join()
            self._writes.put_nowait(None)  # nothing is queued: the writer ends at once
            await self._task
            self._task = None

    def queue(self, op: Op, settle: Settle | None = None) -> asyncio.Future[Any]:
        """Queue one write; the future completes once it is committed (StoreUnavailable if not)."""
        if self._task is None:
            raise StoreUnavailable("store is not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._writes.put_nowait((op, fut, settle))
        self._outstanding.add(fut)
        return fut

    async def flush(self) -> None:
        """Wait until every write queued so far is settled."""
        if self._outstanding:
            # asyncio.wait, not gather: a flush that is cancelled (its connection went away) must not
            # cancel other connections' writes along with it.
            await asyncio.wait(set(self._outstanding))

    async def _loop(self) -> None:
        while True:
            first = await self._writes.get()
            if first is None:
                return  # closed
            batch = [first]
            # One turn of the event loop first: what this one made ready (deliveries) goes out before
            # the commit, and the writes queued meanwhile join the group.
            await asyncio.sleep(0)
            while not self._writes.empty() and len(batch) < MAX_BATCH:
                item = self._writes.get_nowait()
                assert item is not None, "close() waits for every write before it queues the end"
                batch.append(item)
            try:
                results = await self._commit([op for op, _, _ in batch])
            except Exception as exc:  # noqa: BLE001 - any failure: the writer must live on and say why
                # The group is lost, and nobody in it was told "stored": nobody was lied to.
                failure = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(f"store write failed: {exc}")
                results = [(None, failure)] * len(batch)
            for (_, fut, settle), (value, error) in zip(batch, results, strict=True):
                self._outstanding.discard(fut)
                if settle is not None:
                    try:
                        value = settle(value, error)
                    except RelayError as refusal:  # a refusal the store read from the answer (a full mailbox)
                        error = refusal
                if not fut.done():
                    if error is None:
                        fut.set_result(value)
                    else:
                        fut.set_exception(error)
                self._writes.task_done()
