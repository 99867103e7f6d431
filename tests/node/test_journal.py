"""The node's journal: ordered group commits, fsyncs and checkpoints on its thread, the rest on the loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from node import journal as journal_module
from node.errors import StorageError
from node.journal import Journal
from node.keystore import ARGON2_PROFILES, Keystore


@pytest.fixture
def store(tmp_path: Path) -> Keystore:
    ks = Keystore.open(tmp_path / "ks.db", passphrase="pw", create=True, argon2=ARGON2_PROFILES["test"])
    yield ks  # type: ignore[misc]
    ks.close()


def autocheckpoint(store: Keystore) -> int:
    return int(store.connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0])


async def test_commits_land_in_order_and_a_later_write_of_a_key_wins(store: Keystore) -> None:
    async with asyncio.timeout(10):
        journal = Journal(store)
        journal.start()
        first = journal.commit({("ns", "a"): b"1", ("ns", "b"): b"1"}, sync=False)
        second = journal.commit({("ns", "a"): b"2"}, [("ns", "b")], sync=True)
        await asyncio.gather(first, second)
        await journal.close()
    assert store.get("ns", "a") == b"2"
    assert store.get("ns", "b") is None


async def test_only_fsynced_batches_and_checkpoints_leave_the_loop(
    store: Keystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "CHECKPOINT_EVERY", 3)
    writes: list[tuple[bool, bool]] = []  # (sync, on the loop's thread)
    checkpoints: list[bool] = []
    loop_thread = threading.current_thread()
    write_sealed, checkpoint = store.write_sealed, store.checkpoint

    def watched_write(rows, deletes, *, sync=True):  # type: ignore[no-untyped-def]
        writes.append((sync, threading.current_thread() is loop_thread))
        write_sealed(rows, deletes, sync=sync)

    def watched_checkpoint() -> None:
        checkpoints.append(threading.current_thread() is loop_thread)
        checkpoint()

    monkeypatch.setattr(store, "write_sealed", watched_write)
    monkeypatch.setattr(store, "checkpoint", watched_checkpoint)
    async with asyncio.timeout(10):
        journal = Journal(store)
        journal.start()
        assert autocheckpoint(store) == 0  # SQLite must not fsync inside a commit made on the loop
        await journal.commit({("ns", "x"): b"0"}, sync=True)
        for i in range(4):
            await journal.commit({("ns", "x"): bytes([i])}, sync=False)
        await journal.close()
    assert autocheckpoint(store) == 1000
    assert writes == [(True, False), (False, True), (False, True), (False, True), (False, False)]
    assert checkpoints == [False, False]  # with the fsynced batch, and after three on the loop


async def test_a_failed_write_fails_every_commit_of_its_batch_and_the_journal_goes_on(
    store: Keystore, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_sealed = store.write_sealed
    failing = True

    def flaky(rows, deletes, *, sync=True):  # type: ignore[no-untyped-def]
        if failing:
            raise StorageError("keystore write failed: disk full")
        write_sealed(rows, deletes, sync=sync)

    monkeypatch.setattr(store, "write_sealed", flaky)
    async with asyncio.timeout(10):
        journal = Journal(store)
        journal.start()
        one = journal.commit({("ns", "a"): b"1"}, sync=False)
        two = journal.commit({("ns", "b"): b"1"}, sync=False)
        results = await asyncio.gather(one, two, return_exceptions=True)
        assert all(isinstance(r, StorageError) for r in results)
        failing = False
        await journal.commit({("ns", "c"): b"1"}, sync=True)
        await journal.close()
    assert store.get("ns", "a") is None and store.get("ns", "c") == b"1"
