"""Two nodes chatting end to end through a real relay on 127.0.0.1 (in one process)."""

from __future__ import annotations

from pathlib import Path

from conftest import ALICE, BOB, CA
from lab import make_node, next_event, next_message, publish_crl, relay_config, running

from relay.server import Relay


async def test_two_nodes_chat_both_ways(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        bob = make_node(CA, BOB, relay.url)
        async with running(alice, bob):
            await alice.send("bob", "hello bob")
            established = await next_event(bob, "session_established")  # comes before the message
            assert "HYBRID" in established.reason
            got = await next_message(bob)
            assert (got.sender, got.text) == ("alice", "hello bob")
            for i in range(5):
                await bob.send("alice", f"reply {i}")
                assert (await next_message(alice)).text == f"reply {i}"
                await alice.send("bob", f"again {i}")
                assert (await next_message(bob)).text == f"again {i}"
            assert alice.outbox_size() == 0 and bob.outbox_size() == 0
            status = alice.status()
            assert status["sessions"][0]["peer"] == "bob"
            assert status["feed"]["crl_number"] == 1


async def test_message_to_offline_node_arrives_when_it_connects(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        bob = make_node(CA, BOB, relay.url)
        async with running(bob):  # bob publishes his prekeys, then goes offline
            pass
        alice = make_node(CA, ALICE, relay.url)
        async with running(alice):
            for i in range(3):
                await alice.send("bob", f"while you were out {i}")
        async with running(bob):  # the same node (same keystore) back online
            texts = [(await next_message(bob)).text for _ in range(3)]
        assert texts == [f"while you were out {i}" for i in range(3)]
