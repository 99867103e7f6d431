"""Crossed and delayed INITs between real nodes through a real relay on 127.0.0.1 (PROTOCOL.md §8):
both sides starting at once lose nothing, and a held-back INIT cannot replace a newer session."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

from node.events import Message, SecurityEvent
from node.node import Node
from protocol import handshake
from protocol.link import Deliver
from protocol.messages import PrekeyBundle
from relay.server import Relay
from tests.support.lab import make_node, next_event, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA, NOW

#: Events that would mean a message of the conversation was refused.
REFUSALS = {"authentication_failed", "frame_refused", "replay_refused", "unexpected_frame", "session_refused"}


def cross_on_first_send(*nodes: Node) -> None:
    """Make each node's first bundle fetch wait until every node has fetched: both then start a
    session before either INIT can arrive, so the INITs cross for certain."""
    fetched = 0
    everyone = asyncio.Event()
    for node in nodes:
        original: Callable[[str], Awaitable[PrekeyBundle]] = node._fetch_bundle

        async def fetch(peer: str, original: Callable[[str], Awaitable[PrekeyBundle]] = original) -> PrekeyBundle:
            nonlocal fetched
            bundle = await original(peer)
            fetched += 1
            if fetched >= len(nodes):
                everyone.set()
            await everyone.wait()
            return bundle

        node._fetch_bundle = fetch  # type: ignore[method-assign]


async def collect(node: Node, count: int, timeout: float = 10.0) -> tuple[list[str], list[SecurityEvent]]:
    """The texts of the next `count` messages, and the events that came with them."""
    texts: list[str] = []
    events: list[SecurityEvent] = []
    async with asyncio.timeout(timeout):
        while len(texts) < count:
            item = await node.events.get()
            if isinstance(item, Message):
                texts.append(item.text)
            else:
                events.append(item)
    return texts, events


async def test_crossed_inits_with_messages_both_ways_deliver_everything_once(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        bob = make_node(CA, BOB, relay.url)
        async with running(alice, bob):
            cross_on_first_send(alice, bob)
            await asyncio.gather(alice.send("bob", "a0"), bob.send("alice", "b0"))
            # Each goes on talking before (or while) the other's INIT lands.
            for i in range(1, 4):
                await asyncio.gather(alice.send("bob", f"a{i}"), bob.send("alice", f"b{i}"))
            (to_bob, bob_events), (to_alice, alice_events) = await asyncio.gather(collect(bob, 4), collect(alice, 4))
            assert to_bob == [f"a{i}" for i in range(4)]
            assert to_alice == [f"b{i}" for i in range(4)]
            assert not [e for e in bob_events + alice_events if e.event in REFUSALS]
            # Both settled on the same session, and it carries the rest of the conversation.
            a_session, b_session = alice._session("bob"), bob._session("alice")
            assert a_session is not None and b_session is not None
            assert a_session.transcript == b_session.transcript
            await alice.send("bob", "after")
            await bob.send("alice", "after")
            assert (await collect(bob, 1))[0] == ["after"] and (await collect(alice, 1))[0] == ["after"]
            assert alice.events.empty() and bob.events.empty()  # nothing delivered twice


async def test_a_held_back_init_cannot_replace_a_newer_session(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        bob = make_node(CA, BOB, relay.url)
        async with running(alice, bob):
            # An INIT alice made a minute ago, which a relay held back (built here from bob's real bundle).
            bundle = bob._current_bundle()
            held = handshake.initiate(
                identity=ALICE.identity,
                certificate=ALICE.cert,
                bundle=bundle,
                root=CA.root,
                revocation=CA.revocation(),
                now=NOW - timedelta(minutes=1),
                expected_name="bob",
                first_message=b"",
            )
            await alice.send("bob", "hello")
            assert (await collect(bob, 1))[0] == ["hello"]
            await bob.send("alice", "hi")  # alice's session is confirmed on both sides now
            assert (await collect(alice, 1))[0] == ["hi"]
            before = bob._session("alice")
            await bob._on_deliver(Deliver(os.urandom(16), "alice", held.frame, 0))
            refused = await next_event(bob, "stale_init")
            assert refused.error == "stale_init" and refused.peer == "alice"
            assert bob._session("alice") is before
            await alice.send("bob", "still here")
            assert (await collect(bob, 1))[0] == ["still here"]
