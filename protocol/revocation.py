"""Revocation for kmsnet: CRLs (RFC 5280) and OCSP (RFC 6960), both signed by the CA root itself.

The CA side builds CRLs and answers OCSP requests (`issue_crl`, `build_ocsp_response`); a node
verifies them (`verify_crl`, `verify_ocsp_response`) and keeps a `RevocationState`: the newest CRL
it accepted, which refuses rollbacks and fails closed once that CRL is past its nextUpdate.

Nothing here reads the clock; `now` is always a parameter. (cryptography's OCSP builder stamps
producedAt from the system clock by itself; nothing here reads that field back.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import InitVar, dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal, get_args

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509 import ocsp

from protocol.certs import (
    _MALFORMED,
    CLOCK_SKEW,
    CaKey,
    _authority_key_identifier,
    _require_aware,
    _require_issuer_key,
    _require_serial,
    _require_window,
    check_root,
)
from protocol.errors import (
    CertificateRevoked,
    CrlInvalid,
    CrlRollback,
    DecodeError,
    LocalError,
    NoRevocationData,
    OcspError,
    StaleFeed,
    UntrustedIssuer,
    library_detail,
)

__all__ = [
    "REASONS",
    "Freshness",
    "OcspAnswer",
    "OcspStatus",
    "RevocationState",
    "RevokedEntry",
    "VerifiedCrl",
    "build_ocsp_request",
    "build_ocsp_response",
    "issue_crl",
    "verify_crl",
    "verify_ocsp_response",
]

REASONS: Mapping[str, x509.ReasonFlags] = MappingProxyType(
    {
        "unspecified": x509.ReasonFlags.unspecified,
        "key-compromise": x509.ReasonFlags.key_compromise,
        "ca-compromise": x509.ReasonFlags.ca_compromise,
        "affiliation-changed": x509.ReasonFlags.affiliation_changed,
        "superseded": x509.ReasonFlags.superseded,
        "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
        "certificate-hold": x509.ReasonFlags.certificate_hold,
        "privilege-withdrawn": x509.ReasonFlags.privilege_withdrawn,
        "aa-compromise": x509.ReasonFlags.aa_compromise,
    }
)
"""RFC 5280 CRL reason codes by their lowercase-hyphenated names. removeFromCRL is left out: it
only has a meaning in delta CRLs, which kmsnet neither issues nor accepts."""

_REASON_NAMES: Mapping[x509.ReasonFlags, str] = MappingProxyType({flag: name for name, flag in REASONS.items()})

# CRL numbers are at most 20 octets (RFC 5280 5.2.3); persisted as exactly that many big-endian bytes
# because msgpack integers stop at 64 bits.
_NUMBER_OCTETS = 20
_MAX_NUMBER = 2 ** (8 * _NUMBER_OCTETS - 1)
_MAX_SERIAL = 2**159

# Hashes cryptography can put in a CertID. `openssl ocsp` sends SHA-1 by default, so the responder
# must answer SHA-1 CertIDs; it is only an identifier here, the response itself is Ed25519-signed.
_CERT_ID_HASHES = (hashes.SHA1, hashes.SHA224, hashes.SHA256, hashes.SHA384, hashes.SHA512)

# RFC 8954 2.1: a nonce is 1..32 octets; we send at least 16 so that it is unpredictable.
_MAX_NONCE = 32
_MIN_OUR_NONCE = 16

_MALFORMED_OR_UNSUPPORTED: tuple[type[Exception], ...] = (*_MALFORMED, UnsupportedAlgorithm)

_STATE_VERSION = 1
_MINT = object()


def _sha256(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def _require_number(number: int, what: str, limit: int) -> None:
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < limit:
        raise LocalError(f"{what} must be an int in 0..{limit - 1}, got {number!r}")


# --- values ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RevokedEntry:
    """One revoked serial: when, and why (a key of `REASONS`)."""

    serial: int
    revoked_at: datetime
    reason: str = "unspecified"

    def __post_init__(self) -> None:
        _require_serial(self.serial)
        _require_aware(self.revoked_at, "revoked_at")
        if self.reason not in REASONS:
            raise LocalError(f"unknown revocation reason {self.reason!r}; expected one of {sorted(REASONS)}")


OcspStatus = Literal["good", "revoked", "unknown"]


@dataclass(frozen=True)
class OcspAnswer:
    """A certificate's status as OCSP states it: `good`, `revoked` (with time and reason), or
    `unknown` (the responder does not know the serial). Also what the CA's `lookup` returns."""

    status: OcspStatus
    revoked_at: datetime | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.status not in get_args(OcspStatus):
            raise LocalError(f"unknown OCSP status {self.status!r}")
        if self.status == "revoked":
            if self.revoked_at is None or self.reason not in REASONS:
                raise LocalError("a revoked answer needs revoked_at and a reason from REASONS")
            _require_aware(self.revoked_at, "revoked_at")
        elif self.revoked_at is not None or self.reason is not None:
            raise LocalError(f"a {self.status} answer carries no revocation time or reason")

    def require_good(self, serial: int) -> None:
        """Fail closed unless good: `CertificateRevoked` if revoked, `OcspError` if unknown."""
        if self.status == "revoked":
            raise CertificateRevoked(serial, self.reason)
        if self.status == "unknown":
            raise OcspError(f"the responder does not know serial {serial:x}")


