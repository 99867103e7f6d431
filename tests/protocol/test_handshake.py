"""protocol.handshake: the signed hybrid handshake, every refusal on both sides, prekey state, the peer state machine.

Each responder-side refusal is also checked to leave the responder's prekey state byte-identical (nothing
is consumed, nothing enters the replay cache, unless message 0 authenticated).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

from protocol import handshake, wire
from protocol.certs import CLOCK_SKEW, VerifiedCertificate
from protocol.errors import (
    AuthenticationFailed,
    BadSignature,
    CertificateExpired,
    CertificateNotYetValid,
    CertificateRevoked,
    DecodeError,
    HandshakeError,
    LocalError,
    NameMismatch,
    NoRevocationData,
    ReplayedInitialMessage,
    StaleFeed,
    SuiteError,
    UnknownPrekey,
    UntrustedIssuer,
    WeakKey,
)
from protocol.handshake import (
    MAX_BUNDLE_AGE,
    MAX_ONETIME_PREKEYS,
    MAX_REPLAY_CACHE,
    PrekeySecrets,
    decode_init,
)
from protocol.identity import X25519KeyPair
from protocol.messages import PrekeyBundle, Suite
from protocol.revocation import RevocationState
from protocol.session import Kind, Received
from tests.support.handshake import init_of, initiate, refused_by_responder, respond, v1_record
from tests.support.pki import (
    ALICE,
    BOB,
    CA,
    DAY,
    HOUR,
    MALLORY,
    NOW,
    ROGUE_CA,
    Node,
    Prekeys,
    establish,
    make_prekeys,
    reloaded,
    stored,
    x25519,
)

LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def flip(data: bytes, index: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def signed_bundle(owner: Node, *, spk: Any, kem: Any = None, kem_id: int | None = None) -> PrekeyBundle:
    """A bundle signed by `owner`'s real identity key over whatever keys are given."""
    created = int((NOW - HOUR).timestamp())
    return handshake.make_bundle(owner.identity, owner.cert, created=created, spk_id=1, spk=spk, kem_id=kem_id, kem=kem)


# --- happy paths ----------------------------------------------------------------------------------------


def test_hybrid_with_onetime_prekey(bob_prekeys: Prekeys) -> None:
    assert bob_prekeys.secrets.onetime_count == 3
    initiated, responded = establish(CA, ALICE, bob_prekeys)
    init = init_of(initiated)
    assert init.suite == Suite.HYBRID and init.otpk_id == 1 and init.kem_id == 1
    assert init.kem_ciphertext is not None and init.signature is not None
    assert init.responder_fingerprint == BOB.fingerprint
    assert responded.first == Received(Kind.DATA, b"hello")
    assert isinstance(initiated.peer, VerifiedCertificate) and initiated.peer.name == "bob"
    assert responded.peer.name == "alice" and responded.peer.fingerprint == ALICE.fingerprint
    assert bob_prekeys.secrets.onetime_count == 2
    assert bob_prekeys.secrets.next_onetime_id == 4  # consumed ids are never reused
    a, b = initiated.session, responded.session
    assert a.decrypt(b.encrypt(b"hi alice")).data == b"hi alice"
    assert b.decrypt(a.encrypt(b"hi bob")).data == b"hi bob"


def test_hybrid_without_onetime_prekey(bob_prekeys: Prekeys) -> None:
    initiated, responded = establish(CA, ALICE, bob_prekeys, with_onetime=False)
    init = init_of(initiated)
    assert init.otpk_id is None
    assert bob_prekeys.secrets.onetime_count == 3  # untouched
    assert init.ephemeral in bob_prekeys.secrets._seen[1]  # remembered against replays
    assert responded.session.decrypt(initiated.session.encrypt(b"x")).data == b"x"


def test_each_handshake_gives_another_session(bob_prekeys: Prekeys) -> None:
    first, _ = establish(CA, ALICE, bob_prekeys)
    second, _ = establish(CA, ALICE, bob_prekeys)
    assert first.session.transcript != second.session.transcript


def test_classic_suite_when_both_sides_choose_it() -> None:
    prekeys = make_prekeys(BOB, kem=False)
    assert prekeys.bundle.kem is None and prekeys.bundle.kem_id is None
    initiated, responded = establish(CA, ALICE, prekeys, suite=Suite.CLASSIC, allowed=(Suite.CLASSIC,))
    init = init_of(initiated)
    assert init.suite == Suite.CLASSIC and init.kem_ciphertext is None and init.kem_id is None
    assert init.signature is not None
    assert initiated.session.suite == responded.session.suite == Suite.CLASSIC
    assert responded.first.data == b"hello"
    assert initiated.session.decrypt(responded.session.encrypt(b"ok")).data == b"ok"


