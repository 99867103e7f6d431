"""Delivery receipts, retry requests and re-sends (node/receipts.py, PROTOCOL.md §7.6-7.7), with a
real relay on 127.0.0.1: ✓✓ both ways, across a restart of either side, and with a proxy that flips
bits in one frame in ten between alice and the relay, every message is accounted for."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from node.events import Message
from node.history import State
from node.keystore import Keystore
from node.node import Node
from node.receipts import DeliveryPolicy
from protocol.link import Send
from relay.interceptor import Interceptor
from relay.server import Relay
from tests.support.home_writer import follow, kmsnet, send, serving_pid, world
from tests.support.lab import make_node, next_message, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA

pytestmark = pytest.mark.timeout(300)

#: Quick bounds, so that a test waits seconds, not the product's half minute.
QUICK = DeliveryPolicy(receipt_delay=0.05, resend_after=1.0, check_every=0.2)


async def settled(node: Node, peer: str, count: int, timeout: float = 60.0) -> list[State]:
    """Wait until `count` messages to `peer` are delivered or failed; their states."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        states = [e.state for e in node.history.conversation(peer) if e.direction == "out"]
        if len(states) >= count and not any(s.pending for s in states):
            return states
        if loop.time() > deadline:
            raise AssertionError(f"not settled: {Counter(states)}")
        await asyncio.sleep(0.1)


def quick(node: Node, policy: DeliveryPolicy = QUICK) -> Node:
    node.delivery.policy = policy
    return node


