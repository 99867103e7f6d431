"""Several relays, one system: two relays sharing a Redis (single server and a 3-shard Redis
Cluster, real servers on 127.0.0.1), real nodes chatting across them, and the faults: Redis
SIGKILLed and restarted, prekeys fetched at once through two relays, a CRL rolled back through
the other relay."""

from __future__ import annotations

import asyncio
import contextlib
import os
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from kmsnet.cli import cli
from kmsnet.exits import BAD_INPUT, UNREACHABLE
from node.node import Node
from protocol import certs, wire
from protocol.link import (
    Accepted,
    Ack,
    Auth,
    BundleReply,
    Challenge,
    CrlFeed,
    Deliver,
    Error,
    ErrorCode,
    FetchBundle,
    PublishCrl,
    Send,
    auth_signed_bytes,
)
from relay import server
from relay.errors import StoreUnavailable
from relay.server import Relay
from tests.support.lab import clock, make_node, next_message, publish_crl, raw_client, recv_frame, relay_config, running
from tests.support.pki import ALICE, BOB, CA, MALLORY
from tests.support.redis_fixtures import redis_cluster_url, redis_server, redis_shards, redis_single, redis_url  # noqa: F401 - fixtures
from tests.support.relay_helpers import expect_closed, expect_error, publish_bundle


@pytest.fixture(params=["redis", "redis-cluster"])
def shared(request: pytest.FixtureRequest) -> str:
    """The URL of an empty Redis (single server, or one node of a 3-shard cluster)."""
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url"))


@contextlib.asynccontextmanager
async def two_relays(url: str) -> AsyncIterator[tuple[Relay, Relay]]:
    """Two relays on ephemeral ports, each named for its own (127.0.0.1:PORT), sharing the Redis at `url`."""
    async with (
        Relay(relay_config(CA, store_path=url)) as a,
        Relay(relay_config(CA, store_path=url)) as b,
    ):
        yield a, b


async def until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.02)


async def chat(one: Node, other: Node, rounds: int, label: str) -> None:
    for i in range(rounds):
        await one.send(other.name, f"{label} ping {i}")
        assert (await next_message(other)).text == f"{label} ping {i}"
        await other.send(one.name, f"{label} pong {i}")
        assert (await next_message(one)).text == f"{label} pong {i}"


async def test_alice_on_one_relay_and_bob_on_the_other_chat_and_bob_moves_mid_conversation(shared: str) -> None:
    async with two_relays(shared) as (a, b):
        await publish_crl(a, CA, CA.crl())
        alice = make_node(CA, ALICE, a.url)
        bob = make_node(CA, BOB, b.url)
        async with running(alice, bob):
            await until(lambda: b.store.known("alice"))
            await until(lambda: a.store.known("bob"))
            assert a.connected() == ["alice"] and b.connected() == ["bob"]
            await chat(alice, bob, 5, "across")
            # Delivered live, not picked up later: nothing waits in either mailbox.
            await until(lambda: _empty(a, "alice", "bob"))
        # Bob moves to alice's relay (his keystore, sessions included, goes with him).
        moved = Node(bob.keystore, relay_url=a.url, clock=clock)
        alice2 = Node(alice.keystore, relay_url=a.url, clock=clock)
        async with running(alice2, moved):
            assert a.connected() == ["alice", "bob"] and b.connected() == []
            await chat(alice2, moved, 3, "same relay")


async def _empty(relay: Relay, *names: str) -> bool:
    return all([await relay.store.waiting(n) == 0 for n in names])


async def test_an_envelope_is_pushed_live_to_the_other_relay_and_the_newest_connection_wins_across_relays(
    shared: str,
) -> None:
    async with two_relays(shared) as (a, b):
        bob_on_a, _ = await raw_client(a, BOB)
        await publish_bundle(bob_on_a, BOB)
        await until(lambda: b.store.known("bob"))
        # Bob connects to relay B: his connection to relay A is closed, wherever it was.
        bob_on_b, _ = await raw_client(b, BOB)
        await expect_closed(bob_on_a)
        assert bob_on_a.close_reason == "replaced by a newer connection"
        await until(lambda: _connected(a, []))
        alice, _ = await raw_client(a, ALICE)
        async with alice, bob_on_b:
            ids = [os.urandom(16) for _ in range(20)]
            for m in ids:
                await alice.send(wire.encode_link(Send(m, "bob", b"opaque")))
            assert [await recv_frame(alice) for _ in ids] == [Accepted(m) for m in ids]
            delivered = [await recv_frame(bob_on_b) for _ in ids]
            assert [d.msg_id for d in delivered] == ids  # type: ignore[union-attr]
            assert all(isinstance(d, Deliver) and d.sender == "alice" for d in delivered)
            for m in ids:
                await bob_on_b.send(wire.encode_link(Ack(m)))
            await until(lambda: _waiting(b, "bob", 0))
        # Each relay announces itself (a key that expires unless renewed); /healthz says the store answers.
        assert a._healthy and b._healthy
        beats = await _heartbeats(a)
        names = [k.decode().removeprefix("kmsnet:relay:").rsplit(":", 1)[0] for k in beats]
        assert sorted(names) == sorted([a.name, b.name]) and a.name != b.name
        assert 0 < await a.store.client.ttl(beats[0]) <= 15  # type: ignore[attr-defined]
        await b.close()
        # A relay that stops leaves nothing behind: its heartbeat is gone, and nothing else was its own.
        assert len(await _heartbeats(a)) == 1


