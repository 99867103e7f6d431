"""The asynchronous signed hybrid handshake (PROTOCOL.md §4–5).

The responder publishes a `PrekeyBundle`: a signed X25519 prekey, a signed ML-KEM-768
prekey and, handed out one at a time by the relay, a one-time X25519 prekey with its own
signature. The initiator checks certificate → revocation → bundle signature → one-time
prekey signature → suite, then computes

    DH1 = X25519(ephemeral, signed prekey)
    DH2 = X25519(ephemeral, one-time prekey)          (if the bundle carried one)
    (KEM secret, KEM ciphertext) = ML-KEM-768.Encaps(KEM prekey)   (suite HYBRID)

signs the transcript hash with its identity key, and derives the root key with
HKDF(DH1 || DH2 || KEM secret, salt = transcript hash). The responder verifies the same
chain of checks and the transcript signature *before* deriving anything.

The ephemeral key doubles as the initiator's first ratchet key, so the first DH-ratchet
step reuses DH1 instead of a second exchange.

`Suite.INSECURE_UNSIGNED` skips both signatures and exists only so the mitm-unsigned
scenario can show what they stop; a node accepts it only when explicitly told to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from cryptography import x509

from protocol import certs, wire
from protocol.errors import (
    BadSignature,
    DecodeError,
    HandshakeError,
    ReplayCacheQuota,
    ReplayedInitialMessage,
    SuiteError,
    UnknownPrekey,
)
from protocol.identity import (
    IdentityKey,
    KemKeyPair,
    X25519KeyPair,
    kem_encapsulate,
    verify_signature,
)
from protocol.keyschedule import root_key, transcript_hash
from protocol.labels import LABEL_BUNDLE, LABEL_INIT_SIGNATURE, LABEL_ONETIME
from protocol.messages import VERSION, InitMessage, OneTimePrekey, PrekeyBundle, RatchetMessage, Suite

# The account `respond` consumes from lives in protocol/prekeys.py; it is named here too, as part of
# the handshake's API (callers build one to answer INITs).
from protocol.prekeys import MAX_ONETIME_PREKEYS as MAX_ONETIME_PREKEYS
from protocol.prekeys import MAX_REPLAY_CACHE as MAX_REPLAY_CACHE
from protocol.prekeys import PrekeySecrets as PrekeySecrets
from protocol.ratchet import Ratchet
from protocol.session import Kind, Received, Session

#: Oldest prekey bundle an initiator accepts (seconds): signed prekeys rotate weekly, plus grace.
MAX_BUNDLE_AGE = 30 * 24 * 3600


class RevocationCheck(Protocol):
    """Anything that raises a RevocationError for a serial it cannot vouch for at `now`."""

    def check(self, serial: int, now: datetime) -> None: ...


# --- signed content -------------------------------------------------------------------------------


def _u32(value: int | None) -> bytes:
    return b"\xff" * 5 if value is None else b"\x00" + value.to_bytes(4, "big")


def bundle_signed_bytes(
    certificate_fingerprint: bytes, created: int, spk_id: int, spk: bytes, kem_id: int | None, kem: bytes | None
) -> bytes:
    """What the bundle signature covers: every long-lived public key and its id (PROTOCOL.md §4.1)."""
    return b"".join(
        (
            LABEL_BUNDLE,
            bytes([VERSION]),
            certificate_fingerprint,
            created.to_bytes(8, "big"),
            _u32(spk_id),
            spk,
            _u32(kem_id),
            kem or b"",
        )
    )


def onetime_signed_bytes(certificate_fingerprint: bytes, key_id: int, public: bytes) -> bytes:
    """What a one-time prekey's signature covers."""
    return LABEL_ONETIME + bytes([VERSION]) + certificate_fingerprint + _u32(key_id) + public


def _transcript(
    suite: int,
    initiator_fingerprint: bytes,
    initiator_identity: bytes,
    responder_fingerprint: bytes,
    responder_identity: bytes,
    bundle: PrekeyBundle,
    otpk_id: int | None,
    otpk: bytes | None,
    ephemeral: bytes,
    kem_ciphertext: bytes | None,
    created: int,
) -> bytes:
    """The transcript hash both sides sign and salt with (PROTOCOL.md §5.2)."""
    return transcript_hash(
        bytes([VERSION, suite]),
        initiator_fingerprint,
        responder_fingerprint,
        initiator_identity,
        responder_identity,
        _u32(bundle.spk_id),
        bundle.spk,
        _u32(bundle.kem_id),
        bundle.kem or b"",
        _u32(otpk_id),
        otpk or b"",
        ephemeral,
        kem_ciphertext or b"",
        created.to_bytes(8, "big"),
    )