def test_insecure_unsigned_when_the_responder_explicitly_allows_it() -> None:
    prekeys = make_prekeys(BOB, kem=False)
    initiated, responded = establish(
        CA, ALICE, prekeys, suite=Suite.INSECURE_UNSIGNED, allowed=(Suite.HYBRID, Suite.INSECURE_UNSIGNED)
    )
    init = init_of(initiated)
    assert init.suite == Suite.INSECURE_UNSIGNED and init.signature is None
    assert responded.session.suite == Suite.INSECURE_UNSIGNED
    assert responded.first.data == b"hello"
    assert initiated.session.decrypt(responded.session.encrypt(b"ok")).data == b"ok"


def test_insecure_unsigned_skips_the_bundle_signature() -> None:
    """What the mitm-unsigned scenario shows: an unsigned initiator accepts a bundle whose keys were swapped."""
    prekeys = make_prekeys(BOB, kem=False)
    swapped = dataclasses.replace(prekeys.fetch(), spk=x25519("mitm").public)
    with pytest.raises(BadSignature):
        initiate(swapped, suite=Suite.CLASSIC)
    initiated = initiate(swapped, suite=Suite.INSECURE_UNSIGNED)
    assert init_of(initiated).signature is None


def test_insecure_root_key_differs_from_classic() -> None:
    """Same keys, same transcript layout: the insecure suite's label keeps its keys apart from a real one."""
    prekeys = make_prekeys(BOB, kem=False, onetime=0)
    eph = x25519("fixed-ephemeral")
    bundle = prekeys.fetch()
    classic = initiate(bundle, suite=Suite.CLASSIC, keygen=lambda: eph)
    insecure = initiate(bundle, suite=Suite.INSECURE_UNSIGNED, keygen=lambda: eph)
    assert init_of(classic).ephemeral == init_of(insecure).ephemeral
    assert classic.session.ratchet._rk != insecure.session.ratchet._rk


def test_simultaneous_initiation_both_valid_and_one_wins() -> None:
    alice_prekeys, bob_prekeys = make_prekeys(ALICE), make_prekeys(BOB)
    from_alice = initiate(bob_prekeys.fetch())
    from_bob = initiate(alice_prekeys.fetch(), initiator=BOB, expected="alice")
    at_bob = respond(from_alice.frame, bob_prekeys)
    at_alice = respond(from_bob.frame, alice_prekeys)
    assert at_bob.first.data == at_alice.first.data == b"hello"
    # Which one both keep is protocol/peer.py's rank (tests/protocol/test_peer.py).
    assert at_bob.session.initiator == ALICE.fingerprint and at_alice.session.initiator == BOB.fingerprint
    assert at_bob.session.created == decode_init(from_alice.frame).created


def test_revocation_state_checks_pass_for_unrevoked_peers(crl_state: RevocationState, bob_prekeys: Prekeys) -> None:
    _, responded = establish(CA, ALICE, bob_prekeys, revocation=crl_state)
    assert responded.first.data == b"hello"


# --- initiator-side refusals (verify_bundle / initiate) ---------------------------------------------------


def test_bundle_certificate_from_a_rogue_ca() -> None:
    rogue_bob = ROGUE_CA.enrol("bob", 0x1002)
    with pytest.raises(UntrustedIssuer):
        initiate(make_prekeys(rogue_bob).fetch())


@pytest.mark.parametrize(
    ("not_before", "not_after", "exc"),
    [
        (NOW - 10 * DAY, NOW - DAY, CertificateExpired),
        (NOW + DAY, NOW + 10 * DAY, CertificateNotYetValid),
        (NOW - 10 * DAY, NOW - CLOCK_SKEW - HOUR, CertificateExpired),
    ],
    ids=["expired", "not yet valid", "expired beyond skew"],
)
def test_bundle_certificate_dates(not_before: datetime, not_after: datetime, exc: type[Exception]) -> None:
    bob = CA.enrol("bob", 0x2002, identity=BOB.identity, not_before=not_before, not_after=not_after)
    with pytest.raises(exc):
        initiate(make_prekeys(bob).fetch())


def test_bundle_certificate_within_clock_skew_is_accepted() -> None:
    bob = CA.enrol("bob", 0x2003, identity=BOB.identity, not_before=NOW - DAY, not_after=NOW - CLOCK_SKEW)
    initiate(make_prekeys(bob).fetch())


def test_bundle_for_another_name(bob_prekeys: Prekeys) -> None:
    with pytest.raises(NameMismatch):
        initiate(bob_prekeys.fetch(), expected="carol")
    with pytest.raises(NameMismatch):
        initiate(make_prekeys(MALLORY).fetch(), expected="bob")  # mallory passes off her bundle as bob's


def test_revoked_peer(bob_prekeys: Prekeys) -> None:
    with pytest.raises(CertificateRevoked) as info:
        initiate(bob_prekeys.fetch(), revocation=CA.revocation([BOB.serial]))
    assert info.value.serial == BOB.serial and info.value.reason == "key-compromise"


