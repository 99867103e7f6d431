"""The relay on a real WebSocket server (127.0.0.1, ephemeral port): authentication, routing,
store-and-forward, bundles, the CRL feed, and refusal of everything malformed."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from protocol import wire
from protocol.link import (
    MAX_LINK_FRAME,
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
    PublishBundle,
    PublishCrl,
    Send,
    auth_signed_bytes,
)
from relay import server
from relay.errors import StoreUnavailable
from relay.server import Relay
from relay.store import Envelope, Limits, SqliteStore
from tests.support.lab import make_node, next_message, publish_crl, raw_client, recv_frame, relay_config, running
from tests.support.pki import ALICE, BOB, CA, MALLORY, ROGUE_CA, make_prekeys
from tests.support.relay_helpers import expect_closed, expect_error, publish_bundle


def msg_id() -> bytes:
    return os.urandom(16)


# --- authentication -------------------------------------------------------------------------------


async def test_a_node_authenticates_with_its_certificate_and_a_signed_challenge() -> None:
    async with Relay(relay_config(CA)) as relay:
        ws, welcome = await raw_client(relay, ALICE)
        async with ws:
            assert (welcome.name, welcome.pending, welcome.onetime) == ("alice", 0, 0)
            assert relay.connected() == ["alice"]


@pytest.mark.parametrize("attack", ["wrong-key", "rogue-ca", "other-nonce", "not-auth", "garbage"])
async def test_nobody_connects_as_another_node(attack: str) -> None:
    async with Relay(relay_config(CA)) as relay:
        ws = await connect(relay.url, compression=None)
        async with ws:
            challenge = wire.decode_link(await ws.recv())
            assert isinstance(challenge, Challenge)
            signed = auth_signed_bytes(challenge.nonce, challenge.relay, relay.url)
            if attack == "wrong-key":  # mallory presents bob's certificate, signs with her key
                frame = wire.encode_link(Auth(BOB.cert, MALLORY.identity.sign(signed)))
            elif attack == "rogue-ca":  # a lookalike CA's certificate for bob
                rogue = ROGUE_CA.enrol("bob", 0x1002)
                frame = wire.encode_link(Auth(rogue.cert, rogue.identity.sign(signed)))
            elif attack == "other-nonce":  # a signature over another challenge (a replayed AUTH)
                replayed = auth_signed_bytes(bytes(32), "x", relay.url)
                frame = wire.encode_link(Auth(BOB.cert, BOB.identity.sign(replayed)))
            elif attack == "not-auth":
                frame = wire.encode_link(FetchBundle(1, "bob"))
            else:
                frame = b"\x93\x01\x21"
            await ws.send(frame)
            await expect_error(ws, ErrorCode.AUTH_FAILED)
            await expect_closed(ws)
        assert relay.connected() == []


async def test_a_silent_client_is_dropped_after_the_auth_timeout() -> None:
    async with Relay(relay_config(CA, auth_timeout=0.2)) as relay:
        ws = await connect(relay.url, compression=None)
        async with ws:
            await ws.recv()  # the challenge; then say nothing
            await expect_closed(ws)


async def test_a_revoked_node_is_refused_at_the_door() -> None:
    async with Relay(relay_config(CA)) as relay:
        await publish_crl(relay, CA, CA.crl([MALLORY.serial]))
        with pytest.raises((AssertionError, ConnectionClosed)):
            await raw_client(relay, MALLORY)
        ws, _ = await raw_client(relay, ALICE)
        await ws.close()


# --- refusing bad frames, serving everyone else --------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xc1", ErrorCode.MALFORMED),  # not msgpack
        (msgpack.packb([1, 99]), ErrorCode.UNKNOWN_TYPE),
        (msgpack.packb([1, 38, b"short", "bob", b"x"]), ErrorCode.MALFORMED),  # SEND with a bad msg_id
        (wire.encode_link(Accepted(bytes(16))), ErrorCode.UNKNOWN_TYPE),  # a relay-to-node frame
        (b"x" * (MAX_LINK_FRAME + 1), ErrorCode.TOO_LARGE),
        ("text frame", ErrorCode.MALFORMED),
    ],
)
async def test_a_bad_frame_gets_an_error_and_a_close(payload: bytes | str, code: ErrorCode) -> None:
    async with Relay(relay_config(CA)) as relay:
        ws, _ = await raw_client(relay, MALLORY)
        async with ws:
            await ws.send(payload)
            await expect_error(ws, code)
            await expect_closed(ws)


async def test_bundles_only_for_yourself_and_each_onetime_prekey_handed_out_once() -> None:
    async with Relay(relay_config(CA)) as relay:
        bob_ws, _ = await raw_client(relay, BOB)
        mallory_ws, _ = await raw_client(relay, MALLORY)
        async with bob_ws, mallory_ws:
            # Mallory uploads a bundle carrying bob's certificate: refused.
            prekeys = make_prekeys(BOB, onetime=1)
            await mallory_ws.send(wire.encode_link(PublishBundle(wire.encode(prekeys.bundle), [], 1)))
            await expect_error(mallory_ws, ErrorCode.NOT_ALLOWED)
            await publish_bundle(bob_ws, BOB, onetime=2)
            handed = []
            for request in (1, 2, 3):
                await mallory_ws.send(wire.encode_link(FetchBundle(request, "bob")))
                reply = await recv_frame(mallory_ws)
                assert isinstance(reply, BundleReply) and reply.request == request and reply.bundle is not None
                bundle = wire.decode(reply.bundle)
                handed.append(bundle.otpk_id)  # type: ignore[union-attr]
            assert handed == [1, 2, None]  # each once, then the bundle alone
            await mallory_ws.send(wire.encode_link(FetchBundle(4, "nobody")))
            reply = await recv_frame(mallory_ws)
            assert isinstance(reply, BundleReply) and reply.bundle is None


async def test_store_and_forward_until_acknowledged(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        bob_ws, _ = await raw_client(relay, BOB)
        await publish_bundle(bob_ws, BOB)
        await bob_ws.close()
        alice_ws, _ = await raw_client(relay, ALICE)
        async with alice_ws:
            ids = [msg_id() for _ in range(3)]
            for i, m in enumerate(ids):
                await alice_ws.send(wire.encode_link(Send(m, "bob", b"opaque %d" % i)))
                assert await recv_frame(alice_ws) == Accepted(m)
            # A retransmission is accepted again but stored once.
            await alice_ws.send(wire.encode_link(Send(ids[0], "bob", b"opaque 0")))
            assert await recv_frame(alice_ws) == Accepted(ids[0])
            await alice_ws.send(wire.encode_link(Send(msg_id(), "nobody", b"x")))
            await expect_error(alice_ws, ErrorCode.UNKNOWN_RECIPIENT)
        # Bob connects: the three arrive in order; he acknowledges only the first.
        bob_ws, welcome = await raw_client(relay, BOB)
        assert welcome.pending == 3
        delivered = [await recv_frame(bob_ws) for _ in range(3)]
        assert [d.msg_id for d in delivered] == ids  # type: ignore[union-attr]
        assert all(isinstance(d, Deliver) and d.sender == "alice" for d in delivered)
        await bob_ws.send(wire.encode_link(Ack(ids[0])))
        await asyncio.sleep(0.1)
        await bob_ws.close()
    # The relay restarts from its file: what was not acknowledged is still there.
    async with Relay(relay_config(CA, tmp_path)) as relay:
        bob_ws, welcome = await raw_client(relay, BOB)
        async with bob_ws:
            assert welcome.pending == 2
            again = [await recv_frame(bob_ws) for _ in range(2)]
            assert [d.msg_id for d in again] == ids[1:]  # type: ignore[union-attr]


async def test_nobody_fetches_another_nodes_mail() -> None:
    async with Relay(relay_config(CA)) as relay:
        bob_ws, _ = await raw_client(relay, BOB)
        await publish_bundle(bob_ws, BOB)
        await bob_ws.close()
        alice_ws, _ = await raw_client(relay, ALICE)
        async with alice_ws:
            await alice_ws.send(wire.encode_link(Send(msg_id(), "bob", b"for bob only")))
            await recv_frame(alice_ws)
        mallory_ws, welcome = await raw_client(relay, MALLORY)
        async with mallory_ws:
            assert welcome.pending == 0
            # An ACK for bob's message from mallory deletes nothing.
            await mallory_ws.send(wire.encode_link(Ack(bytes(16))))
            with pytest.raises(TimeoutError):
                await recv_frame(mallory_ws, timeout=0.3)
        assert relay.store.mailbox_size("bob") == 1


async def test_quota_and_rate_limits() -> None:
    config = relay_config(CA, limits=Limits(max_pending=2), rate=50, burst=5)
    async with Relay(config) as relay:
        bob_ws, _ = await raw_client(relay, BOB)
        await publish_bundle(bob_ws, BOB)
        await bob_ws.close()
        ws, _ = await raw_client(relay, ALICE)
        async with ws:
            results = []
            for _ in range(3):
                m = msg_id()
                await ws.send(wire.encode_link(Send(m, "bob", b"x")))
                results.append(await recv_frame(ws))
            assert isinstance(results[2], Error) and results[2].code == ErrorCode.QUOTA_EXCEEDED
            # A burst beyond the bucket is refused frame by frame, with the msg_id to retry (ACKs
            # have a budget of their own: bundle requests spend this one).
            for i in range(20):
                await ws.send(wire.encode_link(FetchBundle(i, "bob")))
            m = msg_id()
            await ws.send(wire.encode_link(Send(m, "bob", b"x")))
            while not isinstance(error := await recv_frame(ws), Error):
                pass
            assert error.code == ErrorCode.RATE_LIMITED and error.msg_id in (None, m)


async def test_crl_feed_comes_only_from_the_ca_and_never_goes_back() -> None:
    async with Relay(relay_config(CA)) as relay:
        alice_ws, _ = await raw_client(relay, ALICE)
        async with alice_ws:
            await alice_ws.send(wire.encode_link(PublishCrl(CA.crl(number=5))))
            await expect_error(alice_ws, ErrorCode.NOT_ALLOWED)
            await publish_crl(relay, CA, CA.crl(number=5))
            feed = await recv_frame(alice_ws)
            assert isinstance(feed, CrlFeed) and feed.crl == CA.crl(number=5)
        ca_ws, _ = await raw_client(relay, CA.enrol("ca", 0xCA))
        async with ca_ws:
            assert isinstance(await recv_frame(ca_ws), CrlFeed)  # pushed on connect
            await ca_ws.send(wire.encode_link(PublishCrl(CA.crl(number=4))))
            await expect_error(ca_ws, ErrorCode.MALFORMED)  # rollback refused by the relay too
            await ca_ws.send(wire.encode_link(PublishCrl(ROGUE_CA.crl(number=9))))
            await expect_error(ca_ws, ErrorCode.MALFORMED)  # not signed by the pinned CA


async def test_health_and_metrics_share_the_port() -> None:
    async with Relay(relay_config(CA)) as relay:
        http = relay.url.replace("ws://", "http://")

        def get(path: str) -> tuple[int, str]:
            with urllib.request.urlopen(http + path, timeout=5) as response:
                return response.status, response.read().decode()

        status, body = await asyncio.to_thread(get, "/healthz")
        assert (status, body) == (200, "ok\n")
        ws, _ = await raw_client(relay, ALICE)
        await ws.close()
        status, body = await asyncio.to_thread(get, "/metrics")
        assert status == 200 and "kmsnet_relay_connected_nodes" in body and "kmsnet_relay_refused_total" in body


async def test_a_flood_of_bad_frames_does_not_stop_two_nodes_chatting(tmp_path: Path) -> None:
    """1,000 malformed and oversized frames from raw clients while alice and bob keep chatting."""
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        bob = make_node(CA, BOB, relay.url)

        async def flood() -> int:
            sent = 0
            bad = [b"\xc1", msgpack.packb([1, 77]), msgpack.packb([2, 38]), b"y" * (MAX_LINK_FRAME + 10)]
            while sent < 1000:
                ws, _ = await raw_client(relay, MALLORY)
                try:
                    for frame in bad:
                        await ws.send(frame)
                        sent += 1
                except ConnectionClosed:
                    pass
                await ws.close()
            return sent

        async with running(alice, bob):
            flooding = asyncio.create_task(flood())
            for i in range(20):
                await alice.send("bob", f"ping {i}")
                assert (await next_message(bob)).text == f"ping {i}"
                await bob.send("alice", f"pong {i}")
                assert (await next_message(alice)).text == f"pong {i}"
            assert await flooding >= 1000
        assert relay.metrics.refused.labels("malformed")._value.get() > 0


async def test_a_cancelled_flush_does_not_cancel_other_connections_writes(tmp_path: Path) -> None:
    """A node's writer waits for the store's queued writes; when that node goes away the wait is
    cancelled, and that must not cancel the writes of others (their ACCEPTED would never come)."""
    store = SqliteStore(tmp_path / "relay.db")
    await store.open()
    try:
        envelopes = [store.put_nowait(msg_id(), "alice", "bob", b"x", 0) for _ in range(50)]
        waiting = asyncio.create_task(store.flush())
        await asyncio.sleep(0)
        waiting.cancel()
        for _, durable in envelopes:
            await durable  # raises CancelledError if the cancel reached it
        assert store.mailbox_size("bob") == 50
        assert len(await store.pending("bob")) == 50
    finally:
        await store.close()


# --- answers wait for the commit; a node that does not read is bounded ------------------------------


class GatedStore(SqliteStore):
    """A store whose commits wait while `gate` is clear (on the store's thread, like a slow disk)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.gate.set()

    def _batch(self, ops: list[Any]) -> list[tuple[Any, BaseException | None]]:
        assert self.gate.wait(10)
        return super()._batch(ops)


def hold_writes_to(relay: Relay, name: str) -> asyncio.Event:
    """Make the relay's writes to `name` wait until the returned event is set (a node that does not read)."""
    gate = asyncio.Event()
    flush = relay._flush

    async def held(peer: Any, frames: list[bytes]) -> None:
        if peer.name == name:
            await gate.wait()
        await flush(peer, frames)

    relay._flush = held  # type: ignore[method-assign]
    return gate


async def test_accepted_only_once_stored_though_delivered_at_once(tmp_path: Path) -> None:
    store = GatedStore(tmp_path / "relay.db")
    async with Relay(relay_config(CA), store=store) as relay:
        bob_ws, _ = await raw_client(relay, BOB)
        alice_ws, _ = await raw_client(relay, ALICE)
        async with alice_ws, bob_ws:
            await publish_bundle(bob_ws, BOB)
            while not await relay.store.known("bob"):
                await asyncio.sleep(0.01)
            store.gate.clear()
            m = msg_id()
            await alice_ws.send(wire.encode_link(Send(m, "bob", b"opaque")))
            delivered = await recv_frame(bob_ws)  # pushed while it is being written
            assert isinstance(delivered, Deliver) and delivered.msg_id == m
            with pytest.raises(TimeoutError):
                await recv_frame(alice_ws, timeout=0.3)
            store.gate.set()
            assert await recv_frame(alice_ws) == Accepted(m)


async def test_an_ack_is_deleted_though_the_connection_and_the_relay_close_at_once(tmp_path: Path) -> None:
    store = GatedStore(tmp_path / "relay.db")
    async with Relay(relay_config(CA), store=store) as relay:
        bob_ws, _ = await raw_client(relay, BOB)
        await publish_bundle(bob_ws, BOB)
        alice_ws, _ = await raw_client(relay, ALICE)
        async with alice_ws:
            m = msg_id()
            await alice_ws.send(wire.encode_link(Send(m, "bob", b"opaque")))
            assert await recv_frame(alice_ws) == Accepted(m)
        assert isinstance(await recv_frame(bob_ws), Deliver)
        store.gate.clear()
        await bob_ws.send(wire.encode_link(Ack(m)))
        await bob_ws.close()
        await asyncio.sleep(0.1)
        # The relay shuts down with the delete still waiting for its commit.
        threading.Timer(0.3, store.gate.set).start()
    assert relay.metrics.acked._value.get() == 1
    async with Relay(relay_config(CA, tmp_path)) as relay:
        bob_ws, welcome = await raw_client(relay, BOB)
        await bob_ws.close()
        assert welcome.pending == 0


async def test_a_node_that_does_not_read_stalls_nobody_and_gets_its_mail_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "MAX_QUEUED", 4)
    async with Relay(relay_config(CA)) as relay:
        bob_ws, _ = await raw_client(relay, BOB)
        await publish_bundle(bob_ws, BOB)
        gate = hold_writes_to(relay, "bob")
        alice_ws, _ = await raw_client(relay, ALICE)
        async with alice_ws, bob_ws:
            ids = [msg_id() for _ in range(30)]
            for m in ids:
                await alice_ws.send(wire.encode_link(Send(m, "bob", b"opaque")))
            for m in ids:
                assert await recv_frame(alice_ws) == Accepted(m)
            assert len(relay._peers["bob"].outbox) <= 4  # the rest waits in the store
            gate.set()
            delivered = [await recv_frame(bob_ws) for _ in ids]
            assert [d.msg_id for d in delivered] == ids  # type: ignore[union-attr]
            with pytest.raises(TimeoutError):
                await recv_frame(bob_ws, timeout=0.2)  # and each once
            m = msg_id()
            await alice_ws.send(wire.encode_link(Send(m, "bob", b"live again")))
            assert (await recv_frame(bob_ws)).msg_id == m  # type: ignore[union-attr]


