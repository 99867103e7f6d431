"""Revocation across renewals (PROTOCOL.md §10.5), between real nodes through a real relay: a session
ends with the peer certificate it was made under, the renewed certificate is checked against the
current CRL by a new handshake, and a revoked certificate's identity key stays revoked in a renewal."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from node.events import Message
from node.keystore import Keystore
from node.node import Node
from relay.server import Relay
from scenarios.attacker import ColludingRelay
from tests.support.lab import next_event, next_message, provision, publish_crl, relay_config, running
from tests.support.pki import BOB, CA, DAY, HOUR, NOW, YEAR
from tests.support.pki import Node as Identity

ALICE_KEY = CA.enrol("alice", 0x3000).identity
#: Alice's first certificate (short-lived), and its renewal for the same identity key.
OLD = CA.enrol("alice", 0x3001, identity=ALICE_KEY, not_after=NOW + DAY)
RENEWED = CA.enrol("alice", 0x3002, identity=ALICE_KEY, not_after=NOW + YEAR)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def node(store: Keystore, clock: Callable[[], datetime]) -> Node:
    return Node(store, clock=clock)


def renew(store: Keystore, who: Identity) -> None:
    """What a renewal leaves in the home (node/enrol.py): the same identity key under a new certificate,
    and the signed prekey due for rotation, so that the next bundle is signed over the new certificate."""
    with store.transaction():
        store.put("node", "certificate", who.cert)
        store.delete("node", "next_prekey_rotation")


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.01)


def texts(node: Node) -> list[str]:
    out = []
    while not node.events.empty():
        item = node.events.get_nowait()
        if isinstance(item, Message):
            out.append(item.text)
    return out


async def test_a_session_ends_with_its_certificate_and_a_revoked_renewal_gets_no_new_one(tmp_path: Path) -> None:
    clock = Clock()
    # The relay colludes with the thief: an honest one cuts a revoked node off (PROTOCOL.md §16.3);
    # what is tested here is bob's own refusal.
    async with Relay(relay_config(CA, tmp_path, clock=clock), interceptor=ColludingRelay()) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice_store, bob_store = provision(CA, OLD, relay.url), provision(CA, BOB, relay.url)
        alice, bob = node(alice_store, clock), node(bob_store, clock)
        async with running(alice, bob):
            await alice.send("bob", "before")
            assert (await next_message(bob)).text == "before"
            await bob.send("alice", "hi")
            assert (await next_message(alice)).text == "hi"
        # Alice's key is stolen; the thief renews; the CA revokes the renewed certificate. The old one
        # has expired meanwhile and is no longer listed: only its notAfter can end bob's session.
        renew(alice_store, RENEWED)
        clock.now = NOW + 2 * DAY
        alice, bob = node(alice_store, clock), node(bob_store, clock)
        crl = CA.crl([RENEWED.serial], number=2, this_update=clock.now - HOUR, next_update=clock.now + DAY)
        async with running(alice, bob):
            await publish_crl(relay, CA, crl)
            await until(lambda: bob.revocation.highest_number == 2)
            await alice.send("bob", "from the thief")  # on the old session: alice's side of it is still open
            ended = await next_event(bob, "frame_refused")
            assert ended.peer == "alice" and "expired" in ended.reason
            await next_event(bob, "session_reset")
            refused = await next_event(bob, "session_refused")  # the new handshake met the revoked renewal
            assert refused.error == "certificate_revoked"
            assert "from the thief" not in texts(bob)
            status = bob.status()["sessions"][0]
            assert status["state"] == "closed"


async def test_revoking_the_old_certificate_also_refuses_its_key_under_a_renewed_one(tmp_path: Path) -> None:
    clock = Clock()
    async with Relay(relay_config(CA, tmp_path, clock=clock)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice_store, bob_store = provision(CA, OLD, relay.url), provision(CA, BOB, relay.url)
        alice, bob = node(alice_store, clock), node(bob_store, clock)
        async with running(alice, bob):
            await alice.send("bob", "before")
            assert (await next_message(bob)).text == "before"
            await publish_crl(relay, CA, CA.crl([OLD.serial], number=2))
            assert (await next_event(bob, "peer_revoked")).peer == "alice"
        # The holder of the key renews (the renewal is not listed) and starts afresh with bob.
        renew(alice_store, RENEWED)
        with alice_store.transaction():
            alice_store.delete("session", "bob")
            alice_store.delete("peer", "bob")
        alice = node(alice_store, clock)
        async with running(alice, bob):
            await alice.send("bob", "it is me, renewed")
            refused = await next_event(bob, "peer_revoked")
            assert refused.error == "certificate_revoked" and "same identity key" in refused.reason
            assert "it is me, renewed" not in texts(bob)