@dataclass(frozen=True, repr=False)
class VerifiedCrl:
    """A CRL that `verify_crl` accepted: signed by the pinned root, numbered, well-dated.

    `revoked` is the set of revoked serials for O(1) lookups; `entries` maps each of them to its
    `RevokedEntry`. Only `verify_crl` constructs one. Two are equal when their bytes are.
    """

    number: int
    this_update: datetime
    next_update: datetime
    revoked: frozenset[int] = field(compare=False)
    entries: Mapping[int, RevokedEntry] = field(compare=False)
    der: bytes = field(compare=False)
    digest: bytes
    _mint: InitVar[object] = None

    def __post_init__(self, _mint: object) -> None:
        if _mint is not _MINT:
            raise LocalError("VerifiedCrl is only produced by protocol.revocation.verify_crl")

    def __repr__(self) -> str:
        return (
            f"VerifiedCrl(number={self.number}, revoked={len(self.revoked)}, "
            f"next_update={self.next_update.isoformat()}, digest={self.digest[:8].hex()})"
        )

    def answer(self, serial: int) -> OcspAnswer:
        """What this CRL says about `serial`, as an OCSP answer (`good` or `revoked`; a CRL cannot
        say `unknown`, that needs the CA's list of issued serials)."""
        entry = self.entries.get(serial)
        if entry is None:
            return OcspAnswer("good")
        return OcspAnswer("revoked", entry.revoked_at, entry.reason)


@dataclass(frozen=True)
class Freshness:
    """How fresh the held CRL is at some `now`, for status displays.

    `seconds_left` counts whole seconds until `RevocationState.check` starts failing
    (nextUpdate + CLOCK_SKEW); it is negative once `stale`.
    """

    number: int
    this_update: datetime
    next_update: datetime
    stale: bool
    seconds_left: int


# --- CRL: CA side ---------------------------------------------------------------------------------


def issue_crl(
    *,
    ca_key: CaKey,
    ca_cert: x509.Certificate,
    number: int,
    this_update: datetime,
    next_update: datetime,
    revoked: Iterable[RevokedEntry],
) -> bytes:
    """Build and sign a CRL (DER) listing `revoked`, with CRLNumber `number`.

    Each entry carries a CRLReason extension, except "unspecified", for which RFC 5280 5.3.1 says the
    extension should be absent (`verify_crl` reads absence back as "unspecified"). Raises
    `LocalError` on a duplicated serial, a bad number or window, or a key that is not `ca_cert`'s.
    """
    _require_issuer_key(ca_key, ca_cert)
    _require_number(number, "CRL number", _MAX_NUMBER)
    _require_window(this_update, next_update)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_authority_key_identifier(ca_key, ca_cert), critical=False)
    )
    seen: set[int] = set()
    for entry in revoked:
        if not isinstance(entry, RevokedEntry):
            raise LocalError(f"revoked entries must be RevokedEntry, got {type(entry).__name__}")
        if entry.serial in seen:
            raise LocalError(f"serial {entry.serial:x} listed twice")
        seen.add(entry.serial)
        revoked_builder = x509.RevokedCertificateBuilder().serial_number(entry.serial).revocation_date(entry.revoked_at)
        if entry.reason != "unspecified":
            revoked_builder = revoked_builder.add_extension(x509.CRLReason(REASONS[entry.reason]), critical=False)
        builder = builder.add_revoked_certificate(revoked_builder.build())
    crl = builder.sign(ca_key, None) if isinstance(ca_key, Ed25519PrivateKey) else ca_key.sign_crl(builder)
    return crl.public_bytes(serialization.Encoding.DER)