async def test_receipts_both_ways_batched_and_not_receipted(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice, bob = quick(make_node(CA, ALICE, relay.url)), quick(make_node(CA, BOB, relay.url))
        bodies: Counter[str] = Counter()
        real = bob._send_body

        async def counting(peer: str, data: bytes) -> bytes | None:
            bodies[{1: "text", 2: "receipt", 3: "retry"}[data[1]]] += 1
            return await real(peer, data)

        bob.delivery._send_body = counting  # type: ignore[method-assign]
        async with running(alice, bob):
            sent = [await alice.send("bob", f"m{i}") for i in range(20)]
            assert alice.history.sent(sent[0]) is not None
            for _ in sent:
                await next_message(bob)
            assert await settled(alice, "bob", 20) == [State.DELIVERED] * 20
            await bob.send("alice", "and back")
            await next_message(alice)
            assert await settled(bob, "alice", 1) == [State.DELIVERED]
            await asyncio.sleep(0.5)  # a receipt of a receipt would show now
        # Twenty messages, receipts gathered into a few bodies; alice's receipt is never answered.
        assert 1 <= bodies["receipt"] < 20 and bodies["retry"] == 0
        assert alice.delivery.waiting() == 0 and bob.delivery.waiting() == 0


async def test_receipts_across_a_restart_of_either_side(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = quick(make_node(CA, ALICE, relay.url, tmp_path / "alice.db"))
        bob = quick(make_node(CA, BOB, relay.url, tmp_path / "bob.db"))
        async with running(bob):
            pass  # bob has been online once: his prekeys are at the relay
        async with running(alice):
            msg_id = await alice.send("bob", "while you were out")
            assert alice.history.sent(msg_id).state is State.STORED  # type: ignore[union-attr]
        alice.keystore.close()
        async with running(bob):  # alice is gone: bob's receipt waits at the relay
            assert (await next_message(bob)).text == "while you were out"
            await asyncio.sleep(0.3)
            assert len(bob._outbox) == 0  # the relay took the receipt
        bob.keystore.close()
        alice = quick(Node(Keystore.open(tmp_path / "alice.db", passphrase="test"), clock=alice.clock))
        async with running(alice):
            assert await settled(alice, "bob", 1) == [State.DELIVERED]
        alice.keystore.close()


async def test_a_receiver_that_stops_at_once_still_receipts(tmp_path: Path) -> None:
    """Bob stops right after taking a message: the receipt he owes goes out as he stops (or with his
    next start), not never."""
    slow = DeliveryPolicy(receipt_delay=30.0, resend_after=3600)  # no batch timer, no re-send: only stop
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = quick(make_node(CA, ALICE, relay.url))
        bob = quick(make_node(CA, BOB, relay.url, tmp_path / "bob.db"), slow)
        async with running(alice, bob):
            await alice.send("bob", "quick one")
            await next_message(bob)
        async with running(alice):
            assert await settled(alice, "bob", 1, timeout=10) == [State.DELIVERED]


class FlipProxy:
    """A WebSocket proxy on 127.0.0.1: every frame either way, and one in `every` (seeded) gets one bit flipped."""

    def __init__(self, every: int, seed: int) -> None:
        self.target = ""
        self.every = every
        self.rng = random.Random(seed)
        self.flipped = 0
        self.frames = 0
        self.active = False

    def _maybe_flip(self, data: bytes | str) -> bytes | str:
        if not self.active:
            return data
        self.frames += 1
        if isinstance(data, str) or self.rng.randrange(self.every):
            return data
        self.flipped += 1
        bit = self.rng.randrange(len(data) * 8)
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        return bytes(flipped)

    async def _pump(self, source: object, sink: object) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in source:  # type: ignore[attr-defined]
                await sink.send(self._maybe_flip(data))  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            await sink.close()  # type: ignore[attr-defined]

    async def _handle(self, client: ServerConnection) -> None:
        try:
            async with connect(self.target, max_size=None) as upstream:
                await asyncio.gather(self._pump(client, upstream), self._pump(upstream, client))
        except (OSError, ConnectionClosed):
            pass

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        async with serve(self._handle, "127.0.0.1", 0, max_size=None) as server:
            port = server.sockets[0].getsockname()[1]
            yield f"127.0.0.1:{port}"


async def test_one_frame_in_ten_flipped_between_alice_and_the_relay_loses_nothing_silently(tmp_path: Path) -> None:
    """200 messages from alice through the proxy: each is delivered exactly once, or alice's history
    says it failed and why; bob shows no altered text."""
    count = 200
    proxy = FlipProxy(every=10, seed=14)
    # The relay names itself as alice dials it (through the proxy); bob dials it directly.
    async with proxy.serving() as proxy_name, Relay(relay_config(CA, tmp_path, name=proxy_name)) as relay:
        proxy.target = relay.url
        await publish_crl(SimpleNamespace(url=f"ws://{proxy_name}"), CA, CA.crl())  # type: ignore[arg-type]
        proxy.active = True
        alice = quick(make_node(CA, ALICE, f"ws://{proxy_name}", send_timeout=1.0))
        bob = quick(make_node(CA, BOB, relay.url, check_relay_name=False))
        texts = [f"message {i} from alice" for i in range(count)]
        got: list[Message] = []

        async def collect() -> None:
            while True:
                item = await bob.events.get()
                if isinstance(item, Message):
                    got.append(item)

        async with running(bob):
            await alice.start(wait=False)
            try:
                await alice.wait_connected(30)
                collector = asyncio.create_task(collect())
                for text in texts:
                    await _send_through(alice, text)
                states = await settled(alice, "bob", count, timeout=180)
                await asyncio.sleep(1.0)  # a late duplicate would show now
                collector.cancel()
            finally:
                await alice.stop()
    records = [e for e in alice.history.conversation("bob") if e.direction == "out"]
    assert len(records) == count and sorted(e.text for e in records) == sorted(texts)
    by_id = {e.msg_id: e for e in records}
    shown = Counter(m.id for m in got)
    assert all(n == 1 for n in shown.values()), "a message shown twice"
    for message in got:  # nothing altered: every text bob saw is the one alice sent under that id
        assert by_id[message.id].text == message.text
    delivered = [e for e in records if e.state is State.DELIVERED]
    failed = [e for e in records if e.state is State.FAILED]
    assert len(delivered) + len(failed) == count == len(states)
    assert all(e.reason for e in failed)
    assert {e.msg_id for e in delivered} <= set(shown)  # delivered: bob's application has it
    resent = sum(1 for e in records if e.attempts > 1)
    print(
        f"\nflip proxy: {proxy.flipped} of {proxy.frames} frames flipped; {len(delivered)} delivered, "
        f"{len(failed)} failed, {resent} re-sent at least once, {len(got)} shown by bob"
    )
    assert proxy.flipped >= count // 20  # the proxy did flip


async def _send_through(node: Node, text: str) -> None:
    """`send`, waiting for the link when a flipped frame just broke it (a user would press Enter again)."""
    for _ in range(100):
        try:
            await node.send("bob", text)
            return
        except Exception:  # a bundle fetch cut by a flipped frame: try again
            await asyncio.sleep(0.2)
    raise AssertionError(f"could not send {text!r}")


async def test_a_refused_envelope_is_asked_for_and_sent_again(tmp_path: Path) -> None:
    """Deterministic: the relay flips the ciphertext of alice's second message only. Bob refuses it,
    asks for it by id, and alice sends it again under the current chain: delivered, two transmissions."""

    class FlipSecond(Interceptor):
        def __init__(self) -> None:
            self.seen = 0

        async def on_send(self, sender: str, send: Send) -> list[Send]:
            self.seen += sender == "alice"
            if sender == "alice" and self.seen == 2:
                payload = bytearray(send.payload)
                payload[-1] ^= 1  # the tag: bob's node cannot authenticate it
                return [Send(send.msg_id, send.to, bytes(payload))]
            return [send]

    flip = FlipSecond()
    slow = DeliveryPolicy(receipt_delay=0.05, resend_after=3600, check_every=0.2)  # only a retry request resends
    async with Relay(relay_config(CA, tmp_path), interceptor=flip) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice, bob = quick(make_node(CA, ALICE, relay.url), slow), quick(make_node(CA, BOB, relay.url), slow)
        async with running(alice, bob):
            await alice.send("bob", "first")
            second = await alice.send("bob", "second")
            texts = [(await next_message(bob)).text, (await next_message(bob)).text]
            assert texts == ["first", "second"]
            assert await settled(alice, "bob", 2, timeout=20) == [State.DELIVERED] * 2
            entry = alice.history.sent(second)
            assert entry is not None and entry.attempts == 2


async def test_send_wait_delivered_from_the_command_line(tmp_path: Path) -> None:
    """`send --wait delivered`: exit 3 when bob's node does not confirm in time (the message stays
    pending), exit 0 with state delivered once bob's node runs; the history says both were delivered."""
    async with world(tmp_path) as w:
        alice, bob = str(w.alice), str(w.bob)
        assert (await kmsnet("receive", "--home", bob, "--timeout", "3")).code == 0  # bob's prekeys go up
        usage = await kmsnet("send", "--home", alice, "--to", "bob", "--timeout", "1", "x")
        assert usage.code == 2
        wait = ("--json", "--wait", "delivered", "--timeout")
        late = await kmsnet("send", "--home", alice, "--to", "bob", *wait, "1", "one")
        assert late.code == 3, late
        assert json.loads(late.err)["code"] == "not_delivered_yet"
        assert json.loads(late.out)["state"] == "stored"
        follower = await follow(w.bob)
        await serving_pid(w.bob)
        done = await kmsnet("send", "--home", alice, "--to", "bob", *wait, "60", "two")
        assert done.code == 0, done.err
        assert json.loads(done.out)["state"] == "delivered"
        await follower.stop()
        assert sorted(follower.texts("alice")) == ["one", "two"]
        listed = await kmsnet("history", "--home", alice, "--with", "bob", "--json")
        states = {json.loads(line)["text"]: json.loads(line)["state"] for line in listed.out.splitlines()}
        assert states == {"one": "delivered", "two": "delivered"}
        quiet = await send(w.alice, "bob", "three")
        assert json.loads(quiet.out)["state"] in ("stored", "delivered")
