"""protocol.ratchet: the Double Ratchet with AES-256-GCM (PROTOCOL.md §6).

Every refusal is checked to leave the state byte-identical (authenticate first, commit last), and
every bound (MAX_SKIP, MAX_SKIPPED_KEYS, MAX_OLD_CHAINS) is driven to its edge and past it.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable, Iterator

import msgpack
import pytest

from protocol.errors import (
    AuthenticationFailed,
    DecodeError,
    DuplicateMessage,
    LocalError,
    RatchetError,
    RemoteError,
    TooManySkipped,
    WeakKey,
)
from protocol.identity import X25519KeyPair
from protocol.keyschedule import kdf_ck, message_nonce
from protocol.messages import MAX_PLAINTEXT, VERSION, FrameType, RatchetMessage
from protocol.ratchet import MAX_OLD_CHAINS, MAX_SKIP, MAX_SKIPPED_KEYS, Ratchet, header_bytes

AD = b"\xad" * 32


def make_pair(
    keygen_a: Callable[[], X25519KeyPair] = X25519KeyPair.generate,
    keygen_b: Callable[[], X25519KeyPair] = X25519KeyPair.generate,
) -> tuple[Ratchet, Ratchet, X25519KeyPair]:
    """An initiator and a responder, as the handshake leaves them (the responder has not received yet)."""
    root = os.urandom(32)
    spk = X25519KeyPair.generate()
    eph = X25519KeyPair.generate()
    alice = Ratchet.initiator(root, ours=eph, theirs=spk.public, dh_output=eph.exchange(spk.public), keygen=keygen_a)
    bob = Ratchet.responder(root, theirs=eph.public, dh_output=spk.exchange(eph.public), keygen=keygen_b)
    return alice, bob, spk


@pytest.fixture
def pair() -> tuple[Ratchet, Ratchet]:
    alice, bob, _ = make_pair()
    return alice, bob


def refused(r: Ratchet, msg: RatchetMessage, exc: type[Exception], ad: bytes = AD) -> Exception:
    """Assert that `msg` is refused with `exc` and that the state is byte-identical afterwards."""
    before = r.to_bytes()
    with pytest.raises(exc) as info:
        r.decrypt(msg, ad)
    assert r.to_bytes() == before
    return info.value


def burst(r: Ratchet, count: int, tag: bytes = b"m") -> list[RatchetMessage]:
    return [r.encrypt(tag + b"%d" % i, AD) for i in range(count)]


def round_trip(a: Ratchet, b: Ratchet) -> None:
    """b answers, then a sends: a DH step on both sides, and `b` now receives on a new chain of a's."""
    assert a.decrypt(b.encrypt(b"pong", AD), AD) == b"pong"
    assert b.decrypt(a.encrypt(b"ping", AD), AD) == b"ping"


# --- the happy paths --------------------------------------------------------------------------------


