"""Group commit for a node's keystore: many tasks' writes, one transaction, one fsync, off the loop.

`await journal.commit(puts, deletes)` returns once those records are durable. Records queued
while a transaction is running go into the next one, so a busy node pays one fsync for a whole
batch of messages, and the event loop never waits for an fsync. Callers keep the authoritative
state in memory; the journal only makes it durable, in the order commits were asked for.

A batch that needs no fsync is written on the loop itself: it only reaches the page cache,
which takes tens of microseconds — less than handing it to a thread and back costs (about
100 µs here, and a GIL hand-over each way). Fsynced batches, and the periodic checkpoint of
the write-ahead log (SQLite's own would fsync inside whichever commit crosses its threshold),
run on the journal's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from node.keystore import Keystore

log = logging.getLogger("kmsnet.node")

Key = tuple[str, str]

#: Unfsynced batches written on the loop between two checkpoints of the write-ahead log.
CHECKPOINT_EVERY = 256


class Journal:
    """The write-behind queue of one keystore (use as an async context manager, or start/close)."""

    def __init__(self, keystore: Keystore) -> None:
        self.keystore = keystore
        self._thread: ThreadPoolExecutor | None = None
        self._queue: list[tuple[Mapping[Key, bytes], Sequence[Key], bool, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._outstanding: set[asyncio.Future[None]] = set()
        self._since_checkpoint = 0

    def start(self) -> None:
        """Start the writer task (needs a running loop)."""
        if self._task is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="node-journal")
            self.keystore.auto_checkpoint(False)
            self._task = asyncio.create_task(self._run(), name="node-journal")

    def commit(
        self, puts: Mapping[Key, bytes], deletes: Sequence[Key] = (), *, sync: bool = True
    ) -> asyncio.Future[None]:
        """Queue writes; the returned future completes once they are committed (or fails with why not).

        `sync`: the commit must survive a power loss (fsynced), not only a crash of the process.
        A batch is fsynced if any commit in it asks for it, and an fsync makes every earlier
        commit durable too.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((puts, deletes, sync, fut))
        self._outstanding.add(fut)
        fut.add_done_callback(self._outstanding.discard)
        self._wake.set()
        return fut

    @staticmethod
    def _merge(batch: list[tuple[Mapping[Key, bytes], Sequence[Key]]]) -> tuple[dict[Key, bytes], set[Key]]:
        """One set of writes for a whole batch: a later put or delete of a key supersedes an earlier
        one (a session written by ten messages is written once, in its latest state)."""
        puts: dict[Key, bytes] = {}
        deletes: set[Key] = set()
        for batch_puts, batch_deletes in batch:
            for key, value in batch_puts.items():
                puts[key] = value
                deletes.discard(key)
            for key in batch_deletes:
                puts.pop(key, None)
                deletes.add(key)
        return puts, deletes

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        thread = self._thread
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            puts, deletes = self._merge([(p, d) for p, d, _, _ in batch])
            sync = any(s for _, _, s, _ in batch)
            try:
                rows = self.keystore.seal_many(puts)
                if sync or self._since_checkpoint >= CHECKPOINT_EVERY:
                    write = functools.partial(self._write_and_checkpoint, rows, deletes, sync)
                    await loop.run_in_executor(thread, write)
                    self._since_checkpoint = 0
                else:
                    self.keystore.write_sealed(rows, deletes, sync=False)
                    self._since_checkpoint += 1
            except Exception as exc:  # noqa: BLE001 - whatever failed, every waiter must learn it
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for *_, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    def _write_and_checkpoint(self, rows: list[tuple[str, str, bytes]], deletes: set[Key], sync: bool) -> None:
        self.keystore.write_sealed(rows, deletes, sync=sync)
        self.keystore.checkpoint()

    async def drain(self) -> None:
        """Wait until everything asked so far is committed (errors are the committers' to see)."""
        if self._outstanding:
            # asyncio.wait, not gather: a drain that is cancelled must not cancel the commits it waits for.
            await asyncio.wait(set(self._outstanding))

    async def close(self) -> None:
        """Commit what is queued, stop the writer and its thread."""
        if self._task is not None:
            await self.drain()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            self.keystore.auto_checkpoint(True)
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None


def succeeded(fut: asyncio.Future[None]) -> bool:
    """True once a commit is done and did not fail."""
    return fut.done() and not fut.cancelled() and fut.exception() is None


def log_failure(fut: asyncio.Future[None]) -> None:
    """For commits nobody waits on: a failure must still be seen."""
    if not fut.cancelled() and fut.exception() is not None:
        log.error("commit_failed", extra={"fields": {"error": str(fut.exception())}})
