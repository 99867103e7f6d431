"""BATCH link frames (PROTOCOL.md §16.1a): the relay handles each inner frame as if it came alone
(answers, order, rate limit), refuses a malformed BATCH whole, and both ends batch under load; a
node hangs up on a relay that sends a malformed BATCH or batches its authentication."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from node.node import Node
from protocol import wire
from protocol.link import (
    Accepted,
    Ack,
    Auth,
    Batch,
    BundleReply,
    Challenge,
    CrlFeed,
    Deliver,
    Error,
    ErrorCode,
    FetchBundle,
    PublishBundle,
    Send,
    Welcome,
    auth_signed_bytes,
)
from relay.server import Relay
from tests.support.lab import make_node, raw_client, recv_frame, relay_config
from tests.support.pki import ALICE, BOB, CA, make_prekeys


def msg_id() -> bytes:
    return os.urandom(16)


def enc(frame: Any) -> bytes:
    return wire.encode_link(frame)


def batch(*frames: bytes) -> bytes:
    """One BATCH message holding already-encoded frames (no check: tests build bad ones too)."""
    return enc(Batch(list(frames)))


def sends(ids: list[bytes], to: str = "bob") -> bytes:
    return batch(*(enc(Send(m, to, b"opaque %d" % i)) for i, m in enumerate(ids)))


async def routable(relay: Relay, who: Any) -> ClientConnection:
    """A raw client for `who` that published a bundle (so SENDs to it are stored)."""
    ws, _ = await raw_client(relay, who)
    prekeys = make_prekeys(who, onetime=1)
    upload = [[o.key_id, o.public, o.signature] for o in prekeys.onetime.values()]
    await ws.send(enc(PublishBundle(wire.encode(prekeys.bundle), upload, 1)))
    async with asyncio.timeout(5):
        while not await relay.store.known(who.name):
            await asyncio.sleep(0.01)
    return ws


async def close_code(ws: ClientConnection) -> int | None:
    """Read until the relay closes the connection; the close code it sent."""
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(5):
            while True:
                await ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


async def until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# --- 1. each frame of a BATCH is handled in order, as if it came alone ------------------------------------


async def test_sends_in_a_batch_are_accepted_and_delivered_in_order_and_acks_in_a_batch_delete(
    tmp_path: Path,
) -> None:
    """One BATCH of SENDs: ACCEPTED for each and DELIVERs in order; a BATCH of ACKs deletes them."""
    async with Relay(relay_config(CA, tmp_path)) as relay:
        bob_ws = await routable(relay, BOB)
        alice_ws, _ = await raw_client(relay, ALICE)
        ids = [msg_id() for _ in range(5)]
        async with alice_ws, bob_ws:
            await alice_ws.send(sends(ids))
            assert [await recv_frame(alice_ws) for _ in ids] == [Accepted(m) for m in ids]
            delivered = [await recv_frame(bob_ws) for _ in ids]
            assert all(isinstance(d, Deliver) and d.sender == "alice" for d in delivered)
            assert [(d.msg_id, d.payload) for d in delivered] == [(m, b"opaque %d" % i) for i, m in enumerate(ids)]  # type: ignore[union-attr]
            await bob_ws.send(batch(*(enc(Ack(m)) for m in ids[:3])))
            await until(lambda: relay.metrics.acked._value.get() == 3)
        bob_ws, welcome = await raw_client(relay, BOB)
        async with bob_ws:
            assert welcome.pending == 2
            again = [await recv_frame(bob_ws) for _ in range(2)]
            assert [d.msg_id for d in again] == ids[3:]  # type: ignore[union-attr]
            with pytest.raises(TimeoutError):
                await recv_frame(bob_ws, timeout=0.3)  # the acknowledged three never come again


# --- 2. a malformed BATCH is refused whole, and closes only its own connection ----------------------------


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (batch(enc(Ack(bytes(16)))), ErrorCode.MALFORMED),  # a BATCH inside a BATCH
        (b"\xc1", ErrorCode.MALFORMED),  # not msgpack
        (msgpack.packb([1, 38, b"short", "bob", b"x"]), ErrorCode.MALFORMED),  # a SEND with a bad msg_id
        (msgpack.packb([1, 99]), ErrorCode.UNKNOWN_TYPE),
    ],
    ids=["nested-batch", "not-msgpack", "bad-send", "unknown-type"],
)
async def test_a_malformed_batch_is_refused_whole_and_closes_only_its_connection(bad: bytes, code: ErrorCode) -> None:
    """A BATCH holding a BATCH or an undecodable frame: ERROR + close 1008, its valid SEND not handled."""
    async with Relay(relay_config(CA)) as relay:
        bob_ws = await routable(relay, BOB)
        alice_ws, _ = await raw_client(relay, ALICE)
        async with alice_ws, bob_ws:
            await alice_ws.send(batch(enc(Send(msg_id(), "bob", b"before the bad one")), bad))
            error = await recv_frame(alice_ws)  # not an ACCEPTED: the SEND was not handled
            assert isinstance(error, Error) and error.code == code, error
            assert await close_code(alice_ws) == 1008
            assert relay.store.mailbox_size("bob") == 0
            # Bob is served on, and was never handed the SEND that came before the bad frame.
            await bob_ws.send(enc(FetchBundle(7, "bob")))
            reply = await recv_frame(bob_ws)
            assert isinstance(reply, BundleReply) and reply.request == 7
            assert relay.connected() == ["bob"]


async def test_a_batch_is_not_an_auth() -> None:
    """A BATCH during authentication (even one holding a valid AUTH) is refused with AUTH_FAILED."""
    async with Relay(relay_config(CA)) as relay:
        ws = await connect(relay.url, compression=None)
        async with ws:
            challenge = wire.decode_link(await ws.recv())  # type: ignore[arg-type]
            assert isinstance(challenge, Challenge)
            signature = ALICE.identity.sign(auth_signed_bytes(challenge.nonce, challenge.relay, relay.url))
            await ws.send(batch(enc(Auth(ALICE.cert, signature))))
            error = await recv_frame(ws)
            assert isinstance(error, Error) and error.code == ErrorCode.AUTH_FAILED
            assert await close_code(ws) == 1008
        assert relay.connected() == []


# --- 3. the rate limit counts frames, not messages --------------------------------------------------------


async def test_the_rate_limit_counts_each_frame_of_a_batch() -> None:
    """With 3 tokens, a BATCH of 5 SENDs: the first 3 ACCEPTED, the last 2 RATE_LIMITED with their msg_ids."""
    async with Relay(relay_config(CA, rate=0.001, burst=3)) as relay:
        bob_ws = await routable(relay, BOB)
        alice_ws, _ = await raw_client(relay, ALICE)
        async with alice_ws, bob_ws:
            ids = [msg_id() for _ in range(5)]
            await alice_ws.send(sends(ids))
            answers = [await recv_frame(alice_ws) for _ in ids]
            # Refusals are queued at once, ACCEPTEDs once stored: compare each kind in its own order.
            assert [a for a in answers if isinstance(a, Accepted)] == [Accepted(m) for m in ids[:3]]
            refused = [a for a in answers if isinstance(a, Error)]
            assert [(e.code, e.msg_id) for e in refused] == [(ErrorCode.RATE_LIMITED, m) for m in ids[3:]]
            assert relay.store.mailbox_size("bob") == 3


async def test_a_batch_arriving_with_no_token_left_gets_one_refusal_per_send() -> None:
    """§16.1a: one token per frame, each frame over the limit dropped with its own RATE_LIMITED (+ msg_id)."""
    async with Relay(relay_config(CA, rate=0.001, burst=1)) as relay:
        bob_ws = await routable(relay, BOB)
        alice_ws, _ = await raw_client(relay, ALICE)
        async with alice_ws, bob_ws:
            first = msg_id()
            await alice_ws.send(enc(Send(first, "bob", b"spends the only token")))
            assert await recv_frame(alice_ws) == Accepted(first)
            ids = [msg_id() for _ in range(3)]
            await alice_ws.send(sends(ids))
            answers = []
            with pytest.raises(TimeoutError):
                while True:
                    answers.append(await recv_frame(alice_ws, timeout=0.5))
            assert [(e.code, e.msg_id) for e in answers] == [(ErrorCode.RATE_LIMITED, m) for m in ids]  # type: ignore[union-attr]


# --- 4. a node hangs up on a relay that breaks the BATCH rules --------------------------------------------

AUTH = object()  # in a hostile script: read the node's AUTH here
CHALLENGE = enc(Challenge(bytes(32), "evil-relay"))
WELCOME = enc(Welcome("alice", 0, 100))
CRL = enc(CrlFeed(b"not even a CRL"))


class HostileRelay:
    """A relay that plays `script` on the first connection and notes why the node hung up."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.connections = 0
        self.played = asyncio.Event()
        self.hung_up = False
        self.reconnected = asyncio.Event()
        self.reason_on_reconnect: str | None = None
        self.node: Node | None = None

    async def handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        if self.connections > 1:
            assert self.node is not None and self.node._link is not None
            self.reason_on_reconnect = self.node._link.last_error
            self.reconnected.set()
            await ws.wait_closed()
            return
        for step in self.script:
            if step is AUTH:
                assert isinstance(wire.decode_link(await ws.recv()), Auth)  # type: ignore[arg-type]
            elif step is CHALLENGE:  # named for where the node dialled it, or the node hangs up at once
                await ws.send(enc(Challenge(bytes(32), f"127.0.0.1:{ws.local_address[1]}")))
            else:
                await ws.send(step)
        try:
            # The node must hang up now (what it may still send is read and ignored, but an AUTH
            # means it took a batched CHALLENGE).
            async with asyncio.timeout(2):
                while True:
                    frames = wire.decode_link_frames(await ws.recv())  # type: ignore[arg-type]
                    assert not any(isinstance(f, Auth) for f in frames), "the node answered a batched CHALLENGE"
        except ConnectionClosed:
            self.hung_up = True
        finally:
            self.played.set()


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        pytest.param([batch(CHALLENGE, WELCOME)], "BATCH during authentication", id="challenge-batched"),
        pytest.param([CHALLENGE, AUTH, batch(WELCOME, CRL)], "BATCH during authentication", id="welcome-batched"),
        pytest.param([CHALLENGE, AUTH, WELCOME, batch(CRL, batch(CRL))], "BATCH inside a BATCH", id="nested"),
        pytest.param([CHALLENGE, AUTH, WELCOME, batch(CRL, b"\xc1")], "malformed frame", id="bad-inner-frame"),
        pytest.param([batch(CHALLENGE)], "BATCH", id="lone-challenge-in-a-batch"),
        pytest.param([CHALLENGE, AUTH, batch(WELCOME)], "BATCH", id="lone-welcome-in-a-batch"),
    ],
)
async def test_a_node_hangs_up_on_a_relay_that_breaks_the_batch_rules(script: list[Any], reason: str) -> None:
    """A BATCH in a BATCH, a bad inner frame or a BATCH during auth: the node hangs up, says why, reconnects."""
    hostile = HostileRelay(script)
    async with serve(hostile.handle, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        node = hostile.node = make_node(CA, ALICE, f"ws://127.0.0.1:{port}")
        await node.start(wait=False)
        try:
            async with asyncio.timeout(5):
                await hostile.played.wait()
                assert hostile.hung_up
                await hostile.reconnected.wait()
            assert reason in (hostile.reason_on_reconnect or "")
            assert node._link_task is not None and not node._link_task.done()  # the link lives on
            assert node.status()["name"] == "alice"
        finally:
            await node.stop()


# --- 5. under load both ends batch ------------------------------------------------------------------------


async def test_the_relay_batches_what_it_sends_under_load() -> None:
    """200 SENDs sent back to back: bob gets all 200 DELIVERs in fewer WebSocket messages."""
    async with Relay(relay_config(CA)) as relay:
        bob_ws = await routable(relay, BOB)
        alice_ws, _ = await raw_client(relay, ALICE)
        async with alice_ws, bob_ws:
            ids = [msg_id() for _ in range(200)]
            for m in ids:
                await alice_ws.send(enc(Send(m, "bob", b"opaque")))
            messages, delivered = 0, list[Any]()
            async with asyncio.timeout(10):
                while len(delivered) < len(ids):
                    delivered += wire.decode_link_frames(await bob_ws.recv())  # type: ignore[arg-type]
                    messages += 1
            assert [d.msg_id for d in delivered] == ids
            assert messages < len(ids)


async def test_the_node_link_batches_what_it_queues() -> None:
    """100 frames queued with send_nowait in one go reach the relay in fewer WebSocket messages."""
    async with Relay(relay_config(CA)) as relay:
        seen: list[bytes] = []
        receive = relay._receive

        async def counting(peer: Any, raw: Any) -> None:
            if peer.name == "alice":
                seen.append(raw)
            await receive(peer, raw)

        relay._receive = counting  # type: ignore[method-assign]
        node = make_node(CA, ALICE, relay.url)
        await node.start()
        try:
            await until(lambda: relay.metrics.frames.labels("PublishBundle")._value.get() == 1)
            assert node._link is not None
            acks = relay.metrics.frames.labels("Ack")
            seen.clear()
            for _ in range(100):
                node._link.send_nowait(Ack(msg_id()))  # acknowledges nothing: no answer, no side effect
            await until(lambda: acks._value.get() == 100)
            # Queued in one go, written when the writer runs: one BATCH of all 100 (at most 256 fit).
            assert [type(wire.decode_link(raw)) for raw in seen] == [Batch]
            assert len(wire.decode_link_frames(seen[0])) == 100
        finally:
            await node.stop()
