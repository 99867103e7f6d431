"""Faults in the relay's store never cost a revocation or the relay (issue #13 part 7): a store that
fills up or turns read-only while the relay runs makes it refuse the writes it cannot make, with
an ERROR and a metric, while it keeps serving; a CRL published meanwhile reaches every node, and
is stored once the store takes writes again; the CA publishes until the relay confirms it."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

from protocol import wire
from protocol.link import Accepted, CrlFeed, Error, ErrorCode, Send
from protocol.revocation import verify_crl
from relay import server
from relay.server import Relay
from relay.store import SqliteStore
from tests.support.lab import make_node, publish_crl, raw_client, recv_frame, relay_config, running
from tests.support.pki import ALICE, BOB, CA, MALLORY
from tests.support.relay_helpers import publish_bundle

CAROL = CA.enrol("carol", 0x1004)


async def set_pragma(relay: Relay, pragma: str) -> None:
    """Turn the live SQLite store full or read-only (or back), as a full disk or a remount would."""
    store = relay.store
    assert isinstance(store, SqliteStore) and store._db is not None
    db: sqlite3.Connection = store._db
    await store._run(lambda: db.execute(pragma).fetchall())


async def fill(relay: Relay) -> None:
    """No page more: the next write that needs one fails with SQLite's "database or disk is full"."""
    store = relay.store
    assert isinstance(store, SqliteStore) and store._db is not None
    db: sqlite3.Connection = store._db

    def at_capacity() -> None:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count = {pages}")

    await store._run(at_capacity)


async def expect(ws, kind: type, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    while True:
        frame = await recv_frame(ws, timeout)
        if isinstance(frame, kind):
            return frame


@pytest.mark.parametrize("fault", ["full", "read-only"])
async def test_a_store_that_stops_taking_writes_costs_neither_a_revocation_nor_the_relay(
    fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(server, "HEARTBEAT_INTERVAL", 0.05)
    caplog.set_level(logging.INFO, logger="kmsnet.relay")
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl(number=1))
        alice = make_node(CA, ALICE, relay.url)
        mallory = make_node(CA, MALLORY, relay.url)
        async with running(alice, mallory):
            bob_ws, _ = await raw_client(relay, BOB)
            async with bob_ws:
                if fault == "full":
                    await fill(relay)
                else:
                    await set_pragma(relay, "PRAGMA query_only = ON")
                # A SEND is refused with UNAVAILABLE (its msg_id), not a closed connection.
                big = b"x" * 60_000
                await bob_ws.send(wire.encode_link(Send(b"m" * 16, "alice", big)))
                error = await expect(bob_ws, Error)
                assert error.code == ErrorCode.UNAVAILABLE and error.msg_id == b"m" * 16
                assert "refuses writes" in error.text
                # So is a bundle; the connection stays.
                await publish_bundle(bob_ws, BOB)
                error = await expect(bob_ws, Error)
                assert error.code == ErrorCode.UNAVAILABLE and "bundle not stored" in error.text
                assert relay.metrics.writable._value.get() == 0
                assert relay.metrics.write_refused.labels("bundle")._value.get() == 1

                # The CA revokes mallory now: every node gets CRL #2 at once, mallory is cut off.
                await publish_crl(relay, CA, CA.crl([0x1003], number=2))
                feed = await expect(bob_ws, CrlFeed)
                assert verify_crl(feed.crl, CA.root, relay.config.clock()).number == 2
                async with asyncio.timeout(5):
                    while alice.revocation.highest_number != 2 or "mallory" in relay.connected():
                        await asyncio.sleep(0.01)
                assert mallory.revoked is not None
                # A node connecting now gets it too (the feed is held apart from the store).
                late, _ = await raw_client(relay, CAROL)
                async with late:
                    feed = await expect(late, CrlFeed)
                    assert verify_crl(feed.crl, CA.root, relay.config.clock()).number == 2

                # The store takes writes again: the relay recovers by itself.
                if fault == "full":
                    await set_pragma(relay, "PRAGMA max_page_count = 1073741823")
                else:
                    await set_pragma(relay, "PRAGMA query_only = OFF")
                async with asyncio.timeout(5):
                    while await relay.store.get_crl() is None or (await relay.store.get_crl())[0] != 2:  # type: ignore[index]
                        await asyncio.sleep(0.02)
                await bob_ws.send(wire.encode_link(Send(b"n" * 16, "alice", b"again")))
                assert await expect(bob_ws, Accepted) == Accepted(b"n" * 16)
                assert relay.metrics.writable._value.get() == 1
    # Nothing went to the log as a failure of ours.
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]

    # After a restart from the same file, the relay holds CRL #2.
    async with Relay(relay_config(CA, tmp_path)) as relay:
        held = await relay.store.get_crl()
        assert held is not None and held[0] == 2