# --- CRL: node side -------------------------------------------------------------------------------


def verify_crl(der: bytes, root: x509.Certificate, now: datetime) -> VerifiedCrl:
    """Verify a DER CRL against the pinned CA `root`; raise `CrlInvalid` on any failure.

    Checks: it parses; its issuer is `root`'s subject; `root`'s key signed it, in canonical DER (so
    that one CRL has one byte form); it has a CRLNumber and no critical extension we do not
    understand (delta CRLs, partitioned CRLs); thisUpdate is not later than `now` + CLOCK_SKEW;
    nextUpdate is present and after thisUpdate; entries are unique, with known reasons.

    A CRL past its nextUpdate is *not* refused here: staleness depends on when it is consulted,
    which is `RevocationState.check`'s job.
    """
    _require_aware(now, "now")
    try:
        check_root(root)
    except UntrustedIssuer as exc:
        raise CrlInvalid(str(exc)) from exc
    if now > root.not_valid_after_utc + CLOCK_SKEW:
        raise CrlInvalid(f"the pinned root expired at {root.not_valid_after_utc.isoformat()}")
    try:
        crl = x509.load_der_x509_crl(der)
        # cryptography parses names lazily: garbage in the issuer only surfaces here.
        issuer = crl.issuer
    except _MALFORMED as exc:
        raise CrlInvalid(f"CRL does not parse as DER{library_detail(exc)}") from exc
    if issuer != root.subject:
        raise CrlInvalid(f"CRL issued by {issuer.rfc4514_string()!r}, not the pinned root")
    try:
        # The ignore: root.public_key() may be a key type that cannot sign (X25519); that TypeError is caught.
        signed = crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm) as exc:
        raise CrlInvalid(f"CRL signature cannot be checked with the pinned root's key{library_detail(exc)}") from exc
    if not signed:
        raise CrlInvalid("CRL signature does not verify under the pinned root")
    if not der.endswith(_signature_bit_string(crl.signature)):
        # cryptography's CRL parser accepts a signature BIT STRING claiming unused bits, and ignores
        # them; the same CRL would then have several byte forms, defeating the equivocation check.
        raise CrlInvalid("CRL signature is not canonically encoded")

    number: int | None = None
    try:
        for ext in crl.extensions:
            if isinstance(ext.value, x509.CRLNumber):
                number = ext.value.crl_number
            elif ext.critical and not isinstance(ext.value, x509.AuthorityKeyIdentifier):
                raise CrlInvalid(f"CRL has an unsupported critical extension {ext.oid.dotted_string}")
    except _MALFORMED as exc:
        raise CrlInvalid(f"CRL extensions do not parse{library_detail(exc)}") from exc
    if number is None:
        raise CrlInvalid("CRL has no CRLNumber, so rollbacks could not be detected")
    if number >= _MAX_NUMBER:  # pragma: no cover - issue_crl cannot make one; a hand-made CRL could
        raise CrlInvalid(f"CRL number longer than {_NUMBER_OCTETS} octets (RFC 5280 §5.2.3)")

    this_update = crl.last_update_utc
    next_update = crl.next_update_utc
    if this_update > now + CLOCK_SKEW:
        raise CrlInvalid(f"CRL thisUpdate {this_update.isoformat()} is in the future (now {now.isoformat()})")
    if next_update is None or next_update <= this_update:
        raise CrlInvalid("CRL nextUpdate is missing or not after thisUpdate")

    entries = _read_entries(crl)
    return VerifiedCrl(
        number=number,
        this_update=this_update,
        next_update=next_update,
        revoked=frozenset(entries),
        entries=MappingProxyType(entries),
        der=bytes(der),
        digest=_sha256(der),
        _mint=_MINT,
    )


