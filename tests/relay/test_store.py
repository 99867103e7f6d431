"""The `Store` contract, one suite run against SQLite, a single Redis and a 3-shard Redis Cluster
(real servers on 127.0.0.1: see redis_fixtures)."""

from __future__ import annotations

import asyncio

import pytest

from relay.errors import QuotaExceeded, StoreUnavailable
from relay.redis_store import RedisStore, seq_of, stream_id
from relay.store import MAX_ONETIME_STORED, Envelope, Limits, Store
from tests.support.redis_fixtures import redis_cluster_url, redis_shards, redis_single, redis_url  # noqa: F401 - fixtures
from tests.support.store import Opener, msg_id, opener, prekey, put, store  # noqa: F401 - fixtures, passed by name


async def test_envelopes_wait_in_order_until_acknowledged_and_survive_a_reopen(opener: Opener) -> None:
    store = opener()
    await store.open()
    ids = [msg_id() for _ in range(5)]
    for i, m in enumerate(ids):
        await put(store, m, "alice", "bob", b"opaque %d" % i, 1000 + i)
    await put(store, ids[0], "alice", "bob", b"opaque 0")  # a retransmission: stored once
    assert await store.waiting("bob") == 5 and await store.waiting("alice") == 0
    waiting = await store.pending("bob")
    assert [e.msg_id for e in waiting] == ids
    first = waiting[0]
    assert (first.sender, first.recipient, first.payload, first.stored_at) == ("alice", "bob", b"opaque 0", 1000)
    assert [e.seq for e in waiting] == sorted(e.seq for e in waiting)
    # Reading on from a sequence number, a few at a time.
    assert [e.msg_id for e in await store.pending("bob", after=waiting[1].seq, limit=2)] == ids[2:4]
    # Only the recipient's ACK deletes, and only once.
    assert await store.delete_nowait("alice", ids[0]) is False
    assert await store.delete_nowait("bob", ids[0]) is True
    assert await store.delete_nowait("bob", ids[0]) is False
    await store.close()
    again = opener()
    await again.open()
    try:
        assert [e.msg_id for e in await again.pending("bob")] == ids[1:]
        assert await again.waiting("bob") == 4
        # Once acknowledged, the same msg_id is a new envelope again.
        await put(again, ids[0], "alice", "bob", b"again")
        assert await again.waiting("bob") == 5
    finally:
        await again.close()


async def test_one_envelope_per_sender_and_msg_id_and_an_ack_deletes_the_msg_id(store: Store) -> None:
    m = msg_id()
    await put(store, m, "alice", "bob", b"from alice")
    await put(store, m, "carol", "bob", b"from carol")  # another sender's envelope, the same id
    await put(store, m, "alice", "bob", b"again")  # alice's retransmission: stored once
    stored = [(e.sender, e.payload) for e in await store.pending("bob")]
    assert stored == [("alice", b"from alice"), ("carol", b"from carol")]
    assert await store.delete_nowait("bob", m) is True
    assert await store.waiting("bob") == 0 and await store.pending("bob") == []


async def test_the_quota_counts_envelopes_and_bytes_per_recipient(opener: Opener) -> None:
    store = opener(Limits(max_pending=3, max_pending_bytes=100))
    await store.open()
    try:
        for _ in range(3):
            await put(store, msg_id(), "alice", "bob", b"x")
        with pytest.raises(QuotaExceeded, match="3 envelopes"):
            await put(store, msg_id(), "alice", "bob", b"x")
        await put(store, msg_id(), "alice", "carol", b"y" * 60)  # another mailbox, its own quota
        with pytest.raises(QuotaExceeded, match="100 bytes"):
            await put(store, msg_id(), "alice", "carol", b"y" * 41)
        (first,) = await store.pending("carol")
        assert await store.delete_nowait("carol", first.msg_id)
        await put(store, msg_id(), "alice", "carol", b"y" * 100)  # room again once acknowledged
        assert await store.waiting("bob") == 3 and await store.waiting("carol") == 1
    finally:
        await store.close()


