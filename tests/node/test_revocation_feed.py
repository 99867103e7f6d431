"""Nodes enforce the CA's revocation feed against a relay that may lie: a revoked peer is cut off
within one feed update, a withheld feed fails closed at nextUpdate, an older or forged CRL is
refused (also after a restart), and the previous good CRL is kept."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

import pytest

from node.node import Node
from protocol.errors import CertificateRevoked, StaleFeed
from relay.interceptor import Interceptor
from relay.server import Relay
from scenarios.attacker import ColludingRelay
from tests.support.lab import next_event, next_message, provision, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA, DAY, HOUR, NOW, ROGUE_CA


class Clock:
    """A clock the test moves forward."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


class FeedControl(Interceptor):
    """A relay that may withhold the feed from a node, or push it an older CRL."""

    def __init__(self) -> None:
        self.withhold: set[str] = set()
        self.substitute: bytes | None = None

    async def on_crl(self, recipient: str, crl: bytes) -> bytes | None:
        if recipient in self.withhold:
            return None
        return self.substitute or crl


def node(who, relay: Relay, clock: Clock, path: Path | None = None) -> Node:
    return Node(provision(CA, who, relay.url, path), clock=clock)


async def push(relay: Relay, crl: bytes) -> None:
    """What the relay does with a CRL from the CA: keep it and push it to every node."""
    await publish_crl(relay, CA, crl)


async def test_revoking_bob_cuts_a_live_session_within_one_feed_update(tmp_path: Path) -> None:
    clock = Clock()
    async with Relay(relay_config(CA, tmp_path, clock=clock), interceptor=ColludingRelay()) as relay:
        await push(relay, CA.crl(number=1))
        alice, bob = node(ALICE, relay, clock), node(BOB, relay, clock)
        async with running(alice, bob):
            await alice.send("bob", "hello")
            assert (await next_message(bob)).text == "hello"
            await bob.send("alice", "hi")
            assert (await next_message(alice)).text == "hi"
            await push(relay, CA.crl([BOB.serial], number=2))
            revoked = await next_event(alice, "peer_revoked")
            assert revoked.peer == "bob" and "key-compromise" in revoked.reason
            # Bob's later frames are refused, with an event; nothing reaches alice's application.
            await bob.send("alice", "still me")
            refused = await next_event(alice, "frame_refused")
            assert refused.peer == "bob" and "revoked" in refused.reason
            # And no new session with bob either.
            with pytest.raises(CertificateRevoked):
                await alice.send("bob", "new session?")
            assert alice.status()["sessions"][0]["state"] == "closed"


async def test_a_withheld_feed_fails_closed_at_next_update(tmp_path: Path) -> None:
    clock = Clock()
    control = FeedControl()
    async with Relay(relay_config(CA, tmp_path, clock=clock), interceptor=control) as relay:
        await push(relay, CA.crl(number=1, this_update=NOW - HOUR, next_update=NOW + HOUR))
        alice, bob = node(ALICE, relay, clock), node(BOB, relay, clock)
        async with running(alice, bob):
            control.withhold.add("alice")
            await push(relay, CA.crl(number=2, this_update=NOW, next_update=NOW + DAY))  # never reaches alice
            clock.now = NOW + 2 * HOUR  # past alice's nextUpdate (+ skew)
            status = alice.status()["feed"]
            assert status["stale"] and status["crl_number"] == 1
            with pytest.raises(StaleFeed):
                await alice.send("bob", "hello?")
            event = await next_event(alice, "session_refused")
            assert event.error == "stale_feed"
            await bob.send("alice", "bob has the fresh feed")  # bob initiates; alice must refuse it
            refused = await next_event(alice, "stale_feed")
            assert refused.peer == "bob"


async def test_an_older_crl_is_refused_as_rollback_also_after_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    async with Relay(relay_config(CA, tmp_path, clock=clock)) as relay:
        await push(relay, CA.crl(number=5))
        alice = node(ALICE, relay, clock, tmp_path / "alice.db")
        async with running(alice):
            await asyncio.sleep(0.2)
            assert alice.status()["feed"]["crl_number"] == 5
            alice.revocations.on_crl(CA.crl([BOB.serial], number=4), alice.certificate)  # a relay replaying an old feed
            event = await next_event(alice, "crl_rollback")
            assert "lower" in event.reason
        keystore = alice.keystore
    restarted = Node(keystore, clock=clock)
    replay = FeedControl()
    replay.substitute = CA.crl(number=3)  # the relay pushes an old CRL instead of the newest
    async with Relay(relay_config(CA, tmp_path, clock=clock), interceptor=replay) as relay:
        restarted.relay_url = relay.url
        async with running(restarted):
            event = await next_event(restarted, "crl_rollback")
            assert "lower than the accepted 5" in event.reason
            assert restarted.status()["feed"]["crl_number"] == 5


@pytest.mark.parametrize("forgery", ["rogue-ca", "bit-flip", "garbage"])
async def test_a_forged_crl_is_refused_and_the_good_one_kept(tmp_path: Path, forgery: str) -> None:
    clock = Clock()
    async with Relay(relay_config(CA, tmp_path, clock=clock)) as relay:
        await push(relay, CA.crl(number=1))
        alice = node(ALICE, relay, clock)
        async with running(alice):
            await asyncio.sleep(0.2)
            if forgery == "rogue-ca":
                bad = ROGUE_CA.crl([BOB.serial], number=9)
            elif forgery == "bit-flip":
                good = bytearray(CA.crl([BOB.serial], number=9))
                good[len(good) // 2] ^= 0x01
                bad = bytes(good)
            else:
                bad = b"not a crl"
            alice.revocations.on_crl(bad, alice.certificate)
            event = await next_event(alice, "crl_invalid")
            assert event.peer is None
            assert alice.status()["feed"]["crl_number"] == 1