def _signature_bit_string(signature: bytes) -> bytes:
    # The DER BIT STRING with zero unused bits that must end a CRL carrying this signature.
    size = len(signature) + 1
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    if size >= 0x80:
        length = bytes([0x80 | len(length)]) + length
    return b"\x03" + length + b"\x00" + signature


def _read_entries(crl: x509.CertificateRevocationList) -> dict[int, RevokedEntry]:
    entries: dict[int, RevokedEntry] = {}
    try:
        for revoked in crl:
            serial = revoked.serial_number
            if not 0 < serial < _MAX_SERIAL or serial in entries:
                raise CrlInvalid(f"CRL entry serial {serial} is out of range or listed twice")
            reason = "unspecified"
            for ext in revoked.extensions:
                if isinstance(ext.value, x509.CRLReason):
                    name = _REASON_NAMES.get(ext.value.reason)
                    if name is None:
                        raise CrlInvalid(f"CRL entry {serial:x} has reason {ext.value.reason.value}")
                    reason = name
                elif ext.critical:
                    raise CrlInvalid(f"CRL entry {serial:x} has a critical extension {ext.oid.dotted_string}")
            entries[serial] = RevokedEntry(serial, revoked.revocation_date_utc, reason)
    except _MALFORMED as exc:
        raise CrlInvalid(f"CRL entries do not parse{library_detail(exc)}") from exc
    return entries


