"""The node's outbox: envelopes the relay has not accepted yet are kept in memory, and on disk
once somebody was told "queued" or the node stops — and are sent again after a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

from node.home import NS_OUTBOX
from node.node import Node, NodeOptions
from protocol.link import Send
from relay.interceptor import Interceptor
from relay.server import Relay
from tests.support.lab import clock, make_node, next_message, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA


class Gate(Interceptor):
    """Holds alice's SENDs at the relay (nothing stored, nothing accepted) until opened; those held
    when it opens are dropped, as if the relay had never received them."""

    def __init__(self) -> None:
        self.closed = False
        self.holding = asyncio.Event()
        self.opened = asyncio.Event()

    async def on_send(self, sender: str, send: Send) -> list[Send]:
        if sender != "alice" or not self.closed:
            return [send]
        self.holding.set()
        await self.opened.wait()
        return []


def restarted(node: Node, **options: object) -> Node:
    return Node(node.keystore, options=NodeOptions(**options), clock=clock)  # type: ignore[arg-type]


async def test_an_accepted_send_never_writes_the_outbox_to_disk(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url, tmp_path / "alice.db")
        bob = make_node(CA, BOB, relay.url)
        written: list[tuple[str, str]] = []
        async with running(alice, bob):
            commit = alice._journal.commit

            def watching(puts, deletes=(), *, sync=True):  # type: ignore[no-untyped-def]
                written.extend(puts)
                written.extend(deletes)
                return commit(puts, deletes, sync=sync)

            alice._journal.commit = watching  # type: ignore[method-assign]
            for i in range(20):
                await alice.send("bob", f"m{i}")
                assert (await next_message(bob)).text == f"m{i}"
            assert alice.outbox_size() == 0
        assert [key for key in written if key[0] == NS_OUTBOX] == []


async def test_a_send_reported_queued_is_on_disk_and_sent_after_a_restart(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url, tmp_path / "alice.db", send_timeout=0.5)
        bob = make_node(CA, BOB, relay.url)
        async with running(bob):
            async with running(alice):
                await alice.send("bob", "first")  # a session, so that the next one is a plain message
                assert (await next_message(bob)).text == "first"
                relay.interceptor = gate = Gate()
                gate.closed = True
                await alice.send("bob", "held")  # returns "queued" after send_timeout
                assert alice.outbox_size() == 1
                assert len(alice.keystore.names(NS_OUTBOX)) == 1  # fsynced before send returned
            gate.opened.set()  # the held copy is dropped: only the outbox can bring it now
            gate.closed = False
            again = restarted(alice)
            async with running(again):
                assert (await next_message(bob)).text == "held"
                assert await again.flush(5)
            assert again.keystore.names(NS_OUTBOX) == []


async def test_a_node_stopped_with_a_send_in_flight_sends_it_after_a_restart(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url, tmp_path / "alice.db", send_timeout=30)
        bob = make_node(CA, BOB, relay.url)
        async with running(bob):
            async with running(alice):
                await alice.send("bob", "first")
                assert (await next_message(bob)).text == "first"
                relay.interceptor = gate = Gate()
                gate.closed = True
                sending = asyncio.create_task(alice.send("bob", "in flight"))
                await asyncio.wait_for(gate.holding.wait(), 5)
                assert alice.keystore.names(NS_OUTBOX) == []  # in memory while the relay may answer
            # alice stopped: the envelope the relay never accepted went to disk on the way out
            assert len(alice.keystore.names(NS_OUTBOX)) == 1
            sending.cancel()
            gate.opened.set()
            gate.closed = False
            again = restarted(alice)
            async with running(again):
                assert (await next_message(bob)).text == "in flight"
                assert await again.flush(5)
