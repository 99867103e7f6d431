"""The rollback detector (node/epoch.py, PROTOCOL.md §8.2): a keystore restored from a copy older than
its epoch file drops every session, says so, and starts new ones; real nodes, a real relay."""

from __future__ import annotations

import shutil
from pathlib import Path

from node.epoch import EpochFile, epoch_path
from relay.server import Relay
from tests.support.lab import make_node, next_event, next_message, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA
from tests.support.rollback import reopen


async def test_a_keystore_restored_from_an_older_copy_drops_its_sessions_and_starts_new_ones(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        home = tmp_path / "alice"
        home.mkdir()
        alice = make_node(CA, ALICE, relay.url, home / "keystore.db")
        bob = make_node(CA, BOB, relay.url)
        async with running(alice, bob):
            await alice.send("bob", "one")
            assert (await next_message(bob)).text == "one"
        alice.keystore.close()
        backup = tmp_path / "backup.db"
        shutil.copy(home / "keystore.db", backup)  # a backup of the keystore alone
        alice = reopen(home / "keystore.db", 1)
        async with running(alice, bob):
            await alice.send("bob", "two")
            assert (await next_message(bob)).text == "two"
        alice.keystore.close()
        assert EpochFile(epoch_path(home / "keystore.db")).read() >= 2

        shutil.copy(backup, home / "keystore.db")  # restored: its session would reuse message keys
        alice = reopen(home / "keystore.db", 2)
        async with running(alice, bob):
            event = await next_event(alice, "state_rollback")
            assert "1 session" in event.reason
            # alice's own new handshake reaches bob (no message of the old session is sent again)
            await next_event(bob, "session_established")
            await alice.send("bob", "three")
            assert (await next_message(bob)).text == "three"
            await bob.send("alice", "back")
            assert (await next_message(alice)).text == "back"
        alice.keystore.close()
        # A normal restart afterwards raises no alarm.
        alice = reopen(home / "keystore.db", 3)
        async with running(alice):
            assert not alice._rolled_back
        alice.keystore.close()


def test_the_epoch_file_is_replaced_whole_and_reads_0_when_missing_or_unreadable(tmp_path: Path) -> None:
    assert EpochFile(None).read() == 0
    EpochFile(None).write(5)  # no home: nothing to write
    path = epoch_path(tmp_path / "keystore.db")
    assert path == tmp_path / "keystore.db.epoch"
    epoch = EpochFile(path)
    assert epoch.read() == 0
    epoch.write(7)
    assert path.read_text() == "7\n" and EpochFile(path).read() == 7
    path.write_text("garbage")
    assert EpochFile(path).read() == 0


async def test_an_epoch_file_that_cannot_be_written_is_logged_and_never_stops_the_node(tmp_path: Path) -> None:
    epoch = EpochFile(tmp_path / "missing-dir" / "keystore.db.epoch")
    epoch.advance(3)
    await epoch.close()  # the directory does not exist: logged, not raised
    assert epoch.read() == 0