class RevocationState:
    """The revocation knowledge a node keeps: the newest CRL it accepted.

    Fails closed: `check` refuses when no CRL is held or the one held is stale. `accept` is
    all-or-nothing: a refused CRL leaves the state as it was. Persist with `to_bytes` and restore with
    `from_bytes`, so that a restart does not reopen the door to an older CRL.
    """

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: VerifiedCrl | None = None

    def __repr__(self) -> str:
        return f"RevocationState(current={self._current!r})"

    @property
    def current(self) -> VerifiedCrl | None:
        """The CRL in force, or None before the first `accept`."""
        return self._current

    @property
    def highest_number(self) -> int | None:
        """The highest CRL number ever accepted (always `current`'s number), or None."""
        return None if self._current is None else self._current.number

    def accept(self, der: bytes, root: x509.Certificate, now: datetime) -> VerifiedCrl:
        """Verify `der` (see `verify_crl`) and make it the CRL in force; return the CRL in force.

        - a lower number than the highest accepted -> `CrlRollback`. This check is ours alone:
          `openssl verify -crl_check` and Python's `ssl` happily use a rolled-back CRL, which would let
          whoever replays an old CRL un-revoke a certificate;
        - the same number and the same bytes -> no-op (a re-delivery);
        - the same number with other bytes -> `CrlInvalid`: the CA signed two different CRLs under
          one number (equivocation). Ed25519 signatures are deterministic, so an honest re-issue of
          the same content is byte-identical;
        - a higher number -> replaces the current CRL.
        """
        crl = verify_crl(der, root, now)
        current = self._current
        if current is not None:
            if crl.number < current.number:
                raise CrlRollback(f"CRL number {crl.number} is lower than the accepted {current.number}")
            if crl.number == current.number:
                if crl.digest == current.digest:
                    return current
                raise CrlInvalid(f"two different CRLs carry number {crl.number}: the CA equivocates")
        self._current = crl
        return crl

    def check(self, serial: int, now: datetime) -> None:
        """Return if `serial` is not revoked by a CRL fresh at `now`; otherwise raise
        `NoRevocationData` (none held), `StaleFeed` (now > nextUpdate + CLOCK_SKEW) or
        `CertificateRevoked(serial, reason)`."""
        _require_aware(now, "now")
        crl = self._current
        if crl is None:
            raise NoRevocationData("no CRL accepted yet")
        if now > crl.next_update + CLOCK_SKEW:
            raise StaleFeed(
                f"CRL {crl.number} stale since its nextUpdate {crl.next_update.isoformat()} (now {now.isoformat()})"
            )
        if serial in crl.revoked:
            raise CertificateRevoked(serial, crl.entries[serial].reason)

    def freshness(self, now: datetime) -> Freshness:
        """How fresh the held CRL is at `now`; `NoRevocationData` if none is held."""
        _require_aware(now, "now")
        crl = self._current
        if crl is None:
            raise NoRevocationData("no CRL accepted yet")
        left = (crl.next_update + CLOCK_SKEW - now).total_seconds()
        return Freshness(
            number=crl.number,
            this_update=crl.this_update,
            next_update=crl.next_update,
            stale=left < 0,
            seconds_left=math.floor(left),
        )

    def to_bytes(self) -> bytes:
        """Serialize for persistence: msgpack map {"v": 1, "highest": 20-byte number | nil,
        "crl": DER | nil}."""
        crl = self._current
        state: dict[str, Any] = {
            "v": _STATE_VERSION,
            "highest": None if crl is None else crl.number.to_bytes(_NUMBER_OCTETS, "big"),
            "crl": None if crl is None else crl.der,
        }
        return msgpack.packb(state, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes, root: x509.Certificate, now: datetime) -> RevocationState:
        """Restore a state written by `to_bytes`, re-verifying the stored CRL against `root` at `now`.

        Raises `DecodeError` on anything malformed, on a stored CRL that no longer verifies (for
        example if the clock went back before its thisUpdate) or whose number disagrees with the stored
        highest number: better to start from an error than from an empty state that would accept a
        rolled-back CRL.
        """
        _require_aware(now, "now")
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise DecodeError(f"revocation state is not msgpack{library_detail(exc)}") from exc
        if not isinstance(obj, dict) or set(obj) != {"v", "highest", "crl"}:
            raise DecodeError("revocation state must be a map with exactly v, highest, crl")
        version, highest, der = obj["v"], obj["highest"], obj["crl"]
        if type(version) is not int or version != _STATE_VERSION:
            raise DecodeError(f"unsupported revocation state version {version!r}")
        state = cls()
        if highest is None and der is None:
            return state
        if not isinstance(highest, bytes) or len(highest) != _NUMBER_OCTETS or not isinstance(der, bytes):
            raise DecodeError("revocation state needs both a 20-byte highest number and a CRL, or neither")
        try:
            crl = verify_crl(der, root, now)
        except CrlInvalid as exc:
            raise DecodeError(f"stored CRL no longer verifies: {exc}") from exc
        if crl.number != int.from_bytes(highest, "big"):
            raise DecodeError("stored CRL number disagrees with the stored highest number")
        state._current = crl
        return state


# --- OCSP -----------------------------------------------------------------------------------------


def _issuer_hashes(subject: x509.Name, key: Ed25519PublicKey, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
    # RFC 6960 4.1.1 CertID: hash of the issuer's DER subject name, and of the issuer's public key
    # BIT STRING contents, which for Ed25519 are the 32 raw key bytes.
    name_hash = hashes.Hash(algorithm)
    name_hash.update(subject.public_bytes())
    key_hash = hashes.Hash(algorithm)
    key_hash.update(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    return name_hash.finalize(), key_hash.finalize()


def build_ocsp_request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes) -> bytes:
    """An OCSP request (DER) for `cert`, with a SHA-256 CertID and the nonce extension.

    `nonce` must be 16..32 random bytes: it is what ties the response to this request, so that an
    old response cannot be replayed. Raises `LocalError` otherwise, or if `issuer` did not issue `cert`.
    """
    if not isinstance(nonce, bytes) or not _MIN_OUR_NONCE <= len(nonce) <= _MAX_NONCE:
        raise LocalError(f"nonce must be {_MIN_OUR_NONCE}..{_MAX_NONCE} bytes")
    if cert.issuer != issuer.subject:
        raise LocalError("issuer is not the certificate's issuer")
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, issuer, hashes.SHA256())
        .add_extension(x509.OCSPNonce(nonce), critical=False)
        .build()
    )
    return request.public_bytes(serialization.Encoding.DER)


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)


