"""A running node renews its certificate at 2/3 of its validity, reconnects with it, and publishes
prekeys signed over it: old sessions go on, and new peers accept its new bundle."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from websockets.asyncio.client import ClientConnection

from node.enrol import rekey_node
from node.keystore import Keystore
from node.node import Node
from protocol import wire
from protocol.link import PublishCrl
from relay.server import Relay, RelayConfig
from tests.support.enrol import PASS, RunningCa, enrol
from tests.support.enrol import ca as running_ca  # noqa: F401 - the fixture
from tests.support.lab import next_event, next_message, raw_client, running


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def test_a_running_node_renews_and_keeps_talking(running_ca: RunningCa, tmp_path: Path) -> None:
    ca = running_ca
    async with Relay(RelayConfig(ca_root=ca.authority.root, port=0, store_path=str(tmp_path / "relay.db"))) as relay:

        class CaNode:  # the CA's own node credentials, as raw_client expects them
            identity, cert = ca.authority.node_credentials()

        ws, _ = await raw_client(relay, CaNode)  # type: ignore[arg-type]
        await ws.send(wire.encode_link(PublishCrl(ca.authority.current_crl())))
        nodes = {}
        clocks = {}
        for name in ("alice", "bob", "carol"):
            await enrol(tmp_path / name, name, ca.url, ca.admin.token(name).secret, relay_url=relay.url)
            clocks[name] = Clock()
            nodes[name] = Node(Keystore.open(tmp_path / name / "keystore.db", passphrase=PASS), clock=clocks[name])
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        async with running(alice, bob):
            await bob.send("alice", "before")
            assert (await next_message(alice)).text == "before"
            old = alice.certificate
            assert await alice.renew_if_due() is False  # not yet due
            clocks["alice"].offset = timedelta(days=5)  # past 2/3 of seven days
            assert await alice.renew_if_due() is True
            clocks["alice"].offset = timedelta()
            assert alice.certificate != old
            await alice.wait_connected(10)
            await bob.send("alice", "after")  # the session outlives the renewal
            assert (await next_message(alice)).text == "after"
            await alice.send("bob", "and back")
            assert (await next_message(bob)).text == "and back"
            async with running(carol):  # a new peer takes the bundle signed over the new certificate
                await carol.send("alice", "hello, renewed alice")
                assert (await next_message(alice)).text == "hello, renewed alice"
        await ws.close()


@contextlib.asynccontextmanager
async def enrolled_pair(ca: RunningCa, tmp_path: Path) -> AsyncIterator[tuple[ClientConnection, Node, Node]]:
    """A relay whose feed holds the CA's CRL (published over `ws`, the CA node's connection), and
    alice and bob enrolled through the CA's HTTP API, as nodes not started."""
    async with Relay(RelayConfig(ca_root=ca.authority.root, port=0, store_path=str(tmp_path / "relay.db"))) as relay:

        class CaNode:
            identity, cert = ca.authority.node_credentials()

        ws, _ = await raw_client(relay, CaNode)  # type: ignore[arg-type]
        await ws.send(wire.encode_link(PublishCrl(ca.authority.current_crl())))
        for name in ("alice", "bob"):
            await enrol(tmp_path / name, name, ca.url, ca.admin.token(name).secret, relay_url=relay.url)
        alice = Node(Keystore.open(tmp_path / "alice" / "keystore.db", passphrase=PASS))
        bob = Node(Keystore.open(tmp_path / "bob" / "keystore.db", passphrase=PASS))
        yield ws, alice, bob


async def test_after_a_rekey_peers_see_the_identity_change_with_the_new_safety_number(
    running_ca: RunningCa, tmp_path: Path
) -> None:
    ca = running_ca
    async with enrolled_pair(ca, tmp_path) as (ws, alice, bob):
        bob_store = tmp_path / "bob" / "keystore.db"
        async with running(alice, bob):
            await bob.send("alice", "old bob")
            assert (await next_message(alice)).text == "old bob"
            old_number = alice.status()["sessions"][0]["safety_number"]
        bob.keystore.close()
        token = ca.admin.token("bob").secret
        await asyncio.to_thread(rekey_node, tmp_path / "bob", "bob", ca.url, token, PASS)
        bob = Node(Keystore.open(bob_store, passphrase=PASS))
        async with running(alice, bob):
            await bob.send("alice", "new bob")
            changed = await next_event(alice, "identity_changed")
            assert changed.peer == "bob"
            new_number = alice.status()["sessions"][0]["safety_number"]
            assert new_number != old_number and new_number in changed.reason
            assert (await next_message(alice)).text == "new bob"
        await ws.close()


async def test_an_initiator_meeting_a_new_identity_key_is_told_too(running_ca: RunningCa, tmp_path: Path) -> None:
    """Bob re-keys after a compromise and his old certificate is revoked: alice's session with the
    old key ends, and when *she* starts the next one she sees the new safety number announced."""
    ca = running_ca
    async with enrolled_pair(ca, tmp_path) as (ws, alice, bob):
        bob_store = tmp_path / "bob" / "keystore.db"
        async with running(alice, bob):
            await alice.send("bob", "old bob?")
            assert (await next_message(bob)).text == "old bob?"
            old_number = alice.status()["sessions"][0]["safety_number"]
        bob.keystore.close()
        ca.authority.revoke("bob", reason="key-compromise", session=ca.admin.session)
        await ws.send(wire.encode_link(PublishCrl(ca.authority.current_crl())))
        await asyncio.to_thread(rekey_node, tmp_path / "bob", "bob", ca.url, ca.admin.token("bob").secret, PASS)
        bob = Node(Keystore.open(bob_store, passphrase=PASS))
        async with running(alice, bob):
            await next_event(alice, "peer_revoked")
            await alice.send("bob", "new bob?")
            changed = await next_event(alice, "identity_changed")
            assert changed.peer == "bob"
            new_number = alice.status()["sessions"][0]["safety_number"]
            assert new_number != old_number and new_number in changed.reason
            assert (await next_message(bob)).text == "new bob?"
        await ws.close()