def test_stale_crl(bob_prekeys: Prekeys) -> None:
    stale = CA.revocation(this_update=NOW - 2 * DAY, next_update=NOW - CLOCK_SKEW - HOUR)
    with pytest.raises(StaleFeed):
        initiate(bob_prekeys.fetch(), revocation=stale)


def test_no_crl(bob_prekeys: Prekeys) -> None:
    with pytest.raises(NoRevocationData):
        initiate(bob_prekeys.fetch(), revocation=RevocationState())


BUNDLE_TAMPERING = {
    "signature bit": lambda b: dataclasses.replace(b, signature=flip(b.signature, 5)),
    "signature last bit": lambda b: dataclasses.replace(b, signature=flip(b.signature, 63)),
    "created": lambda b: dataclasses.replace(b, created=b.created + 1),
    "spk id": lambda b: dataclasses.replace(b, spk_id=2),
    "spk": lambda b: dataclasses.replace(b, spk=x25519("attacker").public),
    "kem id": lambda b: dataclasses.replace(b, kem_id=2),
    "kem key": lambda b: dataclasses.replace(b, kem=flip(b.kem, 100)),
    "kem stripped by a relay": lambda b: dataclasses.replace(b, kem=None, kem_id=None),
    "kem key stripped, id kept": lambda b: dataclasses.replace(b, kem=None),
    "otpk signature": lambda b: dataclasses.replace(b, otpk_signature=flip(b.otpk_signature, 1)),
    "otpk key": lambda b: dataclasses.replace(b, otpk=x25519("attacker-otpk").public),
    "otpk id": lambda b: dataclasses.replace(b, otpk_id=b.otpk_id + 1),
    "otpk signed by mallory": lambda b: b.with_onetime(
        handshake.make_onetime(MALLORY.identity, BOB.cert, 1, x25519("mallory-otpk"))
    ),
}


@pytest.mark.parametrize("tamper", BUNDLE_TAMPERING.values(), ids=BUNDLE_TAMPERING.keys())
def test_tampered_bundle_is_refused(bob_prekeys: Prekeys, tamper: Any) -> None:
    bundle = tamper(bob_prekeys.fetch())
    with pytest.raises(BadSignature):
        initiate(bundle)


def test_bundle_signed_by_another_identity(bob_prekeys: Prekeys) -> None:
    """A bundle signed by mallory's key under bob's certificate."""
    bundle = handshake.make_bundle(
        MALLORY.identity,
        BOB.cert,
        created=bob_prekeys.bundle.created,
        spk_id=1,
        spk=bob_prekeys.spk,
        kem_id=1,
        kem=bob_prekeys.kem,
    )
    with pytest.raises(BadSignature):
        initiate(bundle)


@pytest.mark.parametrize(
    ("created", "ok"),
    [
        (NOW - timedelta(seconds=MAX_BUNDLE_AGE), True),
        (NOW - timedelta(seconds=MAX_BUNDLE_AGE + 1), False),
        (NOW + CLOCK_SKEW, True),
        (NOW + CLOCK_SKEW + timedelta(seconds=1), False),
        (NOW - 400 * DAY, False),
    ],
    ids=["oldest accepted", "one second too old", "newest accepted", "in the future", "replayed from last year"],
)
def test_bundle_age(created: datetime, ok: bool) -> None:
    """A relay replaying an old (validly signed) bundle is refused; clock skew is tolerated."""
    bundle = make_prekeys(BOB, created=int(created.timestamp())).fetch()
    if ok:
        initiate(bundle)
    else:
        with pytest.raises(HandshakeError, match="bundle created at"):
            initiate(bundle)


def test_kem_id_without_kem_key_even_if_signed() -> None:
    bundle = signed_bundle(BOB, spk=x25519("spk"), kem=None, kem_id=1)
    with pytest.raises(HandshakeError, match="KEM id without a KEM key"):
        initiate(bundle)


def test_partial_onetime_prekey(bob_prekeys: Prekeys) -> None:
    bundle = bob_prekeys.fetch()
    for partial in (
        dataclasses.replace(bundle, otpk_signature=None),
        dataclasses.replace(bundle, otpk=None, otpk_signature=None),
        dataclasses.replace(bundle, otpk_id=None),
    ):
        with pytest.raises(HandshakeError, match="partial one-time prekey"):
            initiate(partial)


@pytest.mark.parametrize("suite", [Suite.CLASSIC, Suite.INSECURE_UNSIGNED])
def test_initiator_refuses_downgrade_when_the_bundle_offers_kem(bob_prekeys: Prekeys, suite: Suite) -> None:
    with pytest.raises(SuiteError, match="offers ML-KEM"):
        initiate(bob_prekeys.fetch(), suite=suite)


