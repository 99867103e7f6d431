"""Two nodes chatting end to end through a real relay on 127.0.0.1 (in one process)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from node.errors import StorageError
from node.node import Node, NodeOptions
from relay.server import Relay
from tests.support.lab import clock, make_node, next_event, next_message, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA


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


async def test_simultaneous_initiation_settles_on_one_session(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        bob = make_node(CA, BOB, relay.url)
        async with running(alice, bob):
            await asyncio.gather(alice.send("bob", "hi from alice"), bob.send("alice", "hi from bob"))
            # If the two INITs crossed, both sides kept the same one (protocol/peer.py's rank: the
            # fresher, here the lower fingerprint, as the test clock stands still) and archived the
            # other; if not, one side simply used the session the other had started. Either way the
            # winner's first message arrives (tests/node/test_crossing.py shows that the other's does too)...
            winner, other = (alice, bob) if ALICE.fingerprint < BOB.fingerprint else (bob, alice)
            assert (await next_message(other)).text == f"hi from {winner.name}"
            # ...and from then on there is one session, both ways.
            for i in range(3):
                await other.send(winner.name, f"other {i}")
                got = await next_message(winner)
                while got.text.startswith("hi from"):  # the other's first message, if it survived
                    got = await next_message(winner)
                assert got.text == f"other {i}"
                await winner.send(other.name, f"winner {i}")
                assert (await next_message(other)).text == f"winner {i}"


async def test_a_send_to_an_unknown_node_is_refused_once_and_not_retried(tmp_path: Path) -> None:
    from protocol.link import Send

    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        async with running(alice):
            alice._queue_outbox(b"\x01" * 16, "ghost", b"opaque")  # as if queued earlier for a node now gone
            await alice._link_send(Send(b"\x01" * 16, "ghost", b"opaque"))
            event = await next_event(alice, "send_refused")
            assert "ghost" in event.reason
            assert alice.outbox_size() == 0


async def test_no_message_of_a_new_reservation_leaves_before_it_is_durable(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        bob = make_node(CA, BOB, relay.url)
        async with running(alice, bob):
            await alice.send("bob", "session first")
            assert (await next_message(bob)).text == "session first"
            gate = asyncio.Event()
            commit = alice._journal.commit
            sent: list[bytes] = []
            link_send = alice._link_send

            def held(puts, deletes=(), *, sync=True):
                fut = commit(puts, deletes, sync=sync)
                if not sync:
                    return fut
                gated = asyncio.get_running_loop().create_future()

                async def release() -> None:
                    await gate.wait()
                    await fut
                    gated.set_result(None)

                alice._tasks.add(asyncio.ensure_future(release()))
                return gated

            async def spy(frame):
                sent.append(frame)
                await link_send(frame)

            alice._journal.commit = held  # type: ignore[method-assign]
            alice._link_send = spy  # type: ignore[method-assign]
            sends = [asyncio.create_task(alice.send("bob", f"m{i}")) for i in range(3)]
            await asyncio.sleep(0.3)
            assert sent == []  # the reservation is not on disk yet: nothing of it may leave
            gate.set()
            await asyncio.gather(*sends)
            assert sorted([(await next_message(bob)).text for _ in range(3)]) == ["m0", "m1", "m2"]


async def test_without_an_inbox_nothing_piles_up_in_the_keystore(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        bob = make_node(CA, BOB, relay.url, inbox=False)
        async with running(alice, bob):
            for i in range(3):
                await alice.send("bob", f"m{i}")
                assert (await next_message(bob)).text == f"m{i}"
            assert bob.take_inbox() == []  # the application read events; nothing was kept
            await bob.send("alice", "and alice keeps hers")
            assert (await next_message(alice)).text == "and alice keeps hers"
            assert any(item.get("text") == "and alice keeps hers" for item in alice.take_inbox())


async def test_a_delivery_whose_commit_fails_is_neither_shown_nor_acknowledged(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        bob = make_node(CA, BOB, relay.url, tmp_path / "bob.db")
        async with running(alice):
            async with running(bob):
                await alice.send("bob", "first")
                assert (await next_message(bob)).text == "first"
                commit = bob._journal.commit

                def failing(puts, deletes=(), *, sync=True):  # type: ignore[no-untyped-def]
                    fut = asyncio.get_running_loop().create_future()
                    fut.set_exception(StorageError("keystore write failed: disk full"))
                    return fut

                bob._journal.commit = failing  # type: ignore[method-assign]
                await alice.send("bob", "second")
                await asyncio.sleep(0.3)
                assert bob.events.empty()
                assert relay.store.mailbox_size("bob") == 1  # not acknowledged: the relay keeps it
                bob._journal.commit = commit  # type: ignore[method-assign]
            again = Node(bob.keystore, options=NodeOptions(), clock=clock)
            async with running(again):  # restarted from what is on disk: it comes again, once
                assert (await next_message(again)).text == "second"
