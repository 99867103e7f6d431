"""protocol.prekeys: when the responder's signed prekey rotates early; and a node that is told so
rotates and publishes at once (real nodes, a real relay)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import msgpack
import pytest

from node.bundles import Bundles
from node.home import NS_NODE
from node.journal import Journal
from node.keystore import Keystore
from node.options import NodeOptions
from protocol import prekeys, wire
from protocol.errors import DecodeError, ReplayCacheQuota, ReplayedInitialMessage
from protocol.identity import X25519KeyPair
from protocol.messages import PrekeyBundle
from protocol.prekeys import MAX_REPLAY_PER_INITIATOR, NS_REPLAY, ROTATE_EARLY_AT, PrekeyChanges, PrekeySecrets
from relay.server import Relay
from tests.support.handshake import init_of, initiate, refused_by_responder, respond, v1_record
from tests.support.lab import make_node, next_message, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA, MALLORY, make_prekeys, reloaded


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
    restored = reloaded(bob.secrets)
    assert not restored.quota_left(1, ALICE.identity.public_bytes)
    assert restored.quota_left(1, MALLORY.identity.public_bytes)
    # Mallory has her own share.
    respond(initiate(bob.fetch(), initiator=MALLORY, expected="bob").frame, bob)
    assert reloaded(bob.secrets).quota_used(1, MALLORY.identity.public_bytes) == 1
    # A format-1 state written before the quota existed (cache entries of two fields, no schedule)
    # restores with none used, and its entries move out as records that count for nobody.
    fmt, spk, kem, onetime, issued, seen, _schedule = v1_record(bob.secrets)
    old = PrekeySecrets.from_bytes(msgpack.packb([fmt, spk, kem, onetime, issued, [e[:2] for e in seen]]))
    assert old.quota_left(1, ALICE.identity.public_bytes) and old.replay_count(1) == MAX_REPLAY_PER_INITIATOR + 1
    moved = old.take_changes()
    assert set(moved.puts.values()) == {b""} and len(moved.puts) == old.replay_count(1)
    assert reloaded(old).quota_used(1, ALICE.identity.public_bytes) == 0


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
    # A format-1 state written before the schedule moved in (six fields) is due for a rotation at once.
    legacy = [1, *msgpack.unpackb(account.to_bytes())[1:5], []]
    assert PrekeySecrets.from_bytes(msgpack.packb(legacy)).rotation_due(2401)


# --- the records an account is kept in -------------------------------------------------------------------


def entry(spk_id: int, ephemeral: bytes) -> tuple[str, str]:
    return (NS_REPLAY, f"{spk_id}:{ephemeral.hex()}")


def test_an_init_without_a_one_time_prekey_writes_one_replay_entry_not_the_account() -> None:
    bob = make_prekeys(BOB, onetime=1)
    bob.secrets.take_changes()  # what making the account wrote
    assert bob.secrets.take_changes() == PrekeyChanges()
    with_otpk = initiate(bob.fetch())
    respond(with_otpk.frame, bob)
    consumed = bob.secrets.take_changes()  # the account (its one-time prekeys) and no entry
    assert consumed.account == bob.secrets.to_bytes() and not consumed.puts and not consumed.deletes
    without = initiate(bob.fetch(with_onetime=False))
    respond(without.frame, bob)
    ephemeral = init_of(without).ephemeral
    assert bob.secrets.take_changes() == PrekeyChanges(None, {entry(1, ephemeral): ALICE.identity.public_bytes})
    # What the node stores is enough to refuse both as replays after a restart.
    restored = dataclasses.replace(bob, secrets=reloaded(bob.secrets))
    refused_by_responder(with_otpk.frame, restored, ReplayedInitialMessage)
    refused_by_responder(without.frame, restored, ReplayedInitialMessage)


def test_destroying_a_signed_prekey_deletes_its_replay_entries() -> None:
    bob = make_prekeys(BOB, onetime=0)
    ephemerals = [init_of(i).ephemeral for i in (initiate(bob.fetch()), initiate(bob.fetch()))]
    respond(initiate(bob.fetch()).frame, bob)
    bob.secrets.take_changes()
    for _ in range(2):
        respond(initiate(bob.fetch()).frame, bob)  # written by a commit still pending when the prekey goes
    bob.secrets.drop_signed(1)
    changes = bob.secrets.take_changes()
    assert changes.account is not None and not changes.puts
    assert len(changes.deletes) == 3 and all(name.startswith("1:") for _, name in changes.deletes)
    assert entry(1, ephemerals[0]) not in changes.deletes  # never accepted: never entered


def test_a_format_1_account_moves_its_replay_cache_out_once() -> None:
    bob = make_prekeys(BOB, onetime=1)
    for _ in range(2):
        respond(initiate(bob.fetch(with_onetime=False)).frame, bob)
    respond(initiate(bob.fetch(with_onetime=False), initiator=MALLORY, expected="bob").frame, bob)
    v1 = msgpack.packb(v1_record(bob.secrets))
    old = PrekeySecrets.from_bytes(v1)
    moved = old.take_changes()
    assert moved.account == bob.secrets.to_bytes() and moved.puts == bob.secrets.replay_records()
    assert sorted(moved.puts.values()) == sorted([ALICE.identity.public_bytes] * 2 + [MALLORY.identity.public_bytes])
    assert old.take_changes() == PrekeyChanges()
    # Read again with its records already written (the move committed, the old record not yet
    # replaced): nothing is counted twice.
    again = PrekeySecrets.from_bytes(v1, [(name, value) for (_, name), value in moved.puts.items()])
    assert again.replay_count(1) == 3 and again.quota_used(1, ALICE.identity.public_bytes) == 2


def test_a_replay_entry_of_a_destroyed_prekey_is_deleted_at_load() -> None:
    bob = make_prekeys(BOB, onetime=0)
    late = ("7:" + "ab" * 32, ALICE.identity.public_bytes)
    restored = PrekeySecrets.from_bytes(bob.secrets.to_bytes(), [late])
    assert restored.replay_count(7) == 0
    assert restored.take_changes() == PrekeyChanges(None, {}, [(NS_REPLAY, late[0])])


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("one:" + "ab" * 32, b""),
        ("1:" + "zz" * 32, b""),
        ("1:" + "ab" * 31, b""),
        ("1" + "ab" * 32, b""),
        ("1:" + "ab" * 32, b"\x00" * 31),
    ],
    ids=["id not a number", "key not hex", "key short", "no colon", "initiator short"],
)
def test_a_malformed_replay_entry_is_refused_at_load(name: str, value: bytes) -> None:
    bob = make_prekeys(BOB, onetime=0)
    with pytest.raises(DecodeError):
        PrekeySecrets.from_bytes(bob.secrets.to_bytes(), [(name, value)])


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


def test_a_node_moves_a_format_1_replay_cache_into_records_of_its_own_at_load() -> None:
    bob = make_prekeys(BOB, onetime=1)
    for _ in range(2):
        respond(initiate(bob.fetch(with_onetime=False)).frame, bob)
    keystore = Keystore.memory()
    keystore.put(NS_NODE, "prekeys", msgpack.packb(v1_record(bob.secrets)))
    keystore.put(NS_REPLAY, "9:" + "ab" * 32, ALICE.identity.public_bytes)  # of a prekey already destroyed
    bundles = Bundles(keystore, Journal(keystore), NodeOptions(), node="bob")
    assert keystore.get(NS_NODE, "prekeys") == bob.secrets.to_bytes()  # format 2: no cache inside
    assert dict(keystore.items(NS_REPLAY)) == {name: v for (_, name), v in bob.secrets.replay_records().items()}
    assert bundles.account.quota_used(1, ALICE.identity.public_bytes) == 2
    # The next load reads the records and writes nothing.
    assert Bundles(keystore, Journal(keystore), NodeOptions(), node="bob").account.take_changes() == PrekeyChanges()