def test_conversation_both_ways(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    for rnd in range(5):
        for i in range(3):
            assert bob.decrypt(alice.encrypt(b"a%d.%d" % (rnd, i), AD), AD) == b"a%d.%d" % (rnd, i)
        for i in range(2):
            assert alice.decrypt(bob.encrypt(b"b%d.%d" % (rnd, i), AD), AD) == b"b%d.%d" % (rnd, i)
    assert alice.skipped_count == bob.skipped_count == 0


def test_dh_step_on_every_change_of_direction(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    seen = set()
    for _ in range(4):
        m1, m2 = alice.encrypt(b"1", AD), alice.encrypt(b"2", AD)
        assert m1.dh == m2.dh == alice.ratchet_public  # one chain, one ratchet key
        assert (m1.n, m2.n) == (0, 1)
        bob.decrypt(m1, AD)
        bob.decrypt(m2, AD)
        reply = bob.encrypt(b"r", AD)
        assert reply.dh == bob.ratchet_public and reply.n == 0
        alice.decrypt(reply, AD)
        seen.update({m1.dh, reply.dh})
    assert len(seen) == 8  # a fresh ratchet key every time


def test_pn_carries_the_previous_chain_length(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    for m in burst(alice, 3):
        bob.decrypt(m, AD)
    alice.decrypt(bob.encrypt(b"r", AD), AD)
    nxt = alice.encrypt(b"x", AD)
    assert (nxt.pn, nxt.n) == (3, 0)
    assert alice.sent_in_chain == 1


def test_counters_and_can_send(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    assert alice.can_send and bob.can_send
    assert (alice.sent_in_chain, alice.received_in_chain) == (0, 0)
    for m in burst(alice, 4):
        bob.decrypt(m, AD)
    assert alice.sent_in_chain == 4 and bob.received_in_chain == 4


def test_empty_and_maximal_plaintexts(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    for text in (b"", b"\x00", os.urandom(MAX_PLAINTEXT)):
        msg = alice.encrypt(text, AD)
        assert len(msg.ciphertext) == len(text) + 16
        assert bob.decrypt(msg, AD) == text


def test_ciphertext_is_aes256gcm_with_header_as_ad(pair: tuple[Ratchet, Ratchet]) -> None:
    """The first message of a chain, recomputed by hand from the chain key: AES-256-GCM, nonce = n,
    AD = the exact header bytes followed by the caller's associated data."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    alice, _ = pair
    cks = alice._cks
    assert cks is not None
    _, mk = kdf_ck(cks)
    msg = alice.encrypt(b"text", AD)
    expected = AESGCM(mk).encrypt(message_nonce(0), b"text", header_bytes(msg.dh, msg.pn, msg.n) + AD)
    assert msg.ciphertext == expected
    assert header_bytes(msg.dh, 7, 9) == bytes([VERSION, FrameType.MESSAGE]) + msg.dh + (7).to_bytes(4, "big") + (
        9
    ).to_bytes(4, "big")


def test_keygen_seam_supplies_ratchet_keys() -> None:
    fixed = [X25519KeyPair.generate() for _ in range(4)]
    supply = iter(fixed)
    alice, bob, _ = make_pair(keygen_b=lambda: next(supply))
    assert bob.ratchet_public == fixed[0].public  # the responder's first sending key
    bob.decrypt(alice.encrypt(b"x", AD), AD)
    assert bob.ratchet_public == fixed[0].public  # same chain: no step yet
    alice.decrypt(bob.encrypt(b"y", AD), AD)
    bob.decrypt(alice.encrypt(b"z", AD), AD)
    assert bob.ratchet_public == fixed[1].public


# --- out of order -------------------------------------------------------------------------------------


def test_out_of_order_within_a_chain(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    msgs = burst(alice, 30)
    order = list(range(30))
    random.Random(5).shuffle(order)
    for i in order:
        assert bob.decrypt(msgs[i], AD) == b"m%d" % i
    assert bob.skipped_count == 0


def test_out_of_order_across_dh_steps(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    first = burst(alice, 3, b"a")  # chain 1
    bob.decrypt(first[0], AD)
    alice.decrypt(bob.encrypt(b"r", AD), AD)
    second = burst(alice, 2, b"b")  # chain 2, pn = 3
    assert bob.decrypt(second[1], AD) == b"b1"  # skips first[1:], second[0]
    assert bob.skipped_count == 3
    assert bob.decrypt(first[2], AD) == b"a2"
    assert bob.decrypt(second[0], AD) == b"b0"
    assert bob.decrypt(first[1], AD) == b"a1"
    assert bob.skipped_count == 0


def test_skip_exactly_max_skip_in_current_chain(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    msgs = burst(alice, MAX_SKIP + 1)
    assert bob.decrypt(msgs[MAX_SKIP], AD) == b"m%d" % MAX_SKIP
    assert bob.skipped_count == MAX_SKIP
    assert bob.decrypt(msgs[0], AD) == b"m0"
    assert bob.skipped_count == MAX_SKIP - 1


# --- tampering ------------------------------------------------------------------------------------------


def flips(msg: RatchetMessage) -> Iterator[tuple[str, RatchetMessage]]:
    for i in range(0, 256, 23):
        dh = bytearray(msg.dh)
        dh[i // 8] ^= 1 << (i % 8)
        yield f"dh bit {i}", dataclasses.replace(msg, dh=bytes(dh))
    for bit in (0, 5, 31):
        yield f"pn bit {bit}", dataclasses.replace(msg, pn=msg.pn ^ (1 << bit))
    for bit in (0, 3, 9):
        yield f"n bit {bit}", dataclasses.replace(msg, n=msg.n ^ (1 << bit))
    for i in range(0, len(msg.ciphertext) * 8, 13):
        ct = bytearray(msg.ciphertext)
        ct[i // 8] ^= 1 << (i % 8)
        yield f"ct bit {i}", dataclasses.replace(msg, ciphertext=bytes(ct))
    yield "ct truncated", dataclasses.replace(msg, ciphertext=msg.ciphertext[:-1])
    yield "ct extended", dataclasses.replace(msg, ciphertext=msg.ciphertext + b"\x00")


@pytest.mark.parametrize("new_chain", [False, True], ids=["current chain", "new chain"])
def test_tampered_messages_are_refused_without_state_change(pair: tuple[Ratchet, Ratchet], new_chain: bool) -> None:
    alice, bob = pair
    bob.decrypt(alice.encrypt(b"first", AD), AD)
    if new_chain:
        alice.decrypt(bob.encrypt(b"r", AD), AD)
    msg = alice.encrypt(b"secret text", AD)
    for label, bad in flips(msg):
        before = bob.to_bytes()
        # A changed header may be refused before authentication (a number already used, or too far
        # ahead); a changed key or ciphertext always fails authentication.
        with pytest.raises((AuthenticationFailed, TooManySkipped, DuplicateMessage)) as info:
            bob.decrypt(bad, AD)
        assert bob.to_bytes() == before, label
        if label.startswith(("dh", "ct")):
            assert isinstance(info.value, AuthenticationFailed), label
    assert bob.decrypt(msg, AD) == b"secret text"


def test_wrong_associated_data(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    msg = alice.encrypt(b"x", AD)
    refused(bob, msg, AuthenticationFailed, ad=b"\xae" * 32)
    refused(bob, msg, AuthenticationFailed, ad=b"")
    assert bob.decrypt(msg, AD) == b"x"


def test_tampered_skipped_message(pair: tuple[Ratchet, Ratchet]) -> None:
    """A message whose key is stored as skipped is authenticated too; the key stays until the real one."""
    alice, bob = pair
    msgs = burst(alice, 3)
    bob.decrypt(msgs[2], AD)
    bad = dataclasses.replace(msgs[0], ciphertext=bytes(16) + msgs[0].ciphertext[16:])
    refused(bob, bad, AuthenticationFailed)
    assert bob.skipped_count == 2
    assert bob.decrypt(msgs[0], AD) == b"m0"


def test_message_from_another_session_is_refused(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    other_alice, _, _ = make_pair()
    refused(bob, other_alice.encrypt(b"x", AD), AuthenticationFailed)
    assert bob.decrypt(alice.encrypt(b"y", AD), AD) == b"y"


def test_low_order_ratchet_key_is_refused(pair: tuple[Ratchet, Ratchet]) -> None:
    """A forged message whose ratchet key is a low-order point: the DH step would yield zeros.
    It is refused (WeakKey, a RemoteError but not a RatchetError) before anything is derived."""
    alice, bob = pair
    bob.decrypt(alice.encrypt(b"x", AD), AD)
    forged = RatchetMessage(bytes(32), 0, 0, bytes(32))
    err = refused(bob, forged, WeakKey)
    assert isinstance(err, RemoteError) and not isinstance(err, RatchetError)


# --- duplicates -----------------------------------------------------------------------------------------


def test_duplicate_in_current_chain(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    msgs = burst(alice, 3)
    for m in msgs:
        bob.decrypt(m, AD)
    for m in msgs:
        refused(bob, m, DuplicateMessage)


def test_duplicate_of_a_skipped_message(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    msgs = burst(alice, 3)
    bob.decrypt(msgs[2], AD)
    bob.decrypt(msgs[0], AD)
    refused(bob, msgs[0], DuplicateMessage)
    refused(bob, msgs[2], DuplicateMessage)


def test_duplicate_in_an_old_chain(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    old = burst(alice, 2)
    for m in old:
        bob.decrypt(m, AD)
    round_trip(alice, bob)
    for m in old:
        err = refused(bob, m, DuplicateMessage)
        assert "earlier chain" in str(err)


# --- bounds ---------------------------------------------------------------------------------------------


def test_max_skip_exceeded_in_current_chain(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    msgs = burst(alice, MAX_SKIP + 2)
    refused(bob, msgs[MAX_SKIP + 1], TooManySkipped)
    # A forged header far ahead is refused before any key is derived.
    refused(bob, RatchetMessage(msgs[0].dh, 0, 2**32 - 1, bytes(16)), TooManySkipped)
    # Within bounds, the same chain still works.
    assert bob.decrypt(msgs[MAX_SKIP], AD) == b"m%d" % MAX_SKIP


def test_max_skip_after_some_received(pair: tuple[Ratchet, Ratchet]) -> None:
    """The bound counts from the next expected number, not from zero."""
    alice, bob = pair
    msgs = burst(alice, MAX_SKIP + 12)
    for m in msgs[:10]:
        bob.decrypt(m, AD)
    refused(bob, msgs[10 + MAX_SKIP + 1], TooManySkipped)
    assert bob.decrypt(msgs[10 + MAX_SKIP], AD) is not None


def test_max_skip_exceeded_across_a_dh_step(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    old = burst(alice, 601)  # chain 1: bob receives only the first
    bob.decrypt(old[0], AD)
    alice.decrypt(bob.encrypt(b"r", AD), AD)
    new = burst(alice, 402)  # chain 2: pn = 601
    assert new[0].pn == 601
    # 600 left in the old chain + 401 in the new one = 1001 > MAX_SKIP.
    refused(bob, new[401], TooManySkipped)
    # 600 + 400 = MAX_SKIP exactly: accepted, and every skipped key is kept.
    assert bob.decrypt(new[400], AD) == b"m400"
    assert bob.skipped_count == MAX_SKIP
    assert bob.decrypt(old[600], AD) == b"m600"
    assert bob.decrypt(new[0], AD) == b"m0"


def test_skipped_keys_are_evicted_oldest_first(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    chains = []
    for _ in range(3):
        msgs = burst(alice, MAX_SKIP + 1)
        bob.decrypt(msgs[MAX_SKIP], AD)  # MAX_SKIP keys skipped per chain
        assert bob.skipped_count <= MAX_SKIPPED_KEYS
        chains.append(msgs)
        round_trip(alice, bob)
    assert bob.skipped_count == MAX_SKIPPED_KEYS
    # The first chain's keys went first: its messages are now refused, and the state stays put.
    for m in (chains[0][0], chains[0][MAX_SKIP - 1]):
        refused(bob, m, DuplicateMessage)
    # The later chains' keys are all still there.
    assert bob.decrypt(chains[1][0], AD) == b"m0"
    assert bob.decrypt(chains[2][MAX_SKIP - 1], AD) == b"m%d" % (MAX_SKIP - 1)
    assert bob.skipped_count == MAX_SKIPPED_KEYS - 2


def test_eviction_within_one_chain_keeps_the_newest() -> None:
    """With the store full, skipping more in the current chain evicts the oldest keys, not the new ones."""
    alice, bob, _ = make_pair()
    for _ in range(2):
        msgs = burst(alice, MAX_SKIP + 1)
        bob.decrypt(msgs[MAX_SKIP], AD)
        round_trip(alice, bob)
    assert bob.skipped_count == MAX_SKIPPED_KEYS
    msgs = burst(alice, 12)
    bob.decrypt(msgs[11], AD)  # 11 more skipped: 11 oldest evicted
    assert bob.skipped_count == MAX_SKIPPED_KEYS
    assert bob.decrypt(msgs[0], AD) == b"m0"


@pytest.mark.parametrize("steps", [MAX_OLD_CHAINS, MAX_OLD_CHAINS + 1])
def test_old_chains_are_bounded(steps: int) -> None:
    """A skipped key survives MAX_OLD_CHAINS DH steps; one more and its chain (and key) is dropped."""
    alice, bob, _ = make_pair()
    lost = burst(alice, 2)
    bob.decrypt(lost[1], AD)  # lost[0] skipped, in chain 1
    for _ in range(steps):
        round_trip(alice, bob)
    assert len(bob._old_chains) == min(steps, MAX_OLD_CHAINS)
    if steps <= MAX_OLD_CHAINS:
        assert bob.decrypt(lost[0], AD) == b"m0"
    else:
        assert bob.skipped_count == 0
        # The chain is forgotten: the message looks like a new chain and fails authentication.
        refused(bob, lost[0], AuthenticationFailed)


# --- local errors ---------------------------------------------------------------------------------------


def test_responder_without_sending_chain_cannot_send() -> None:
    """A Signal-style responder (its signed prekey as first ratchet key, no sending chain) must receive first."""
    root = os.urandom(32)
    spk = X25519KeyPair.generate()
    eph = X25519KeyPair.generate()
    bob = Ratchet(root_key=root, dhs=spk, dhr=None, cks=None, ckr=None)
    assert not bob.can_send
    with pytest.raises(LocalError):
        bob.encrypt(b"too early", AD)
    alice = Ratchet.initiator(root, ours=eph, theirs=spk.public, dh_output=eph.exchange(spk.public))
    assert bob.decrypt(alice.encrypt(b"hi", AD), AD) == b"hi"
    assert bob.can_send
    assert alice.decrypt(bob.encrypt(b"now", AD), AD) == b"now"


def test_sending_chain_exhausted(pair: tuple[Ratchet, Ratchet]) -> None:
    """Message numbers are u32: the last one a chain may use is 2**32 - 2 (reachable through a restored state)."""
    alice, _ = pair
    fields = msgpack.unpackb(alice.to_bytes())
    fields[6] = 2**32 - 2  # ns
    nearly = Ratchet.from_bytes(msgpack.packb(fields))
    last = nearly.encrypt(b"last", AD)
    assert last.n == 2**32 - 2
    before = nearly.to_bytes()
    with pytest.raises(LocalError, match="exhausted"):
        nearly.encrypt(b"one too many", AD)
    assert nearly.to_bytes() == before


def test_plaintext_too_long(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, _ = pair
    before = alice.to_bytes()
    with pytest.raises(LocalError):
        alice.encrypt(b"\x00" * (MAX_PLAINTEXT + 1), AD)
    assert alice.to_bytes() == before


# --- persistence ----------------------------------------------------------------------------------------


def test_state_round_trip_mid_conversation(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    pending = burst(alice, 5)
    bob.decrypt(pending[4], AD)
    for _ in range(3):
        round_trip(alice, bob)
    late = burst(alice, 3)
    bob.decrypt(late[2], AD)
    state = bob.to_bytes()
    assert bob.to_bytes() == state  # serialising does not change anything
    restored = Ratchet.from_bytes(state)
    assert restored.to_bytes() == state
    assert repr(restored) == repr(bob)
    for m in (pending[0], late[0], pending[3], late[1]):
        assert restored.decrypt(m, AD) == bob.decrypt(m, AD)
    assert restored.to_bytes() == bob.to_bytes()


def test_restored_state_keeps_using_the_keygen(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    bob.decrypt(alice.encrypt(b"x", AD), AD)
    fixed = X25519KeyPair.generate()
    restored = Ratchet.from_bytes(bob.to_bytes(), keygen=lambda: fixed)
    alice.decrypt(restored.encrypt(b"y", AD), AD)
    restored.decrypt(alice.encrypt(b"z", AD), AD)
    assert restored.ratchet_public == fixed.public


def ratchet_state_fields(pair: tuple[Ratchet, Ratchet]) -> list[object]:
    alice, bob = pair
    msgs = burst(alice, 3)
    bob.decrypt(msgs[2], AD)
    round_trip(alice, bob)
    return list(msgpack.unpackb(bob.to_bytes()))


def _set(index: int, value: object) -> Callable[[list[object]], list[object]]:
    def edit(fields: list[object]) -> list[object]:
        fields = list(fields)
        fields[index] = value
        return fields

    return edit


MALFORMED_RATCHET: dict[str, Callable[[list[object]], object]] = {
    "format 2": _set(0, 2),
    "root key short": _set(1, b"\x00" * 31),
    "root key str": _set(1, "k" * 32),
    "dhs private nil": _set(2, None),
    "dhr short": _set(3, b"\x00" * 31),
    "cks int": _set(4, 5),
    "ckr long": _set(5, b"\x00" * 33),
    "ckr without dhr": lambda f: [*f[:3], None, *f[4:]],
    "ns negative": _set(6, -1),
    "nr too large": _set(7, 2**32),
    "pn bool": _set(8, True),
    "skipped not a list": _set(9, b"\x00"),
    "skipped entry short": _set(9, [[b"\x00" * 32, 1]]),
    "skipped entry bad key": _set(9, [[b"\x00" * 32, 1, b"\x00" * 31]]),
    "skipped entry bad n": _set(9, [[b"\x00" * 32, "1", b"\x00" * 32]]),
    "skipped entry not a list": _set(9, [b"\x00" * 32]),
    "too many skipped": _set(9, [[b"\x00" * 32, i, b"\x00" * 32] for i in range(MAX_SKIPPED_KEYS + 1)]),
    "old chains not a list": _set(10, None),
    "old chain short": _set(10, [b"\x00" * 31]),
    "too many old chains": _set(10, [b"\x00" * 32] * (MAX_OLD_CHAINS + 1)),
    "one field short": lambda f: f[:-1],
    "one field more": lambda f: [*f, 0],
    "not an array": lambda f: 1,
    "a map": lambda f: {"v": 1},
    "bin of 11 bytes": lambda f: bytes(range(1, 12)),
}


@pytest.mark.parametrize("edit", MALFORMED_RATCHET.values(), ids=MALFORMED_RATCHET.keys())
def test_from_bytes_refuses_malformed_state(
    pair: tuple[Ratchet, Ratchet], edit: Callable[[list[object]], object]
) -> None:
    data = msgpack.packb(edit(ratchet_state_fields(pair)))
    with pytest.raises(DecodeError):
        Ratchet.from_bytes(data)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x9b", msgpack.packb("state"), b"\x00" * 40], ids=repr)
def test_from_bytes_refuses_non_state_bytes(data: bytes) -> None:
    with pytest.raises(DecodeError):
        Ratchet.from_bytes(data)


# --- the initiator before its first reply, and the accept hook ---------------------------------------------


def test_initiator_state_round_trips_before_the_first_reply() -> None:
    """The initiator knows the responder's signed prekey (dhr) but has no receiving chain yet: persistable."""
    alice, bob, spk = make_pair()
    assert alice._dhr == spk.public and alice._ckr is None
    restored = Ratchet.from_bytes(alice.to_bytes())
    assert restored.to_bytes() == alice.to_bytes()
    assert bob.decrypt(restored.encrypt(b"after restore", AD), AD) == b"after restore"
    assert restored.decrypt(bob.encrypt(b"reply", AD), AD) == b"reply"
    # The signed prekey's "chain" was never received on: nothing of it is remembered.
    assert restored._old_chains == []


@pytest.mark.parametrize("n", [0, 1, MAX_SKIP + 5])
def test_forged_message_on_the_signed_prekey_is_refused(n: int) -> None:
    """The responder's signed prekey is public (in the bundle) and never sends: a message claiming it as
    ratchet key is a forgery, refused as such (not an assertion or a crash)."""
    alice, _, spk = make_pair()
    refused(alice, RatchetMessage(spk.public, 0, n, bytes(32)), AuthenticationFailed)


def test_initiator_ratchet_is_usable_in_memory_before_the_reply() -> None:
    alice, bob, _ = make_pair()
    alice.encrypt(b"lost", AD)
    assert bob.decrypt(alice.encrypt(b"y", AD), AD) == b"y"
    assert bob.skipped_count == 1


class Refuse(Exception):
    pass


def refuse(plaintext: bytes) -> None:
    raise Refuse(plaintext)


def test_accept_hook_sees_plaintext_and_can_refuse_on_every_path(pair: tuple[Ratchet, Ratchet]) -> None:
    """`accept` runs after authentication and before commit, on each of the four receive paths."""
    alice, bob = pair
    seen: list[bytes] = []
    msgs = burst(alice, 3)
    # in order
    before = bob.to_bytes()
    with pytest.raises(Refuse):
        bob.decrypt(msgs[0], AD, refuse)
    assert bob.to_bytes() == before
    assert bob.decrypt(msgs[0], AD, seen.append) == b"m0"
    # current chain, skipping one
    before = bob.to_bytes()
    with pytest.raises(Refuse):
        bob.decrypt(msgs[2], AD, refuse)
    assert bob.to_bytes() == before
    assert bob.decrypt(msgs[2], AD, seen.append) == b"m2"
    # a skipped key
    before = bob.to_bytes()
    with pytest.raises(Refuse):
        bob.decrypt(msgs[1], AD, refuse)
    assert bob.to_bytes() == before and bob.skipped_count == 1
    assert bob.decrypt(msgs[1], AD, seen.append) == b"m1"
    # a new chain (a DH step)
    alice.decrypt(bob.encrypt(b"r", AD), AD)
    step = alice.encrypt(b"new chain", AD)
    before = bob.to_bytes()
    with pytest.raises(Refuse):
        bob.decrypt(step, AD, refuse)
    assert bob.to_bytes() == before
    assert bob.decrypt(step, AD, seen.append) == b"new chain"
    assert seen == [b"m0", b"m2", b"m1", b"new chain"]


def test_accept_hook_is_not_called_for_unauthenticated_messages(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    msg = alice.encrypt(b"x", AD)
    bad = dataclasses.replace(msg, ciphertext=bytes(len(msg.ciphertext)))
    called: list[bytes] = []
    with pytest.raises(AuthenticationFailed):
        bob.decrypt(bad, AD, called.append)
    assert called == []


# --- reservations: one durable write per many messages, never a reused key -------------------------


def test_a_reservation_is_made_when_needed_and_bounds_sending(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    assert alice.reserve(3) is True
    assert alice.reserve(3) is False  # still inside the reservation
    for i in range(3):
        assert bob.decrypt(alice.encrypt(b"m%d" % i, AD), AD) == b"m%d" % i
    with pytest.raises(LocalError, match="reservation used up"):
        alice.encrypt(b"beyond", AD)
    assert alice.reserve(3) is True
    assert bob.decrypt(alice.encrypt(b"m3", AD), AD) == b"m3"


def test_a_crash_resumes_past_the_reservation_and_the_peer_bridges_the_gap(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    alice.reserve(10)
    persisted = alice.to_bytes()  # what is on disk before anything is sent
    sent = [alice.encrypt(b"m%d" % i, AD) for i in range(4)]  # then the process dies
    restored = Ratchet.from_bytes(persisted)
    after = restored.encrypt(b"after the crash", AD)
    assert after.n == 10 and all(m.n < 10 for m in sent)  # no message number (so no key) twice
    assert bob.decrypt(after, AD) == b"after the crash"
    assert [bob.decrypt(m, AD) for m in sent] == [b"m%d" % i for i in range(4)]  # late ones still open


def test_a_new_sending_chain_starts_without_a_reservation(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, bob = pair
    alice.reserve(5)
    bob.decrypt(alice.encrypt(b"ping", AD), AD)
    bob.reserve(5)
    alice.decrypt(bob.encrypt(b"pong", AD), AD)  # alice steps: a new sending chain
    assert alice.reserve(5) is True


def test_reservation_bounds(pair: tuple[Ratchet, Ratchet]) -> None:
    alice, _ = pair
    for ahead in (0, MAX_SKIP // 2 + 1):
        with pytest.raises(LocalError, match="reserve between"):
            alice.reserve(ahead)
    no_chain = Ratchet(root_key=bytes(32), dhs=X25519KeyPair.generate(), dhr=None, cks=None, ckr=None)
    with pytest.raises(LocalError, match="no sending chain"):
        no_chain.reserve(1)
