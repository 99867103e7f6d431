"""A flood of forged frames from an enrolled peer costs the victim a bounded number of records
(issue #13 part 6): security events are coalesced per peer and event, and the stored inbox holds
at most MAX_STORED_EVENTS of them. The CPU side is measured in bench/, not timed here."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from datetime import timedelta

from node.eventbudget import BURST, QUARANTINE, REFUSALS, WINDOW, EventBudget, RefusalBudget
from node.events import SecurityEvent
from node.home import NS_INBOX, NS_SEEN
from protocol import wire
from protocol.link import Accepted, Batch, Send
from protocol.ratchet import MAX_SKIP
from relay.server import Relay
from tests.support.lab import make_node, next_message, publish_crl, raw_client, recv_frame, relay_config, running
from tests.support.pki import ALICE, BOB, CA, NOW

FORGED = 2000


def test_events_are_coalesced_per_peer_and_event_and_notices_never() -> None:
    budget = EventBudget()
    refused = SecurityEvent("authentication_failed", "bob", "tag mismatch")
    kept = [budget.admit(refused, NOW) for _ in range(50)]
    assert sum(e is not None for e in kept) == BURST and budget.left_out == 50 - BURST
    assert budget.admit(SecurityEvent("authentication_failed", "carol", "x"), NOW) is not None  # another peer
    assert budget.admit(SecurityEvent("decode_error", "bob", "x"), NOW) is not None  # another event
    for _ in range(20):
        assert budget.admit(SecurityEvent("session_established", "bob", "new"), NOW) is not None
    later = budget.admit(refused, NOW + WINDOW)
    assert later is not None and f"and {50 - BURST} more like it" in later.reason
    assert budget.admit(refused, NOW + WINDOW + timedelta(seconds=1)) is not None


def test_a_peer_over_its_refusal_budget_is_dropped_unread_for_a_while() -> None:
    budget = RefusalBudget(refusals=3)
    assert [budget.refused("mallory", NOW) for _ in range(4)] == [False, False, False, True]
    assert budget.drops("mallory", NOW) and not budget.drops("alice", NOW)
    assert not budget.drops("mallory", NOW + QUARANTINE)  # over: read again
    assert budget.dropped == 1


async def test_a_flood_of_forged_frames_costs_a_bounded_number_of_records() -> None:
    async with Relay(relay_config(CA, rate=100_000, burst=100_000)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        async with running(alice):
            bob, _ = await raw_client(relay, BOB)
            async with bob:
                ids = [i.to_bytes(16, "big") for i in range(FORGED)]
                for start in range(0, FORGED, 200):
                    frames = [wire.encode_link(Send(m, "alice", b"\x93\x01\x02\x03")) for m in ids[start : start + 200]]
                    await bob.send(wire.encode_link(Batch(frames)))
                accepted = 0
                while accepted < FORGED:
                    if isinstance(await recv_frame(bob, timeout=30), Accepted):
                        accepted += 1
            async with asyncio.timeout(60):
                while await relay.store.waiting("alice"):  # alice has refused (and ACKed) every one
                    await asyncio.sleep(0.05)
            # The first REFUSALS were read and refused (a few recorded, the rest counted); then bob
            # was over his budget, said once, and the rest dropped unread.
            records = [item for item in alice.take_inbox() if item["type"] == "event"]
            assert [r["event"] for r in records].count("peer_flooding") == 1
            assert len(records) <= BURST + 1
            assert alice.refusal_budget.dropped == FORGED - REFUSALS - 1
            assert alice.event_budget.left_out == REFUSALS + 1 - (len(records) - 1)


async def test_a_flood_of_forged_messages_under_a_real_session_costs_a_bounded_number_of_records() -> None:
    """The dear kind of forged frame: under bob's real session with alice, a message number far
    ahead (skipped keys derived before the tag check) and random ciphertext. Past REFUSALS a window
    they are dropped unread; the records they add stay a handful, however many come."""
    flood = 1000
    async with Relay(relay_config(CA, rate=100_000, burst=100_000)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice, bob_node = make_node(CA, ALICE, relay.url, inbox=True), make_node(CA, BOB, relay.url)
        async with running(alice, bob_node):
            await bob_node.send("alice", "a real session first")
            assert (await next_message(alice)).text == "a real session first"
            session = bob_node._session("alice")
            assert session is not None
            real = session.encrypt_message(b"never sent")
            ahead = dataclasses.replace(real, n=real.n + MAX_SKIP - 100)
            payloads = [wire.encode(dataclasses.replace(ahead, ciphertext=os.urandom(32))) for _ in range(flood)]
        alice.take_inbox()
        before = len(alice.keystore.names(NS_INBOX)) + len(alice.keystore.names(NS_SEEN))
        async with running(alice):
            bob, _ = await raw_client(relay, BOB)
            async with bob:
                for start in range(0, flood, 200):
                    frames = [wire.encode_link(Send(os.urandom(16), "alice", p)) for p in payloads[start : start + 200]]
                    await bob.send(wire.encode_link(Batch(frames)))
                async with asyncio.timeout(60):
                    while alice._handled < flood:
                        await asyncio.sleep(0.05)
            added = len(alice.keystore.names(NS_INBOX)) + len(alice.keystore.names(NS_SEEN)) - before
            events = [item["event"] for item in alice.take_inbox() if item["type"] == "event"]
        assert events.count("peer_flooding") == 1
        assert added == len(events) <= 2 * BURST + 2  # a few refusals, a restarted handshake, the notice
        assert alice.refusal_budget.dropped == flood - REFUSALS - 1