# --- the responder's published keys ---------------------------------------------------------------


def make_bundle(
    identity: IdentityKey,
    certificate: bytes,
    *,
    created: int,
    spk_id: int,
    spk: X25519KeyPair,
    kem_id: int | None,
    kem: KemKeyPair | None,
) -> PrekeyBundle:
    """Sign a prekey bundle (without a one-time prekey; the relay adds one per fetch)."""
    fp = hashlib.sha256(certificate).digest()
    kem_public = kem.public if kem is not None else None
    signature = identity.sign(bundle_signed_bytes(fp, created, spk_id, spk.public, kem_id, kem_public))
    return PrekeyBundle(certificate, created, spk_id, spk.public, kem_id, kem_public, signature)


def make_onetime(identity: IdentityKey, certificate: bytes, key_id: int, key: X25519KeyPair) -> OneTimePrekey:
    """Sign a one-time prekey for upload."""
    fp = hashlib.sha256(certificate).digest()
    return OneTimePrekey(key_id, key.public, identity.sign(onetime_signed_bytes(fp, key_id, key.public)))


# --- initiator ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Initiated:
    """What `initiate` returns: the new session and the encoded INIT frame to send."""

    session: Session
    frame: bytes
    peer: certs.VerifiedCertificate


def verify_bundle(
    bundle: PrekeyBundle,
    *,
    root: x509.Certificate,
    revocation: RevocationCheck,
    now: datetime,
    expected_name: str,
    suite: Suite = Suite.HYBRID,
) -> certs.VerifiedCertificate:
    """The initiator's checks, in order: certificate, revocation, bundle and one-time signatures, suite."""
    peer = certs.verify(bundle.certificate, root, now, expected_name=expected_name)
    revocation.check(peer.serial, now)
    if suite is not Suite.INSECURE_UNSIGNED:
        signed = bundle_signed_bytes(
            peer.fingerprint, bundle.created, bundle.spk_id, bundle.spk, bundle.kem_id, bundle.kem
        )
        verify_signature(peer.public_key, bundle.signature, signed)
        onetime = bundle.onetime
        if onetime is not None:
            verify_signature(
                peer.public_key,
                onetime.signature,
                onetime_signed_bytes(peer.fingerprint, onetime.key_id, onetime.public),
            )
    created = bundle.created
    if not now.timestamp() - MAX_BUNDLE_AGE <= created <= now.timestamp() + certs.CLOCK_SKEW.total_seconds():
        # A relay replaying an old bundle would steer us to a prekey its owner may have destroyed.
        raise HandshakeError(f"bundle created at {created} is older than {MAX_BUNDLE_AGE} s or in the future")
    if (bundle.kem is None) != (bundle.kem_id is None):
        raise HandshakeError("bundle has a KEM id without a KEM key, or the reverse")
    if suite is Suite.HYBRID and bundle.kem is None:
        raise SuiteError("the bundle offers no ML-KEM prekey and the hybrid suite is required")
    if suite is not Suite.HYBRID and bundle.kem is not None:
        raise SuiteError(f"refusing suite {suite.name}: the bundle offers ML-KEM")
    if (bundle.otpk is None) != (bundle.otpk_id is None) or (bundle.otpk is None) != (bundle.otpk_signature is None):
        raise HandshakeError("partial one-time prekey in bundle")
    return peer