async def test_a_node_that_does_not_read_its_answers_is_not_read_either(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "MAX_QUEUED", 4)
    async with Relay(relay_config(CA)) as relay:
        gate = hold_writes_to(relay, "alice")
        ws, _ = await raw_client(relay, ALICE)
        async with ws:
            for request in range(40):
                await ws.send(wire.encode_link(FetchBundle(request, "nobody")))
            await asyncio.sleep(0.3)
            peer = relay._peers["alice"]
            assert len(peer.outbox) <= 4
            assert relay.metrics.frames.labels("FetchBundle")._value.get() <= 6
            gate.set()
            replies = [await recv_frame(ws) for _ in range(40)]
            assert [r.request for r in replies] == list(range(40))  # type: ignore[union-attr]


class FailingStore(SqliteStore):
    """A store whose envelope writes fail with `failure`."""

    def __init__(self, failure: Exception) -> None:
        super().__init__(":memory:")
        self.failure = failure

    def put_nowait(
        self, msg_id: bytes, sender: str, recipient: str, payload: bytes, stored_at: int
    ) -> tuple[Envelope | None, asyncio.Future[None]]:
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(self.failure)
        return None, failed


async def test_a_store_failure_is_answered_and_a_bug_of_ours_ends_the_connection() -> None:
    async with Relay(relay_config(CA), store=FailingStore(StoreUnavailable("disk full"))) as relay:
        ws, _ = await raw_client(relay, ALICE)
        async with ws:
            await publish_bundle(ws, ALICE)
            m = msg_id()
            await ws.send(wire.encode_link(Send(m, "alice", b"x")))
            error = await expect_error(ws, ErrorCode.UNAVAILABLE)
            assert error.msg_id == m
    async with Relay(relay_config(CA), store=FailingStore(sqlite3.IntegrityError("not ours"))) as relay:
        ws, _ = await raw_client(relay, ALICE)
        async with ws:
            await publish_bundle(ws, ALICE)
            await ws.send(wire.encode_link(Send(msg_id(), "alice", b"x")))
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
