"""Helpers for the network tests: a real relay on 127.0.0.1 with an ephemeral port, nodes whose
keystores are provisioned directly from the test CA, a raw link client, and the CA publishing CRLs.

Time is the fixed `conftest.NOW` everywhere (relay, nodes, CRLs) so certificates and CRLs are fresh.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

from node.events import Delivered, Message, SecurityEvent
from node.home import provision_node
from node.keystore import Keystore
from node.link import tls_context
from node.node import Node, NodeOptions
from protocol import certs, wire
from protocol.link import Auth, Challenge, LinkFrame, PublishCrl, Welcome, auth_signed_bytes
from relay.server import Relay, RelayConfig
from tests.support.pki import NOW, Ca
from tests.support.pki import Node as Identity


def clock():
    return NOW


def relay_config(ca: Ca, tmp_path: Path | None = None, **overrides: object) -> RelayConfig:
    """A relay on an ephemeral loopback port, its store on disk when `tmp_path` is given."""
    store = str(tmp_path / "relay.db") if tmp_path is not None else ":memory:"
    settings: dict[str, object] = {"ca_root": ca.root, "port": 0, "store_path": store, "clock": clock}
    settings.update(overrides)
    return RelayConfig(**settings)  # type: ignore[arg-type]


def provision(ca: Ca, who: Identity, relay_url: str, path: Path | None = None) -> Keystore:
    """A node keystore holding what `kmsnet node init` writes (identity, certificate, root, relay)."""
    if path is None:
        store = Keystore.memory()
    else:
        from node.keystore import ARGON2_PROFILES

        store = Keystore.open(path, passphrase="test", create=True, argon2=ARGON2_PROFILES["test"])
    provision_node(store, who.identity, certificate=who.cert, root=ca.root, relays=[relay_url])
    return store


def make_node(ca: Ca, who: Identity, relay_url: str, path: Path | None = None, **options: object) -> Node:
    """An enrolled Node (not started) on the fixed test clock."""
    return Node(provision(ca, who, relay_url, path), options=NodeOptions(**options), clock=clock)  # type: ignore[arg-type]


async def raw_client(relay: Relay, who: Identity, *, ca: Ca | None = None) -> tuple[ClientConnection, Welcome]:
    """A bare link connection that authenticated as `who` (for tests that speak frames by hand);
    over wss:// it trusts `ca`'s root."""
    tls = tls_context(certs.certificate_pem(ca.root)) if ca is not None and relay.url.startswith("wss") else None
    ws = await connect(relay.url, compression=None, max_size=None, ssl=tls)
    challenge = wire.decode_link(await ws.recv())  # type: ignore[arg-type]
    assert isinstance(challenge, Challenge)
    signature = who.identity.sign(auth_signed_bytes(challenge.nonce, challenge.relay, relay.url))
    await ws.send(wire.encode_link(Auth(who.cert, signature)))
    welcome = wire.decode_link(await ws.recv())  # type: ignore[arg-type]
    assert isinstance(welcome, Welcome), welcome
    return ws, welcome


_unread: weakref.WeakKeyDictionary[ClientConnection, collections.deque[LinkFrame]] = weakref.WeakKeyDictionary()


async def recv_frame(ws: ClientConnection, timeout: float = 5.0) -> LinkFrame:
    """The next link frame on a raw connection (the relay may send several in one BATCH)."""
    unread = _unread.setdefault(ws, collections.deque())
    if not unread:
        async with asyncio.timeout(timeout):
            unread.extend(wire.decode_link_frames(await ws.recv()))  # type: ignore[arg-type]
    return unread.popleft()


async def publish_crl(relay: Relay, ca: Ca, crl: bytes) -> None:
    """Publish `crl` the way the CA node does: authenticated as the node named "ca"."""
    ca_node = ca.enrol("ca", 0xCA)
    ws, _ = await raw_client(relay, ca_node, ca=ca)
    async with ws:
        await ws.send(wire.encode_link(PublishCrl(crl)))
        # The relay pushes the feed back to every connected node, the publisher included.
        await recv_frame(ws)


@contextlib.asynccontextmanager
async def running(*nodes: Node) -> AsyncIterator[None]:
    """Start nodes, stop them afterwards."""
    for n in nodes:
        await n.start()
    try:
        yield
    finally:
        for n in nodes:
            await n.stop()


async def next_message(node: Node, timeout: float = 5.0) -> Message:
    """The next Message a node delivers (security events on the way are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            item = await node.events.get()
            if isinstance(item, Message):
                return item


async def next_event(node: Node, event: str, timeout: float = 5.0) -> SecurityEvent:
    """The next SecurityEvent named `event` (other deliveries on the way are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            item: Delivered = await node.events.get()
            if isinstance(item, SecurityEvent) and item.event == event:
                return item