def test_hybrid_initiator_refuses_a_bundle_without_kem() -> None:
    with pytest.raises(SuiteError, match="no ML-KEM prekey"):
        initiate(make_prekeys(BOB, kem=False).fetch())


def test_weak_signed_prekey(bob_prekeys: Prekeys) -> None:
    bundle = signed_bundle(BOB, spk=SimpleNamespace(public=LOW_ORDER), kem=bob_prekeys.kem, kem_id=1)
    with pytest.raises(WeakKey):
        initiate(bundle)


def test_weak_onetime_prekey(bob_prekeys: Prekeys) -> None:
    onetime = handshake.make_onetime(BOB.identity, BOB.cert, 7, SimpleNamespace(public=LOW_ORDER))
    with pytest.raises(WeakKey):
        initiate(bob_prekeys.bundle.with_onetime(onetime))


# --- responder-side refusals (respond) ------------------------------------------------------------------


def test_unknown_suite(bob_prekeys: Prekeys) -> None:
    init = dataclasses.replace(init_of(initiate(bob_prekeys.fetch())), suite=9)
    refused_by_responder(init, bob_prekeys, SuiteError)


def test_insecure_unsigned_refused_by_a_default_responder() -> None:
    prekeys = make_prekeys(BOB, kem=False)
    initiated = initiate(prekeys.fetch(), suite=Suite.INSECURE_UNSIGNED)
    refused_by_responder(initiated.frame, prekeys, SuiteError)  # default allowed_suites: HYBRID only
    refused_by_responder(initiated.frame, prekeys, SuiteError, allowed=(Suite.HYBRID, Suite.CLASSIC))


def test_classic_refused_by_a_default_responder() -> None:
    prekeys = make_prekeys(BOB, kem=False)
    initiated = initiate(prekeys.fetch(), suite=Suite.CLASSIC)
    refused_by_responder(initiated.frame, prekeys, SuiteError)


@pytest.mark.parametrize("suite", [Suite.CLASSIC, Suite.INSECURE_UNSIGNED])
def test_responder_refuses_downgrade_when_its_bundle_offers_kem(bob_prekeys: Prekeys, suite: Suite) -> None:
    """An attacker strips the KEM key from the bundle the initiator sees (here: the initiator fetched a
    KEM-less bundle with the same signed prekey); the responder, whose bundle offers ML-KEM, refuses."""
    stripped = make_prekeys(BOB, kem=False)
    assert stripped.spk.public == bob_prekeys.spk.public
    initiated = initiate(stripped.fetch(with_onetime=False), suite=suite)
    err = refused_by_responder(
        initiated.frame, bob_prekeys, SuiteError, allowed=(Suite.HYBRID, Suite.CLASSIC, Suite.INSECURE_UNSIGNED)
    )
    assert "downgrade" in str(err)


def test_kem_fields_in_a_classic_init() -> None:
    prekeys = make_prekeys(BOB, kem=False)
    init = init_of(initiate(prekeys.fetch(), suite=Suite.CLASSIC))
    for bad in (dataclasses.replace(init, kem_id=1), dataclasses.replace(init, kem_ciphertext=b"\x00" * 1088)):
        refused_by_responder(bad, prekeys, HandshakeError, allowed=(Suite.CLASSIC,))


def test_init_addressed_to_another_certificate(bob_prekeys: Prekeys) -> None:
    initiated = initiate(bob_prekeys.fetch())
    mallory_prekeys = make_prekeys(MALLORY)
    err = refused_by_responder(initiated.frame, mallory_prekeys, HandshakeError)
    assert "another certificate" in str(err)
    # Re-addressed to mallory: the transcript names bob, so the signature fails.
    readdressed = dataclasses.replace(init_of(initiated), responder_fingerprint=MALLORY.fingerprint)
    refused_by_responder(readdressed, mallory_prekeys, BadSignature)


def test_initiator_certificate_from_a_rogue_ca(bob_prekeys: Prekeys) -> None:
    rogue_alice = ROGUE_CA.enrol("alice", 0x1001)
    initiated = initiate(bob_prekeys.fetch(), initiator=rogue_alice)  # alice's side checks only bob's bundle
    refused_by_responder(initiated.frame, bob_prekeys, UntrustedIssuer)


def test_initiator_certificate_expired(bob_prekeys: Prekeys) -> None:
    old_alice = CA.enrol("alice", 0x3001, identity=ALICE.identity, not_before=NOW - 9 * DAY, not_after=NOW - DAY)
    initiated = initiate(bob_prekeys.fetch(), initiator=old_alice)
    refused_by_responder(initiated.frame, bob_prekeys, CertificateExpired)