def initiate(
    *,
    identity: IdentityKey,
    certificate: bytes,
    bundle: PrekeyBundle,
    root: x509.Certificate,
    revocation: RevocationCheck,
    now: datetime,
    expected_name: str,
    first_message: bytes = b"",
    first_kind: Kind = Kind.DATA,
    suite: Suite = Suite.HYBRID,
    keygen: Callable[[], X25519KeyPair] = X25519KeyPair.generate,
    kem_encaps: Callable[[bytes], tuple[bytes, bytes]] = kem_encapsulate,
) -> Initiated:
    """Start a session with the owner of `bundle`; `first_message` travels inside the INIT frame
    (a HEARTBEAT instead for a handshake the node starts by itself, PROTOCOL.md §8).

    The INIT carries `now` in milliseconds, signed in the transcript: its freshness (§8).

    `keygen` and `kem_encaps` are the randomness seams for known-answer tests.
    """
    peer = verify_bundle(bundle, root=root, revocation=revocation, now=now, expected_name=expected_name, suite=suite)
    created = millis(now)
    own_fp = hashlib.sha256(certificate).digest()
    eph = keygen()
    dh1 = eph.exchange(bundle.spk)
    secrets = dh1
    if bundle.otpk is not None:
        secrets += eph.exchange(bundle.otpk)
    kem_ct = None
    if suite is Suite.HYBRID:
        assert bundle.kem is not None  # verify_bundle guarantees it
        kem_secret, kem_ct = kem_encaps(bundle.kem)
        secrets += kem_secret
    th = _transcript(
        suite,
        own_fp,
        identity.public_bytes,
        peer.fingerprint,
        peer.public_key.public_bytes_raw(),
        bundle,
        bundle.otpk_id,
        bundle.otpk,
        eph.public,
        kem_ct,
        created,
    )
    signature = None if suite is Suite.INSECURE_UNSIGNED else identity.sign(LABEL_INIT_SIGNATURE + th)
    rk = root_key(secrets, th, insecure=suite is Suite.INSECURE_UNSIGNED)
    ratchet = Ratchet.initiator(rk, ours=eph, theirs=bundle.spk, dh_output=dh1, keygen=keygen)
    session = Session(
        ratchet,
        transcript=th,
        peer=peer.name,
        peer_fingerprint=peer.fingerprint,
        suite=suite,
        created=created,
        initiator=own_fp,
    )
    message = wire.encode(session.encrypt_message(first_message, kind=first_kind))
    init = InitMessage(
        suite,
        certificate,
        peer.fingerprint,
        bundle.spk_id,
        bundle.kem_id,
        bundle.otpk_id,
        eph.public,
        kem_ct,
        signature,
        message,
        created,
    )
    return Initiated(session, wire.encode(init), peer)


# --- responder ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Responded:
    """What `respond` returns: the session, the first message, and the initiator's verified certificate."""

    session: Session
    first: Received
    peer: certs.VerifiedCertificate


