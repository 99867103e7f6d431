"""Each sender has its own share of a recipient's mailbox, and ACKs have their own budget (issue #13
part 8): one sender that fills bob's mailbox does not lock the others out, and a node draining
its mailbox is never cut off by its own ACKs. The store half runs on SQLite, Redis and a Redis
Cluster (the backends of tests/relay/test_store.py)."""

from __future__ import annotations

import pytest

from protocol import wire
from protocol.link import Accepted, Ack, Batch, Deliver, Error, ErrorCode, Send
from relay.errors import QuotaExceeded
from relay.server import Relay
from relay.store import Limits
from tests.support.lab import raw_client, recv_frame, relay_config
from tests.support.pki import ALICE, BOB, CA, MALLORY
from tests.support.redis_fixtures import redis_cluster_url, redis_shards, redis_single, redis_url  # noqa: F401 - fixtures
from tests.support.relay_helpers import publish_bundle
from tests.support.store import Opener, msg_id, opener, put  # noqa: F401 - the backends fixture


async def test_one_sender_fills_only_its_share_of_a_mailbox(opener: Opener) -> None:
    store = opener(Limits(max_pending=5, max_pending_per_sender=2, max_pending_bytes_per_sender=100))
    await store.open()
    try:
        await put(store, msg_id(), "mallory", "bob", b"x")
        await put(store, msg_id(), "mallory", "bob", b"x")
        with pytest.raises(QuotaExceeded, match="mallory's share of the mailbox of bob is full"):
            await put(store, msg_id(), "mallory", "bob", b"x")
        await put(store, msg_id(), "carol", "bob", b"y")  # carol still gets through
        with pytest.raises(QuotaExceeded, match="100 bytes"):
            await put(store, msg_id(), "carol", "bob", b"y" * 100)
        (first, *_) = await store.pending("bob")
        assert first.sender == "mallory" and await store.delete_nowait("bob", first.msg_id)
        await put(store, msg_id(), "mallory", "bob", b"x")  # its share has room again once acknowledged
        assert await store.waiting("bob") == 3
    finally:
        await store.close()
    reopened = opener(Limits(max_pending=5, max_pending_per_sender=2))
    await reopened.open()  # the shares are counted from what is stored
    try:
        with pytest.raises(QuotaExceeded, match="mallory's share"):
            await put(reopened, msg_id(), "mallory", "bob", b"x")
    finally:
        await reopened.close()


async def test_acks_do_not_spend_the_send_budget() -> None:
    """A node with a send budget of 5 frames acknowledges 300 deliveries without one RATE_LIMITED."""
    async with Relay(relay_config(CA, rate=1, burst=5)) as relay:
        alice, _ = await raw_client(relay, ALICE)
        async with alice:
            await publish_bundle(alice, ALICE)
        ids = [bytes([i // 256, i % 256]) * 8 for i in range(300)]
        for m in ids:
            relay.store.put_nowait(m, "mallory", "bob", b"opaque", 1)
        await relay.store.flush()
        bob, _ = await raw_client(relay, BOB)
        async with bob:
            delivered = 0
            while delivered < len(ids):
                frame = await recv_frame(bob)
                if isinstance(frame, Deliver):
                    delivered += 1
            await bob.send(wire.encode_link(Batch([wire.encode_link(Ack(m)) for m in ids[:200]])))
            await bob.send(wire.encode_link(Batch([wire.encode_link(Ack(m)) for m in ids[200:]])))
            await bob.send(wire.encode_link(Send(b"s" * 16, "alice", b"hi")))  # the send budget is intact
            frame = await recv_frame(bob)
            assert frame == Accepted(b"s" * 16), frame
            assert relay.metrics.refused.labels("rate_limited")._value.get() == 0
            assert await relay.store.waiting("bob") == 0


async def test_a_full_share_refuses_one_sender_with_quota_exceeded() -> None:
    limits = Limits(max_pending_per_sender=3)
    async with Relay(relay_config(CA, limits=limits)) as relay:
        bob, _ = await raw_client(relay, BOB)
        async with bob:
            await publish_bundle(bob, BOB)
        mallory, _ = await raw_client(relay, MALLORY)
        alice, _ = await raw_client(relay, ALICE)
        async with mallory, alice:
            answers = []
            for i in range(4):
                await mallory.send(wire.encode_link(Send(bytes([i]) * 16, "bob", b"spam")))
            while len(answers) < 4:
                frame = await recv_frame(mallory)
                if isinstance(frame, Accepted | Error):
                    answers.append(frame)
            accepted = sorted(a.msg_id for a in answers if isinstance(a, Accepted))
            refused = [a for a in answers if isinstance(a, Error)]
            assert accepted == [bytes([i]) * 16 for i in range(3)]
            assert [(e.code, e.msg_id) for e in refused] == [(ErrorCode.QUOTA_EXCEEDED, bytes([3]) * 16)]
            await alice.send(wire.encode_link(Send(b"a" * 16, "bob", b"hello")))
            while not isinstance(frame := await recv_frame(alice), Accepted):
                pass
            assert frame == Accepted(b"a" * 16)
