"""The rollback epoch's copy at the relay (node/epochecho.py, PROTOCOL.md §8.2, §16.3): a home restored
whole — keystore AND epoch file — is caught by the signed epoch the relay echoes at login; the echo
counts only when this node signed it."""

from __future__ import annotations

import shutil
from pathlib import Path

from node.epochecho import echoed_epoch, rollback_seen, sign_epoch
from node.events import SecurityEvent
from node.node import Node
from protocol.link import signed_epoch
from relay.server import Relay
from tests.support.lab import make_node, next_event, next_message, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA
from tests.support.rollback import reopen


def rollback_events(node: Node) -> list[SecurityEvent]:
    found = []
    while not node.events.empty():
        item = node.events.get_nowait()
        if isinstance(item, SecurityEvent) and item.event == "state_rollback":
            found.append(item)
    return found


async def test_a_home_restored_whole_is_caught_by_the_epoch_the_relay_echoes(tmp_path: Path) -> None:
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
        backup = tmp_path / "backup"
        shutil.copytree(home, backup)  # the whole home, epoch file included (a VM snapshot does that)
        for minutes, text in ((1, "two"), (2, "three")):  # it goes on: messages, restarts, logins
            alice = reopen(home / "keystore.db", minutes)
            async with running(alice, bob):
                assert not rollback_events(alice)
                await alice.send("bob", text)
                assert (await next_message(bob)).text == text
            alice.keystore.close()

        shutil.rmtree(home)
        shutil.copytree(backup, home)  # restored whole: the epoch file agrees with the keystore
        alice = reopen(home / "keystore.db", 3)
        assert not alice._rolled_back  # the local check sees nothing
        async with running(alice, bob):
            [event] = rollback_events(alice)  # seen at login, by the relay's echo
            assert "1 session" in event.reason
            await next_event(bob, "session_established")  # alice's own new handshake
            await alice.send("bob", "four")
            assert (await next_message(bob)).text == "four"
            await bob.send("alice", "back")
            assert (await next_message(alice)).text == "back"
        alice.keystore.close()
        alice = reopen(home / "keystore.db", 4)  # a normal restart afterwards raises no alarm
        async with running(alice):
            assert not rollback_events(alice)
        alice.keystore.close()


def test_an_echo_counts_only_when_this_node_signed_it_for_its_name() -> None:
    mine = sign_epoch(ALICE.identity, "alice", 7)
    assert echoed_epoch(mine, ALICE.identity, "alice") == 7
    assert echoed_epoch(None, ALICE.identity, "alice") == 0
    assert echoed_epoch(mine, ALICE.identity, "bob") == 0  # another name
    assert echoed_epoch(sign_epoch(BOB.identity, "alice", 9), ALICE.identity, "alice") == 0  # another key
    assert echoed_epoch(signed_epoch(9, b"\x00" * 64), ALICE.identity, "alice") == 0  # forged
    assert rollback_seen(mine, sign_epoch(ALICE.identity, "alice", 5), ALICE.identity, "alice") == 7
    assert rollback_seen(mine, sign_epoch(ALICE.identity, "alice", 7), ALICE.identity, "alice") == 0
    assert rollback_seen(mine, None, ALICE.identity, "alice") == 7
    assert rollback_seen(None, mine, ALICE.identity, "alice") == 0