async def _heartbeats(relay: Relay) -> list[bytes]:
    client = relay.store.client  # type: ignore[attr-defined]
    return sorted([k async for k in client.scan_iter(match="kmsnet:relay:*")])


async def _connected(relay: Relay, names: list[str]) -> bool:
    return relay.connected() == names


async def _waiting(relay: Relay, name: str, count: int) -> bool:
    return await relay.store.waiting(name) == count


async def test_onetime_prekeys_fetched_at_once_through_two_relays_are_never_handed_out_twice(shared: str) -> None:
    async with two_relays(shared) as (a, b):
        bob, _ = await raw_client(a, BOB)
        async with bob:
            await publish_bundle(bob, BOB, onetime=20)
            await until(lambda: b.store.known("bob"))
        alice, _ = await raw_client(a, ALICE)
        mallory, _ = await raw_client(b, MALLORY)
        async with alice, mallory:
            # 15 requests on each relay, all sent before any answer is read.
            for ws in (alice, mallory):
                for request in range(15):
                    await ws.send(wire.encode_link(FetchBundle(request, "bob")))
            handed: list[int | None] = []
            for ws in (alice, mallory):
                for _ in range(15):
                    reply = await recv_frame(ws)
                    assert isinstance(reply, BundleReply) and reply.bundle is not None
                    handed.append(wire.decode(reply.bundle).otpk_id)  # type: ignore[union-attr]
        given = [h for h in handed if h is not None]
        assert sorted(given) == list(range(1, 21))  # all 20, each once
        assert handed.count(None) == 10  # then the bundle alone


async def test_an_older_crl_through_the_second_relay_is_refused_and_the_newer_one_reaches_its_nodes(
    shared: str,
) -> None:
    async with two_relays(shared) as (a, b):
        alice, _ = await raw_client(b, ALICE)
        async with alice:
            await publish_crl(a, CA, CA.crl(number=5))
            # Published through A, pushed by B to its node.
            feed = await recv_frame(alice)
            assert isinstance(feed, CrlFeed) and feed.crl == CA.crl(number=5)
            ca, _ = await raw_client(b, CA.enrol("ca", 0xCA), ca=CA)
            async with ca:
                assert await recv_frame(ca) == CrlFeed(CA.crl(number=5))
                await ca.send(wire.encode_link(PublishCrl(CA.crl(number=4))))
                await expect_error(ca, ErrorCode.MALFORMED)
        assert await b.store.get_crl() == (5, CA.crl(number=5))


async def test_a_relay_whose_feed_lags_still_refuses_an_older_crl(shared: str) -> None:
    """Relay B misses the announcement of CRL 5 (its feed still at 3): the store's compare-and-set
    refuses 4 all the same, and B catches up to 5."""
    async with two_relays(shared) as (a, b):
        await publish_crl(b, CA, CA.crl(number=3))
        b.on_crl = lambda: None  # type: ignore[method-assign] - deaf to the bus
        await publish_crl(a, CA, CA.crl(number=5))
        assert b._feed.highest_number == 3
        ca, _ = await raw_client(b, CA.enrol("ca", 0xCA), ca=CA)
        async with ca:
            await recv_frame(ca)  # the feed it holds
            await ca.send(wire.encode_link(PublishCrl(CA.crl(number=4))))
            # Refused, and B caught up with 5 and pushed it (the feed first).
            feed, error = await recv_frame(ca), await recv_frame(ca)
            assert feed == CrlFeed(CA.crl(number=5))
            assert isinstance(error, Error) and error.code == ErrorCode.MALFORMED and "higher number" in error.text
        assert await a.store.get_crl() == (5, CA.crl(number=5))