def test_initiator_certificate_not_yet_valid(bob_prekeys: Prekeys) -> None:
    future_alice = CA.enrol("alice", 0x3002, identity=ALICE.identity, not_before=NOW + DAY, not_after=NOW + 9 * DAY)
    initiated = initiate(bob_prekeys.fetch(), initiator=future_alice)
    refused_by_responder(initiated.frame, bob_prekeys, CertificateNotYetValid)


def test_initiator_revoked(bob_prekeys: Prekeys) -> None:
    initiated = initiate(bob_prekeys.fetch(), initiator=MALLORY)
    refused_by_responder(initiated.frame, bob_prekeys, CertificateRevoked, revocation=CA.revocation([MALLORY.serial]))


def test_responder_without_fresh_revocation_data(bob_prekeys: Prekeys) -> None:
    initiated = initiate(bob_prekeys.fetch())
    refused_by_responder(initiated.frame, bob_prekeys, NoRevocationData, revocation=RevocationState())
    stale = CA.revocation(this_update=NOW - 2 * DAY, next_update=NOW - HOUR)
    refused_by_responder(initiated.frame, bob_prekeys, StaleFeed, revocation=stale)


def test_unknown_signed_prekey(bob_prekeys: Prekeys) -> None:
    initiated = initiate(bob_prekeys.fetch())
    # The responder's published bundle is for another signed prekey (rotated).
    rotated = make_prekeys(BOB, spk_id=2, label="rotated")
    refused_by_responder(initiated.frame, bob_prekeys, UnknownPrekey, bundle=rotated.bundle)
    # The INIT names a prekey id we do not hold.
    refused_by_responder(dataclasses.replace(init_of(initiated), spk_id=99), bob_prekeys, UnknownPrekey)
    # The prekey was destroyed after its grace period.
    bob_prekeys.secrets.drop_signed(1)
    assert bob_prekeys.secrets.signed_ids() == []
    refused_by_responder(initiated.frame, bob_prekeys, UnknownPrekey)


def test_unknown_kem_prekey(bob_prekeys: Prekeys) -> None:
    init = init_of(initiate(bob_prekeys.fetch()))
    refused_by_responder(dataclasses.replace(init, kem_id=5), bob_prekeys, UnknownPrekey)
    refused_by_responder(dataclasses.replace(init, kem_id=None), bob_prekeys, UnknownPrekey)
    refused_by_responder(dataclasses.replace(init, kem_ciphertext=None), bob_prekeys, UnknownPrekey)
    # The bundle the responder holds for this KEM id names another key than the one it holds.
    other = make_prekeys(BOB, label="other-kem")
    assert other.bundle.kem_id == 1 and other.bundle.kem != bob_prekeys.bundle.kem
    mixed = dataclasses.replace(bob_prekeys.bundle, kem=other.bundle.kem)
    refused_by_responder(init, bob_prekeys, UnknownPrekey, bundle=mixed)
    bob_prekeys.secrets.drop_kem(1)
    refused_by_responder(init, bob_prekeys, UnknownPrekey)


def test_unknown_onetime_prekey(bob_prekeys: Prekeys) -> None:
    init = init_of(initiate(bob_prekeys.fetch()))
    err = refused_by_responder(dataclasses.replace(init, otpk_id=77), bob_prekeys, UnknownPrekey)
    assert "one-time prekey 77" in str(err)


def test_transcript_signature_bad_or_missing(bob_prekeys: Prekeys) -> None:
    init = init_of(initiate(bob_prekeys.fetch()))
    assert init.signature is not None
    refused_by_responder(dataclasses.replace(init, signature=flip(init.signature, 10)), bob_prekeys, BadSignature)
    refused_by_responder(dataclasses.replace(init, signature=None), bob_prekeys, BadSignature)
    # Fields the transcript covers cannot be changed either.
    refused_by_responder(dataclasses.replace(init, ephemeral=x25519("other-eph").public), bob_prekeys, BadSignature)
    assert init.kem_ciphertext is not None
    refused_by_responder(dataclasses.replace(init, kem_ciphertext=flip(init.kem_ciphertext)), bob_prekeys, BadSignature)
    # Another enrolled node's certificate on alice's INIT: the signature is alice's, not mallory's.
    refused_by_responder(dataclasses.replace(init, certificate=MALLORY.cert), bob_prekeys, BadSignature)
    assert respond(init, bob_prekeys).first.data == b"hello"


def test_replayed_init_with_onetime_prekey(bob_prekeys: Prekeys) -> None:
    initiated = initiate(bob_prekeys.fetch())
    assert respond(initiated.frame, bob_prekeys).first.data == b"hello"
    err = refused_by_responder(initiated.frame, bob_prekeys, ReplayedInitialMessage)
    assert "already consumed" in str(err)
    # And any lower id we do not hold any more is refused the same way.
    refused_by_responder(dataclasses.replace(init_of(initiated), otpk_id=0), bob_prekeys, ReplayedInitialMessage)