async def test_envelopes_past_the_age_limit_are_purged(opener: Opener) -> None:
    store = opener(Limits(max_age=60))
    await store.open()
    try:
        old, young = msg_id(), msg_id()
        await put(store, old, "alice", "bob", b"old", at=1_000)
        await put(store, msg_id(), "alice", "carol", b"old", at=2_000)
        await put(store, young, "alice", "bob", b"young", at=100_000)
        assert await store.purge_expired(now_ms=61_500) == 1  # only bob's first is over a minute old
        assert await store.purge_expired(now_ms=62_500) == 1
        assert [e.msg_id for e in await store.pending("bob")] == [young]
        assert await store.waiting("carol") == 0
        # Purged envelopes give their room back.
        assert await store.delete_nowait("bob", old) is False
    finally:
        await store.close()


async def test_each_onetime_prekey_is_handed_out_once_even_when_asked_at_once(store: Store, opener: Opener) -> None:
    assert await store.take_bundle("bob") is None and not await store.known("bob")
    await store.put_bundle("bob", b"bundle-1", [prekey(i) for i in range(40)], replace=True)
    assert await store.known("bob") and await store.onetime_left("bob") == 40
    # Two stores (two relays) on the same data, 50 fetches at once: 40 prekeys, each once.
    other = opener()
    await other.open()
    try:
        taken = await asyncio.gather(*(s.take_bundle("bob") for _ in range(25) for s in (store, other)))
    finally:
        await other.close()
    prekeys = [t[1] for t in taken if t is not None and t[1] is not None]
    assert sorted(prekeys, key=lambda p: p.key_id) == [prekey(i) for i in range(40)]
    assert all(t is not None and t[0] == b"bundle-1" for t in taken)
    assert await store.onetime_left("bob") == 0
    # Adding keeps what is there; replacing drops it; never more than MAX_ONETIME_STORED, the newest.
    await store.put_bundle("bob", b"bundle-2", [prekey(100), prekey(101)], replace=False)
    await store.put_bundle("bob", b"bundle-2", [prekey(102)], replace=False)
    assert await store.take_bundle("bob") == (b"bundle-2", prekey(100), 2)
    await store.put_bundle("bob", b"bundle-3", [prekey(i) for i in range(MAX_ONETIME_STORED + 5)], replace=True)
    assert await store.take_bundle("bob") == (b"bundle-3", prekey(5), MAX_ONETIME_STORED - 1)


async def test_the_crl_feed_never_goes_back(store: Store, opener: Opener) -> None:
    assert await store.get_crl() is None
    assert await store.put_crl(5, b"crl-5")
    assert not await store.put_crl(4, b"crl-4")
    assert await store.put_crl(5, b"crl-5")  # the same one again is no change
    # Numbers beyond 2**63 (CRL numbers run to 2**159) compare as numbers, not as text.
    assert await store.put_crl(2**100, b"big")
    assert not await store.put_crl(2**99 * 3 // 2, b"smaller")
    assert not await store.put_crl(9 * 10**20, b"shorter but 'greater' as text")
    other = opener()
    await other.open()
    try:
        assert not await other.put_crl(6, b"crl-6")  # another relay: the same rule
        assert await other.get_crl() == (2**100, b"big")
    finally:
        await other.close()


async def test_a_store_that_is_not_open_refuses_writes(opener: Opener) -> None:
    store = opener()
    with pytest.raises(StoreUnavailable):
        store.put_nowait(msg_id(), "alice", "bob", b"x", 0)


async def test_redis_is_unreachable_gives_store_unavailable() -> None:
    store = RedisStore("redis://127.0.0.1:1/0")
    with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
        await store.open()
    await store.close()


def test_sequence_numbers_keep_the_stream_order() -> None:
    assert seq_of(b"1700000000000-0") < seq_of("1700000000000-1") < seq_of("1700000000001-0")
    assert stream_id(seq_of("1700000000000-7")) == "1700000000000-7"
    assert repr(Envelope(1, bytes(16), "a", "b", b"x", 0)).startswith("Envelope(#1")


async def test_a_signed_epoch_is_kept_per_node_and_the_previous_one_given_back(store: Store) -> None:
    assert await store.swap_epoch("alice", None) is None
    assert await store.swap_epoch("alice", b"\x01" * 72) is None
    assert await store.swap_epoch("bob", b"\x09" * 72) is None  # one per node
    assert await store.swap_epoch("alice", b"\x02" * 72) == b"\x01" * 72
    assert await store.swap_epoch("alice", None) == b"\x02" * 72  # None keeps it
    assert await store.swap_epoch("alice", None) == b"\x02" * 72