_CERT_STATUS = {
    "good": ocsp.OCSPCertStatus.GOOD,
    "revoked": ocsp.OCSPCertStatus.REVOKED,
    "unknown": ocsp.OCSPCertStatus.UNKNOWN,
}


def build_ocsp_response(
    request_der: bytes,
    *,
    ca_key: CaKey,
    ca_cert: x509.Certificate,
    lookup: Callable[[int], OcspAnswer],
    now: datetime,
    validity: timedelta,
) -> bytes:
    """The CA's OCSP responder: answer one DER request with a DER response signed by the CA key.

    - a request that does not parse, uses an unsupported CertID hash, carries an unknown critical
      extension or a nonce outside 1..32 bytes -> an unsigned `malformedRequest` response;
    - a CertID naming another issuer -> an unsigned `unauthorized` response (RFC 5019 2.2.3);
    - otherwise `lookup(serial)` decides good / revoked / unknown, the response is valid from `now`
      for `validity`, echoes the request's nonce, and is signed by the CA (Ed25519, the responder ID
      being the CA key hash). The CertID is answered with the hash algorithm the request used.

    Exceptions from `lookup` propagate. Raises `LocalError` on bad arguments.
    """
    _require_aware(now, "now")
    _require_issuer_key(ca_key, ca_cert)
    if not isinstance(validity, timedelta) or validity <= timedelta(0):
        raise LocalError(f"validity must be a positive timedelta, got {validity!r}")
    try:
        request = ocsp.load_der_ocsp_request(request_der)
        algorithm = request.hash_algorithm
        extensions = request.extensions
    except _MALFORMED_OR_UNSUPPORTED:
        return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    nonce: bytes | None = None
    for ext in extensions:
        if isinstance(ext.value, x509.OCSPNonce):
            nonce = ext.value.nonce
        elif ext.critical:
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    # cryptography only parses the _CERT_ID_HASHES today; the isinstance keeps add_response_by_hash
    # from raising should it ever learn another.
    if not isinstance(algorithm, _CERT_ID_HASHES) or (nonce is not None and not 1 <= len(nonce) <= _MAX_NONCE):
        return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    ca_hashes = _issuer_hashes(ca_cert.subject, ca_key.public_key(), algorithm)
    if (request.issuer_name_hash, request.issuer_key_hash) != ca_hashes:
        return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)

    answer = lookup(request.serial_number)
    if not isinstance(answer, OcspAnswer):
        raise LocalError(f"lookup must return an OcspAnswer, got {type(answer).__name__}")
    reason = None if answer.reason in (None, "unspecified") else REASONS[answer.reason]
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            issuer_name_hash=request.issuer_name_hash,
            issuer_key_hash=request.issuer_key_hash,
            serial_number=request.serial_number,
            algorithm=algorithm,
            cert_status=_CERT_STATUS[answer.status],
            this_update=now,
            next_update=now + validity,
            revocation_time=answer.revoked_at,
            revocation_reason=reason,
        )
    )
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    if isinstance(ca_key, Ed25519PrivateKey):
        response = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, ca_cert).sign(ca_key, None)
    else:
        response = ca_key.sign_ocsp_response(builder, ca_cert)
    return response.public_bytes(serialization.Encoding.DER)