def test_replayed_init_without_onetime_prekey(bob_prekeys: Prekeys) -> None:
    initiated = initiate(bob_prekeys.fetch(with_onetime=False))
    assert respond(initiated.frame, bob_prekeys).first.data == b"hello"
    err = refused_by_responder(initiated.frame, bob_prekeys, ReplayedInitialMessage)
    assert "ephemeral key seen before" in str(err)
    # Once the signed prekey is destroyed, a replay names an unknown prekey.
    bob_prekeys.secrets.drop_signed(1)
    refused_by_responder(initiated.frame, bob_prekeys, UnknownPrekey)


def test_replay_detection_survives_persistence(bob_prekeys: Prekeys) -> None:
    with_otpk = initiate(bob_prekeys.fetch())
    without = initiate(bob_prekeys.fetch(with_onetime=False))
    respond(with_otpk.frame, bob_prekeys)
    respond(without.frame, bob_prekeys)
    restored = dataclasses.replace(bob_prekeys, secrets=reloaded(bob_prekeys.secrets))
    assert stored(restored.secrets) == stored(bob_prekeys.secrets)
    refused_by_responder(with_otpk.frame, restored, ReplayedInitialMessage)
    refused_by_responder(without.frame, restored, ReplayedInitialMessage)
    assert respond(initiate(restored.fetch()).frame, restored).first.data == b"hello"


def test_replay_cache_full(bob_prekeys: Prekeys) -> None:
    bob_prekeys.secrets._seen[1] = {i.to_bytes(32, "big") for i in range(MAX_REPLAY_CACHE)}
    initiated = initiate(bob_prekeys.fetch(with_onetime=False))
    err = refused_by_responder(initiated.frame, bob_prekeys, ReplayedInitialMessage)
    assert "replay cache full" in str(err)
    # With a one-time prekey the cache is not needed.
    assert respond(initiate(bob_prekeys.fetch()).frame, bob_prekeys).first.data == b"hello"


@pytest.mark.parametrize("with_onetime", [True, False], ids=["one-time prekey", "no one-time prekey"])
def test_tampered_message_zero_consumes_nothing(bob_prekeys: Prekeys, with_onetime: bool) -> None:
    initiated = initiate(bob_prekeys.fetch(with_onetime=with_onetime))
    init = init_of(initiated)
    msg = wire.decode_message(init.message)
    bad_ct = dataclasses.replace(msg, ciphertext=flip(msg.ciphertext, 3))
    refused_by_responder(dataclasses.replace(init, message=wire.encode(bad_ct)), bob_prekeys, AuthenticationFailed)
    refused_by_responder(dataclasses.replace(init, message=b"\x01not a frame"), bob_prekeys, DecodeError)
    # The genuine INIT still works afterwards, and only then is the prekey consumed.
    count = bob_prekeys.secrets.onetime_count
    assert respond(init, bob_prekeys).first.data == b"hello"
    assert bob_prekeys.secrets.onetime_count == count - (1 if with_onetime else 0)


def test_weak_ephemeral_from_an_enrolled_initiator(bob_prekeys: Prekeys) -> None:
    """A validly signed INIT (mallory is enrolled and signs it) whose ephemeral is a low-order point:
    the responder refuses it with WeakKey, and nothing is consumed. The keygen seam hands `initiate` a
    stand-in key pair whose public key is the low-order point."""
    fake = SimpleNamespace(public=LOW_ORDER, exchange=lambda public: b"\x01" * 32)
    for with_onetime in (True, False):
        initiated = initiate(bob_prekeys.fetch(with_onetime=with_onetime), initiator=MALLORY, keygen=lambda: fake)
        assert init_of(initiated).ephemeral == LOW_ORDER
        refused_by_responder(initiated.frame, bob_prekeys, WeakKey)


def test_decode_init_refusals(bob_prekeys: Prekeys) -> None:
    with pytest.raises(DecodeError, match="expected an initial message"):
        decode_init(wire.encode(bob_prekeys.bundle))
    with pytest.raises(DecodeError):
        decode_init(b"\x00garbage")
    initiated = initiate(bob_prekeys.fetch())
    assert decode_init(initiated.frame) == wire.decode(initiated.frame)


# --- PrekeySecrets -----------------------------------------------------------------------------------------


def test_prekey_secrets_bookkeeping() -> None:
    secrets = PrekeySecrets()
    assert secrets.next_onetime_id == 1 and secrets.onetime_count == 0 and secrets.signed_ids() == []
    secrets.add_signed(2, X25519KeyPair.generate())
    secrets.add_signed(1, X25519KeyPair.generate())
    assert secrets.signed_ids() == [1, 2]
    secrets.add_onetime(5, X25519KeyPair.generate())
    assert secrets.next_onetime_id == 6 and secrets.onetime_count == 1
    # One-time prekey ids only grow: an id at or below one already issued is a local mistake.
    for used in (5, 4, 0):
        with pytest.raises(LocalError):
            secrets.add_onetime(used, X25519KeyPair.generate())
    secrets.add_onetime(9, X25519KeyPair.generate())
    assert secrets.next_onetime_id == 10
    secrets.drop_signed(7)  # absent: no error
    secrets.drop_kem(7)
    secrets.drop_signed(2)
    assert secrets.signed_ids() == [1]