def respond(
    init: InitMessage,
    *,
    identity: IdentityKey,
    certificate_fingerprint: bytes,
    bundle: PrekeyBundle,
    prekeys: PrekeySecrets,
    root: x509.Certificate,
    revocation: RevocationCheck,
    now: datetime,
    allowed_suites: Collection[Suite] = (Suite.HYBRID,),
    expected_name: str | None = None,
    keygen: Callable[[], X25519KeyPair] = X25519KeyPair.generate,
) -> Responded:
    """Accept an initial message. Everything is verified before any key is derived, and the
    one-time prekey is consumed (and the replay cache updated) only once message 0 decrypts.

    `bundle` is our own published bundle for `init.spk_id` (the transcript covers its keys);
    `expected_name`, if given, is who the relay says sent it: a certificate naming anyone else is
    refused before anything is consumed.
    """
    try:
        suite = Suite(init.suite)
    except ValueError as exc:
        raise SuiteError(f"unknown suite {init.suite}") from exc
    if suite not in allowed_suites:
        raise SuiteError(f"suite {suite.name} is not accepted here")
    if init.responder_fingerprint != certificate_fingerprint:
        raise HandshakeError("initial message addressed to another certificate")
    peer = certs.verify(init.certificate, root, now, expected_name=expected_name)
    revocation.check(peer.serial, now)
    if init.created > millis(now + certs.CLOCK_SKEW):
        # A future-dated INIT would outrank every session the initiator makes before that date (§8).
        raise HandshakeError("initial message dated in the future")
    spk = prekeys._spk.get(init.spk_id)
    if spk is None or bundle.spk_id != init.spk_id or bundle.spk != spk.public:
        raise UnknownPrekey(f"signed prekey {init.spk_id} is not ours (rotated out?)")
    if bundle.kem is not None and suite is not Suite.HYBRID:
        raise SuiteError(f"downgrade refused: suite {suite.name} but our bundle offers ML-KEM")
    kem = None
    if suite is Suite.HYBRID:
        kem = prekeys._kem.get(init.kem_id) if init.kem_id is not None else None
        if kem is None or init.kem_ciphertext is None or bundle.kem_id != init.kem_id or bundle.kem != kem.public:
            raise UnknownPrekey(f"ML-KEM prekey {init.kem_id} is not ours")
    elif init.kem_ciphertext is not None or init.kem_id is not None:
        raise HandshakeError("KEM fields in a suite without ML-KEM")
    onetime = None
    if init.otpk_id is not None:
        onetime = prekeys._onetime.get(init.otpk_id)
        if onetime is None:
            if init.otpk_id < prekeys._issued:
                raise ReplayedInitialMessage(f"one-time prekey {init.otpk_id} already consumed (or expired)")
            raise UnknownPrekey(f"one-time prekey {init.otpk_id} is not ours")
    elif init.ephemeral in prekeys._seen.get(init.spk_id, ()):
        raise ReplayedInitialMessage("initial message replayed (ephemeral key seen before)")
    elif len(prekeys._seen.get(init.spk_id, ())) >= MAX_REPLAY_CACHE:
        raise ReplayedInitialMessage("replay cache full for this signed prekey: refusing until it rotates")
    elif not prekeys.quota_left(init.spk_id, peer.public_key.public_bytes_raw()):
        raise ReplayCacheQuota(
            "this initiator's share of the replay cache is used up: refusing until the prekey rotates"
        )
    th = _transcript(
        suite,
        peer.fingerprint,
        peer.public_key.public_bytes_raw(),
        certificate_fingerprint,
        identity.public_bytes,
        bundle,
        init.otpk_id,
        onetime.public if onetime is not None else None,
        init.ephemeral,
        init.kem_ciphertext,
        init.created,
    )
    if suite is not Suite.INSECURE_UNSIGNED:
        if init.signature is None:
            raise BadSignature("initial message is not signed")
        verify_signature(peer.public_key, init.signature, LABEL_INIT_SIGNATURE + th)
    message0 = wire.decode_message(init.message)
    require_message_0(message0, init.ephemeral)
    # Verified: derive.
    dh1 = spk.exchange(init.ephemeral)
    secrets = dh1
    if onetime is not None:
        secrets += onetime.exchange(init.ephemeral)
    if kem is not None:
        assert init.kem_ciphertext is not None
        secrets += kem.decapsulate(init.kem_ciphertext)
    rk = root_key(secrets, th, insecure=suite is Suite.INSECURE_UNSIGNED)
    ratchet = Ratchet.responder(rk, theirs=init.ephemeral, dh_output=dh1, keygen=keygen)
    session = Session(
        ratchet,
        transcript=th,
        peer=peer.name,
        peer_fingerprint=peer.fingerprint,
        suite=suite,
        created=init.created,
        initiator=peer.fingerprint,
    )
    first = session.decrypt_message(message0)
    # Message 0 authenticated: commit the consumption.
    if init.otpk_id is not None:
        prekeys.take_onetime(init.otpk_id)
    else:
        prekeys.remember(init.spk_id, init.ephemeral, peer.public_key.public_bytes_raw())
    return Responded(session, first, peer)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def require_message_0(message: RatchetMessage, ephemeral: bytes) -> None:
    """An INIT carries message 0 of the initiator's first chain: header (EK, 0, 0) (PROTOCOL.md §5.5).

    A later message of the same chain also decrypts, and would leave the real message 0 to be
    refused as a replay: a relay could swap them and nobody would be told.
    """
    if (message.dh, message.pn, message.n) != (ephemeral, 0, 0):
        raise HandshakeError("the initial message must carry message 0 of the initiator's first chain")


def millis(now: datetime) -> int:
    """`now` as whole milliseconds since the epoch (an INIT's `created`), in exact integer arithmetic."""
    return (now - _EPOCH) // timedelta(milliseconds=1)


def from_millis(created: int) -> datetime:
    """The instant an INIT's `created` names (the inverse of `millis`)."""
    return _EPOCH + timedelta(milliseconds=created)


def decode_init(data: bytes) -> InitMessage:
    """Decode a frame that must be an INIT."""
    frame = wire.decode(data)
    if not isinstance(frame, InitMessage):
        raise DecodeError("expected an initial message")
    return frame
