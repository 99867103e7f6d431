"""A DELIVER lost on a live connection is sent again on that connection (issue #14 part 3).

Between bob and the relay sits a WebSocket proxy on 127.0.0.1 that drops one DELIVER in ten (the
relay is named after the proxy's address, as behind any forwarder that nodes dial). Alice sends
1,000 messages; every one reaches bob exactly once, without bob ever reconnecting. On both store
backends (SQLite, and Redis: the relay reads a lost envelope back from its store to send it again).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import types
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from protocol import wire
from protocol.link import Ack, Deliver, Send
from relay.server import Relay
from tests.support.lab import make_node, next_message, publish_crl, raw_client, recv_frame, relay_config, running
from tests.support.pki import ALICE, BOB, CA
from tests.support.redis_fixtures import redis_single, redis_url  # noqa: F401 - fixtures
from tests.support.relay_helpers import publish_bundle

MESSAGES = 1000
#: Seconds before an unacknowledged DELIVER is sent again: short, so that the test stays short.
RESEND_AFTER = 0.5


class DroppingProxy:
    """Forwards WebSocket messages both ways; drops every `every`-th DELIVER going to the node."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.delivers = 0
        self.dropped: list[bytes] = []
        self.connections = 0
        self.upstream = ""

    async def handle(self, client: ServerConnection) -> None:
        self.connections += 1
        async with connect(self.upstream, compression=None, max_size=None) as relay:

            async def up() -> None:
                async for raw in client:
                    await relay.send(raw)

            async def down() -> None:
                async for raw in relay:
                    assert isinstance(raw, bytes)
                    frames = wire.decode_link_frames(raw)
                    if not any(isinstance(frame, Deliver) for frame in frames):
                        await client.send(raw)
                        continue
                    kept = [wire.encode_link(frame) for frame in frames if not self._drops(frame)]
                    for message in wire.pack_link_frames(kept):
                        await client.send(message)

            tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _drops(self, frame: object) -> bool:
        if not isinstance(frame, Deliver):
            return False
        self.delivers += 1
        if self.delivers % self.every:
            return False
        self.dropped.append(frame.msg_id)
        return True


@contextlib.asynccontextmanager
async def proxied_relay(store_path: str, tmp_path: Path, every: int) -> AsyncIterator[tuple[Relay, str, DroppingProxy]]:
    """A relay named after the proxy in front of it (nodes reach it there only); yields the relay,
    the proxy's URL and the proxy, with the CA's first CRL published through it."""
    proxy = DroppingProxy(every)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = relay_config(CA, name=f"127.0.0.1:{port}", resend_after=RESEND_AFTER, store_path=store_path)
    async with Relay(config) as relay, serve(proxy.handle, sock=sock, compression=None, max_size=None):
        proxy.upstream = f"ws://127.0.0.1:{relay.port}"
        url = f"ws://127.0.0.1:{port}"
        await publish_crl(types.SimpleNamespace(url=url), CA, CA.crl())  # type: ignore[arg-type]
        yield relay, url, proxy


@pytest.fixture(params=["sqlite", "redis"])
def store_path(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "relay.db")
    return str(request.getfixturevalue("redis_url"))


async def test_one_deliver_in_ten_dropped_on_a_live_connection_every_message_arrives_once(
    store_path: str, tmp_path: Path
) -> None:
    async with proxied_relay(store_path, tmp_path, every=10) as (relay, proxy_url, proxy):
        alice = make_node(CA, ALICE, proxy_url)  # the proxy drops DELIVERs only: alice gets none
        bob = make_node(CA, BOB, proxy_url)
        async with running(alice, bob):
            texts = [f"message {i}" for i in range(MESSAGES)]
            for start in range(0, MESSAGES, 50):
                await asyncio.gather(*(alice.send("bob", text) for text in texts[start : start + 50]))
            received = collections.Counter()
            for _ in range(MESSAGES):
                received[(await next_message(bob, timeout=20)).text] += 1
            async with asyncio.timeout(20):  # every envelope acknowledged, so none is pending
                while await relay.store.waiting("bob"):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(2 * RESEND_AFTER)  # a late duplicate would show now
            while not bob.events.empty():
                item = bob.events.get_nowait()
                assert not hasattr(item, "text"), f"delivered twice: {item}"
        assert received == collections.Counter(texts)  # each exactly once
        assert len(proxy.dropped) >= MESSAGES // 10
        assert proxy.connections == 3  # the CA publishing its CRL, alice and bob: nobody reconnected
        assert relay.metrics.resent._value.get() >= len(proxy.dropped)  # type: ignore[attr-defined]


async def test_a_deliver_is_sent_again_only_when_it_looks_lost(tmp_path: Path) -> None:
    """A raw node that acknowledges the second DELIVER but not the first gets the first again; one
    that acknowledges nothing gets it again after the bound; one that acknowledged is left alone."""
    async with Relay(relay_config(CA, tmp_path, resend_after=RESEND_AFTER)) as relay:
        alice, _ = await raw_client(relay, ALICE)
        bob, _ = await raw_client(relay, BOB)
        async with alice, bob:
            await publish_bundle(bob, BOB)  # a routable recipient
            async with asyncio.timeout(5):
                while not await relay.store.known("bob"):
                    await asyncio.sleep(0.01)
            first, second = b"\x01" * 16, b"\x02" * 16
            for msg_id in (first, second):
                await alice.send(wire.encode_link(Send(msg_id, "bob", b"\x93\x01\x02\x03")))
            got = [await recv_frame(bob), await recv_frame(bob)]
            assert [f.msg_id for f in got if isinstance(f, Deliver)] == [first, second]
            await bob.send(wire.encode_link(Ack(second)))
            again = await recv_frame(bob, timeout=5 * RESEND_AFTER)
            assert isinstance(again, Deliver) and again.msg_id == first
            again = await recv_frame(bob, timeout=10 * RESEND_AFTER)  # still nothing: later, once more
            assert isinstance(again, Deliver) and again.msg_id == first
            await bob.send(wire.encode_link(Ack(first)))
            with pytest.raises(TimeoutError):
                await recv_frame(bob, timeout=6 * RESEND_AFTER)