def test_prekey_secrets_onetime_limit_drops_the_oldest(bob_prekeys: Prekeys) -> None:
    """Past MAX_ONETIME_PREKEYS the oldest (handed out long ago and never used) makes room; an INIT that
    names it later is refused as a replay (its id is below the issued mark), never accepted."""
    secrets = bob_prekeys.secrets
    oldest = bob_prekeys.fetch()  # one-time prekey 1 handed out
    key = X25519KeyPair.generate()
    first_new = secrets.next_onetime_id
    for i in range(first_new, first_new + MAX_ONETIME_PREKEYS):
        secrets.add_onetime(i, key)
    assert secrets.onetime_count == MAX_ONETIME_PREKEYS
    assert 1 not in secrets._onetime and 2 not in secrets._onetime
    refused_by_responder(initiate(oldest).frame, bob_prekeys, ReplayedInitialMessage)


def test_prekey_secrets_round_trip(bob_prekeys: Prekeys) -> None:
    respond(initiate(bob_prekeys.fetch()).frame, bob_prekeys)
    respond(initiate(bob_prekeys.fetch(with_onetime=False)).frame, bob_prekeys)
    restored = reloaded(bob_prekeys.secrets)
    assert stored(restored) == stored(bob_prekeys.secrets)
    assert restored.onetime_count == 2 and restored.next_onetime_id == 4
    assert repr(restored) == repr(bob_prekeys.secrets)


def prekey_fields(prekeys: Prekeys) -> list[Any]:
    respond(initiate(prekeys.fetch()).frame, prekeys)
    respond(initiate(prekeys.fetch(with_onetime=False)).frame, prekeys)
    return list(msgpack.unpackb(prekeys.secrets.to_bytes()))


def prekey_fields_v1(prekeys: Prekeys) -> list[Any]:
    prekey_fields(prekeys)
    return v1_record(prekeys.secrets)


def _set(index: int, value: Any) -> Any:
    def edit(fields: list[Any]) -> Any:
        fields = list(fields)
        fields[index] = value
        return fields

    return edit


MALFORMED_PREKEYS = {
    "format 3": _set(0, 3),
    "spk not a list": _set(1, 5),
    "spk entry short": _set(1, [[1]]),
    "spk key short": _set(1, [[1, b"\x00" * 31]]),
    "spk key int": _set(1, [[1, 5]]),
    "spk id negative": _set(1, [[-1, b"\x00" * 32]]),
    "spk id too large": _set(1, [[2**32, b"\x00" * 32]]),
    "spk id bool": _set(1, [[True, b"\x00" * 32]]),
    "kem seed short": _set(2, [[1, b"\x00" * 63]]),
    "kem seed nil": _set(2, [[1, None]]),
    "onetime key long": _set(3, [[1, b"\x00" * 33]]),
    "issued mark a list": _set(4, [1]),
    "issued mark negative": _set(4, -1),
    "issued mark bool": _set(4, True),
    "issued mark too large": _set(4, 2**32),
    "two fields short": lambda f: f[:-2],
    "schedule missing": lambda f: f[:-1],
    "schedule not a pair": _set(5, [None]),
    "schedule time a string": _set(5, [b"soon", []]),
    "schedule time negative": _set(5, [-1.0, []]),
    "retire entry short": _set(5, [None, [[1]]]),
    "retire time bool": _set(5, [None, [[1, True]]]),
    "one field more": lambda f: [*f, []],
    "empty": lambda f: [],
    "not an array": lambda f: 7,
    "a string": lambda f: "state",
}

#: A format-1 record (read once, to move its replay cache out) is checked as strictly.
MALFORMED_PREKEYS_V1 = {
    "seen not a list": _set(5, 3),
    "seen entry short": _set(5, [[1]]),
    "seen negative entry": _set(5, [[1, [-1]]]),
    "seen id str": _set(5, [["1", []]]),
    "quota count negative": _set(5, [[1, [], [[b"\x00" * 32, -1]]]]),
    "two schedules": lambda f: [*f, [None, []]],
    "two fields short": lambda f: f[:-2],
}


@pytest.mark.parametrize("edit", MALFORMED_PREKEYS.values(), ids=MALFORMED_PREKEYS.keys())
def test_prekey_secrets_from_bytes_refuses_malformed_state(bob_prekeys: Prekeys, edit: Any) -> None:
    with pytest.raises(DecodeError):
        PrekeySecrets.from_bytes(msgpack.packb(edit(prekey_fields(bob_prekeys))))


