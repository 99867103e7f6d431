"""protocol.prekeys: when the responder's signed prekey rotates early; and a node that is told so
rotates and publishes at once (real nodes, a real relay)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest
from conftest import ALICE, BOB, CA, MALLORY, make_prekeys
from lab import make_node, next_message, publish_crl, relay_config, running
from test_handshake import initiate, refused_by_responder, respond

from protocol import prekeys, wire
from protocol.errors import ReplayCacheQuota
from protocol.identity import X25519KeyPair
from protocol.messages import PrekeyBundle
from protocol.prekeys import MAX_REPLAY_PER_INITIATOR, ROTATE_EARLY_AT, PrekeySecrets
from relay.server import Relay


def test_rotation_is_wanted_when_the_replay_cache_fills_or_the_one_time_prekeys_run_out() -> None:
    assert not PrekeySecrets().rotation_wanted()  # nothing to rotate yet
    bob = make_prekeys(BOB, onetime=1)
    assert not bob.secrets.rotation_wanted()
    respond(initiate(bob.fetch()).frame, bob)  # takes the last one-time prekey
    assert bob.secrets.rotation_wanted()
    bob.secrets.add_onetime(bob.secrets.next_onetime_id, X25519KeyPair.generate())
    assert not bob.secrets.rotation_wanted()
    bob.secrets._seen[1] = {i.to_bytes(32, "big") for i in range(ROTATE_EARLY_AT)}
    assert bob.secrets.rotation_wanted()
    bob.secrets.add_signed(2, X25519KeyPair.generate())  # the new one starts with an empty cache
    assert not bob.secrets.rotation_wanted()


def test_each_initiator_has_a_share_of_the_replay_cache_kept_across_a_restart() -> None:
    bob = make_prekeys(BOB, onetime=0)
    for _ in range(MAX_REPLAY_PER_INITIATOR):
        respond(initiate(bob.fetch()).frame, bob)
    refused_by_responder(initiate(bob.fetch()).frame, bob, ReplayCacheQuota)
    restored = PrekeySecrets.from_bytes(bob.secrets.to_bytes())
    assert not restored.quota_left(1, ALICE.identity.public_bytes)
    assert restored.quota_left(1, MALLORY.identity.public_bytes)
    # Mallory has her own share.
    respond(initiate(bob.fetch(), initiator=MALLORY, expected="bob").frame, bob)
    # A state written before the quota existed (cache entries of two fields) restores with none used.
    fmt, spk, kem, onetime, issued, seen, _schedule = msgpack.unpackb(bob.secrets.to_bytes())
    old = PrekeySecrets.from_bytes(msgpack.packb([fmt, spk, kem, onetime, issued, [e[:2] for e in seen]]))
    assert old.quota_left(1, ALICE.identity.public_bytes) and len(old._seen[1]) == MAX_REPLAY_PER_INITIATOR + 1


def test_the_rotation_schedule_lives_in_the_account_and_survives_a_restart() -> None:
    account = PrekeySecrets()
    assert account.rotation_due(0)  # never rotated
    account.add_signed(1, X25519KeyPair.generate())
    assert account.rotated(1, 1000.0, every=700.0, grace=200.0) == []
    assert not account.rotation_due(1699) and account.rotation_due(1700)
    account.add_signed(2, X25519KeyPair.generate())
    assert account.rotated(2, 1700.0, every=700.0, grace=200.0) == []  # 1 is kept for its grace period
    account = PrekeySecrets.from_bytes(account.to_bytes())
    account.add_signed(3, X25519KeyPair.generate())
    assert account.rotated(3, 2400.0, every=700.0, grace=200.0) == [1]  # past its grace: destroyed
    assert account.signed_ids() == [2, 3]
    # A state written before the schedule moved in (six fields) is due for a rotation at once.
    legacy = msgpack.unpackb(account.to_bytes())[:6]
    assert PrekeySecrets.from_bytes(msgpack.packb(legacy)).rotation_due(2401)


async def published_spk(relay: Relay) -> int | None:
    stored = await relay.store.take_bundle("bob")
    frame = wire.decode(stored[0]) if stored is not None else None
    return frame.spk_id if isinstance(frame, PrekeyBundle) else None


async def test_a_node_asked_to_rotate_early_publishes_a_new_signed_prekey_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        bob = make_node(CA, BOB, relay.url)
        async with running(alice, bob):
            assert bob.prekeys.signed_ids() == [1]
            monkeypatch.setattr(prekeys.PrekeySecrets, "rotation_wanted", lambda self: self.signed_ids() == [1])
            await alice.send("bob", "hello")
            assert (await next_message(bob)).text == "hello"
            async with asyncio.timeout(5):  # published at once: the relay hands out the new one
                while await published_spk(relay) != 2:
                    await asyncio.sleep(0.01)
            assert bob.prekeys.signed_ids() == [1, 2]  # the old one stays for INITs in flight