def verify_ocsp_response(
    der: bytes, *, cert: x509.Certificate, root: x509.Certificate, nonce: bytes, now: datetime
) -> OcspAnswer:
    """Verify an OCSP response to our request about `cert` and return what it says.

    Raises `OcspError` unless: it parses and its status is successful; `root`'s key signed it with
    Ed25519 (the CA is its own responder; delegated responders are not accepted); it holds exactly one answer, about
    `cert` (serial and issuer hashes), and `cert` was issued by `root`; it echoes `nonce` (a missing
    or different nonce could be a replayed response); no unknown critical extension; thisUpdate is
    not later than `now` + CLOCK_SKEW; nextUpdate is present and `now` is not past it + CLOCK_SKEW.

    A `revoked` or `unknown` answer is returned, not raised: see `OcspAnswer.require_good`.
    """
    _require_aware(now, "now")
    root_key = root.public_key()
    if not isinstance(root_key, Ed25519PublicKey):
        raise LocalError(f"the pinned root key must be Ed25519, got {type(root_key).__name__}")
    try:
        response = ocsp.load_der_ocsp_response(der)
    except _MALFORMED as exc:
        raise OcspError(f"OCSP response does not parse{library_detail(exc)}") from exc
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OcspError(f"OCSP responder said {response.response_status.name}")
    # The algorithm identifier sits outside the signed bytes: without this check it could be anything.
    if response.signature_algorithm_oid != x509.SignatureAlgorithmOID.ED25519:
        raise OcspError(f"OCSP response signed with {response.signature_algorithm_oid.dotted_string}, not Ed25519")
    try:
        root_key.verify(response.signature, response.tbs_response_bytes)
    except InvalidSignature as exc:
        raise OcspError("OCSP response is not signed by the pinned root") from exc

    try:
        singles = list(response.responses)
        if len(singles) != 1:
            raise OcspError(f"OCSP response holds {len(singles)} answers, expected 1")
        single = singles[0]
        algorithm = single.hash_algorithm
        got_nonce = _response_nonce(response.extensions)
        _refuse_critical(response.single_extensions)
    except _MALFORMED_OR_UNSUPPORTED as exc:
        raise OcspError(f"OCSP response content does not parse{library_detail(exc)}") from exc

    if cert.issuer != root.subject or single.serial_number != cert.serial_number:
        raise OcspError("OCSP response is about another certificate")
    expected = _issuer_hashes(root.subject, root_key, algorithm) if isinstance(algorithm, _CERT_ID_HASHES) else None
    if (single.issuer_name_hash, single.issuer_key_hash) != expected:
        raise OcspError("OCSP response names another issuer")
    if got_nonce is None:
        raise OcspError("OCSP response carries no nonce: it may be a replay")
    if got_nonce != nonce:
        raise OcspError("OCSP response nonce differs from ours: it answers another request")

    this_update = single.this_update_utc
    next_update = single.next_update_utc
    if this_update > now + CLOCK_SKEW:
        raise OcspError(f"OCSP thisUpdate {this_update.isoformat()} is in the future (now {now.isoformat()})")
    if next_update is None:
        raise OcspError("OCSP response has no nextUpdate")
    if now > next_update + CLOCK_SKEW:
        raise OcspError(f"OCSP response stale since {next_update.isoformat()} (now {now.isoformat()})")

    status = single.certificate_status
    if status == ocsp.OCSPCertStatus.GOOD:
        return OcspAnswer("good")
    if status == ocsp.OCSPCertStatus.UNKNOWN:
        return OcspAnswer("unknown")
    flag = single.revocation_reason
    reason = "unspecified" if flag is None else _REASON_NAMES.get(flag)
    revoked_at = single.revocation_time_utc
    if reason is None or revoked_at is None:
        raise OcspError(f"OCSP revocation carries an unusable reason {flag!r} or no time")
    return OcspAnswer("revoked", revoked_at, reason)


def _response_nonce(extensions: x509.Extensions) -> bytes | None:
    nonce: bytes | None = None
    for ext in extensions:
        if isinstance(ext.value, x509.OCSPNonce):
            nonce = ext.value.nonce
        elif ext.critical:
            raise OcspError(f"OCSP response has an unknown critical extension {ext.oid.dotted_string}")
    return nonce


def _refuse_critical(extensions: x509.Extensions) -> None:
    for ext in extensions:
        if ext.critical:
            raise OcspError(f"OCSP answer has an unknown critical extension {ext.oid.dotted_string}")