@pytest.mark.parametrize("edit", MALFORMED_PREKEYS_V1.values(), ids=MALFORMED_PREKEYS_V1.keys())
def test_prekey_secrets_from_bytes_refuses_a_malformed_format_1_state(bob_prekeys: Prekeys, edit: Any) -> None:
    with pytest.raises(DecodeError):
        PrekeySecrets.from_bytes(msgpack.packb(edit(prekey_fields_v1(bob_prekeys))))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x96", b"\xa3abc", b"\x00" * 6], ids=repr)
def test_prekey_secrets_from_bytes_refuses_non_state_bytes(data: bytes) -> None:
    with pytest.raises(DecodeError):
        PrekeySecrets.from_bytes(data)


@pytest.mark.parametrize(
    "entry", [2**62, 2**63, 5, [1, 2, 3], b"\x00" * 31, b"\x00" * 33], ids=["2**62", "2**63", "5", "list", "31", "33"]
)
def test_prekey_secrets_from_bytes_refuses_non_key_replay_entries(bob_prekeys: Prekeys, entry: Any) -> None:
    """Replay-cache entries must be 32-byte keys: `bytes(n)` of an integer entry would allocate n bytes
    (2**62: MemoryError; 2**63: OverflowError) and a list of ints would be converted silently."""
    fields = prekey_fields_v1(bob_prekeys)
    fields[5] = [[1, [entry]]]
    with pytest.raises(DecodeError):
        PrekeySecrets.from_bytes(msgpack.packb(fields))


def test_fingerprint_helper_matches_certificate_hash() -> None:
    assert BOB.fingerprint == hashlib.sha256(BOB.cert).digest()


def test_an_init_relayed_as_from_someone_else_is_refused_before_anything_is_consumed(bob_prekeys: Prekeys) -> None:
    bundle = bob_prekeys.fetch()
    initiated = handshake.initiate(
        identity=ALICE.identity, certificate=ALICE.cert, bundle=bundle, root=CA.root,
        revocation=CA.revocation(), now=NOW, expected_name="bob",
    )  # fmt: skip
    before = stored(bob_prekeys.secrets)
    respond = functools.partial(
        handshake.respond, init_of(initiated), identity=BOB.identity, certificate_fingerprint=BOB.fingerprint,
        bundle=bob_prekeys.bundle, prekeys=bob_prekeys.secrets, root=CA.root, revocation=CA.revocation(), now=NOW,
    )  # fmt: skip
    with pytest.raises(NameMismatch):
        respond(expected_name="mallory")
    assert stored(bob_prekeys.secrets) == before
    assert respond(expected_name="alice").peer.name == "alice"


def test_onetime_prekey_ids_stop_below_the_u32_limit() -> None:
    secrets = handshake.PrekeySecrets()
    with pytest.raises(LocalError, match="2\\*\\*32"):
        secrets.add_onetime(0xFFFFFFFF, x25519("limit"))
    secrets.add_onetime(0xFFFFFFFE, x25519("limit"))
    assert handshake.PrekeySecrets.from_bytes(secrets.to_bytes()).next_onetime_id == 0xFFFFFFFF


def test_a_restored_signed_prekey_without_a_replay_cache_still_accepts(bob_prekeys: Prekeys) -> None:
    _fmt, spk, kem, onetime, issued, _schedule = msgpack.unpackb(bob_prekeys.secrets.to_bytes())
    bob_prekeys.secrets = handshake.PrekeySecrets.from_bytes(msgpack.packb([1, spk, kem, onetime, issued, []]))
    _, responded = establish(CA, ALICE, bob_prekeys, with_onetime=False)
    assert responded.first.data == b"hello"


def test_an_init_must_carry_message_0_of_the_first_chain(bob_prekeys: Prekeys) -> None:
    """A relay swaps INIT's message 0 for message 1 of the same chain (it decrypts just as well):
    refused before anything is consumed, and the untouched INIT still opens the session."""
    initiated = initiate(bob_prekeys.fetch())
    init = init_of(initiated)
    later = initiated.session.encrypt(b"second")
    message1 = wire.decode_message(later)
    assert (message1.dh, message1.pn, message1.n) == (init.ephemeral, 0, 1)
    err = refused_by_responder(dataclasses.replace(init, message=later), bob_prekeys, HandshakeError)
    assert "message 0" in str(err)
    # Another chain's message, or a header naming another key, is refused the same way.
    zeroed = wire.encode(dataclasses.replace(message1, n=0, dh=bytes(32)))
    refused_by_responder(dataclasses.replace(init, message=zeroed), bob_prekeys, HandshakeError)
    responded = respond(init, bob_prekeys)
    assert responded.first.data == b"hello"
    assert responded.session.decrypt(later).data == b"second"