async def test_redis_killed_and_restarted_every_accepted_envelope_arrives_exactly_once(tmp_path: Path) -> None:
    """Alice (on relay A) sends 150 envelopes to bob (on relay B) one by one, retrying whatever is not
    ACCEPTED; redis-server is SIGKILLed after 50 and restarted. Bob gets each one exactly once."""
    with redis_server(tmp_path / "redis") as redis:
        async with two_relays(redis.url) as (a, b):
            bob, _ = await raw_client(b, BOB)
            await publish_bundle(bob, BOB)
            await until(lambda: a.store.known("bob"))
            received: list[bytes] = []

            async def receive() -> None:
                while True:
                    frame = await recv_frame(bob, timeout=30)
                    if isinstance(frame, Deliver):
                        received.append(frame.msg_id)
                        await bob.send(wire.encode_link(Ack(frame.msg_id)))

            receiving = asyncio.create_task(receive())

            async def restart_later() -> None:
                await asyncio.sleep(0.5)
                await asyncio.to_thread(redis.start)

            alice, _ = await raw_client(a, ALICE)
            accepted: list[bytes] = []
            refused = 0
            async with alice:
                for i in range(150):
                    if i == 50:
                        redis.kill()
                        restarted = asyncio.create_task(restart_later())
                    m = os.urandom(16)
                    while True:
                        await alice.send(wire.encode_link(Send(m, "bob", b"envelope %d" % i)))
                        answer = await recv_frame(alice, timeout=30)
                        if answer == Accepted(m):
                            accepted.append(m)
                            break
                        assert isinstance(answer, Error) and answer.code == ErrorCode.UNAVAILABLE, answer
                        refused += 1
                        await asyncio.sleep(0.05)
                await restarted
                await until(lambda: _count(received, 150), timeout=30)
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await receiving
            await bob.close()
    assert refused > 0  # the outage was real: some sends had to wait for Redis
    counts = Counter(received)
    assert set(counts) == set(accepted) and len(accepted) == 150
    assert max(counts.values()) == 1


async def _count(items: list[bytes], n: int) -> bool:
    return len(items) >= n


async def test_a_relay_without_its_redis_refuses_to_start() -> None:
    relay = Relay(relay_config(CA, store_path="redis://127.0.0.1:1/0"))
    with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
        await relay.start()


def test_the_command_line_takes_a_redis_url_and_says_in_one_line_when_redis_is_not_there(tmp_path: Path) -> None:
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(certs.certificate_pem(CA.root))
    args = ["relay", "--ca-cert", str(ca_pem), "--port", "0", "--store", "redis://127.0.0.1:1/0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == UNREACHABLE
    assert result.output.strip() == "error: relay: cannot reach Redis at redis://127.0.0.1:1/0: connection refused"
    result = CliRunner().invoke(cli, ["relay", "--ca-cert", str(ca_pem), "--store", "rediss:///0"])
    assert result.exit_code == BAD_INPUT and "needs a host" in result.output


async def test_a_burst_of_nodes_connecting_at_once_is_served_not_refused(redis_url: str) -> None:
    """More nodes at once than the Redis client has connections: they queue for Redis, none is refused."""
    async with Relay(relay_config(CA, store_path=redis_url)) as relay:
        people = [CA.enrol(f"n{i}", 1000 + i) for i in range(150)]
        connections = await asyncio.gather(*(raw_client(relay, who) for who in people))
        assert len(relay.connected()) == 150
        for ws, welcome in connections:
            assert welcome.pending == 0
            await ws.close()


async def test_without_redis_a_relay_says_so_on_healthz_and_turns_nodes_away_until_it_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "HEARTBEAT_INTERVAL", 0.05)
    with redis_server(tmp_path / "redis") as redis:
        async with Relay(relay_config(CA, store_path=redis.url)) as relay:
            health = relay.url.replace("ws://", "http://") + "/healthz"

            def status() -> int:
                try:
                    with urllib.request.urlopen(health, timeout=5) as response:
                        return int(response.status)
                except urllib.error.HTTPError as exc:
                    return exc.code

            assert await asyncio.to_thread(status) == 200
            redis.kill()
            await until(lambda: _status_is(status, 503))
            assert relay.metrics.store_up._value.get() == 0
            # A node arriving now is told to come back later (ERROR UNAVAILABLE, close 1013).
            ws = await connect(relay.url)
            challenge = wire.decode_link(await ws.recv())
            assert isinstance(challenge, Challenge)
            signature = BOB.identity.sign(auth_signed_bytes(challenge.nonce, challenge.relay, relay.url))
            await ws.send(wire.encode_link(Auth(BOB.cert, signature)))
            await expect_error(ws, ErrorCode.UNAVAILABLE)
            await expect_closed(ws)
            assert ws.close_code == 1013
            await asyncio.to_thread(redis.start)
            await until(lambda: _status_is(status, 200))

            async def welcomed() -> bool:
                # /healthz is green once the store answers; the bus's subscriber comes back on its own
                # backoff, and until then a node is told to try again (1013), as real nodes do.
                try:
                    bob, _ = await raw_client(relay, BOB)
                except (AssertionError, ConnectionClosed):
                    return False
                await bob.close()
                return True

            await until(welcomed, timeout=20)


async def _status_is(status, code: int) -> bool:  # type: ignore[no-untyped-def]
    return await asyncio.to_thread(status) == code
