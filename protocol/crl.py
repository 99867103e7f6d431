"""Certificate revocation lists (RFC 5280), signed by the CA root itself (PROTOCOL.md §9).

The CA builds CRLs (`issue_crl`); a node verifies them (`verify_crl`) and keeps a
`RevocationState`: the newest CRL it accepted, which refuses rollbacks and fails closed once that
CRL is past its nextUpdate. OCSP, the other way to learn a certificate's status, is in
`protocol.ocsp`. Nothing here reads the clock; `now` is always a parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import InitVar, dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

import msgpack
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol._util import (
    MALFORMED,
    MAX_SERIAL,
    authority_key_identifier,
    require_aware,
    require_issuer_key,
    require_number,
    require_serial,
    require_window,
    sha256,
)
from protocol.certs import CLOCK_SKEW, CaKey, check_root
from protocol.errors import (
    CertificateRevoked,
    CrlInvalid,
    CrlRollback,
    DecodeError,
    LocalError,
    NoRevocationData,
    StaleFeed,
    UntrustedIssuer,
    library_detail,
)

__all__ = [
    "REASONS",
    "Freshness",
    "RevocationState",
    "RevokedEntry",
    "VerifiedCrl",
    "issue_crl",
    "reason_name",
    "verify_crl",
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


def reason_name(flag: x509.ReasonFlags) -> str | None:
    """The name (a key of `REASONS`) of an RFC 5280 reason code; None for one kmsnet does not use."""
    return _REASON_NAMES.get(flag)


# CRL numbers are at most 20 octets (RFC 5280 5.2.3); persisted as exactly that many big-endian bytes
# because msgpack integers stop at 64 bits.
_NUMBER_OCTETS = 20
_MAX_NUMBER = 2 ** (8 * _NUMBER_OCTETS - 1)

_STATE_VERSION = 1
_MINT = object()


# --- values ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RevokedEntry:
    """One revoked serial: when, and why (a key of `REASONS`)."""

    serial: int
    revoked_at: datetime
    reason: str = "unspecified"

    def __post_init__(self) -> None:
        require_serial(self.serial)
        require_aware(self.revoked_at, "revoked_at")
        if self.reason not in REASONS:
            raise LocalError(f"unknown revocation reason {self.reason!r}; expected one of {sorted(REASONS)}")


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
            raise LocalError("VerifiedCrl is only produced by protocol.crl.verify_crl")

    def __repr__(self) -> str:
        return (
            f"VerifiedCrl(number={self.number}, revoked={len(self.revoked)}, "
            f"next_update={self.next_update.isoformat()}, digest={self.digest[:8].hex()})"
        )


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
    require_issuer_key(ca_key, ca_cert)
    require_number(number, "CRL number", _MAX_NUMBER)
    require_window(this_update, next_update)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(authority_key_identifier(ca_key, ca_cert), critical=False)
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
    require_aware(now, "now")
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
    except MALFORMED as exc:
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
    except MALFORMED as exc:
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
        digest=sha256(der),
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
            if not 0 < serial < MAX_SERIAL or serial in entries:
                raise CrlInvalid(f"CRL entry serial {serial} is out of range or listed twice")
            reason = "unspecified"
            for ext in revoked.extensions:
                if isinstance(ext.value, x509.CRLReason):
                    name = reason_name(ext.value.reason)
                    if name is None:
                        raise CrlInvalid(f"CRL entry {serial:x} has reason {ext.value.reason.value}")
                    reason = name
                elif ext.critical:
                    raise CrlInvalid(f"CRL entry {serial:x} has a critical extension {ext.oid.dotted_string}")
            entries[serial] = RevokedEntry(serial, revoked.revocation_date_utc, reason)
    except MALFORMED as exc:
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
        require_aware(now, "now")
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
        require_aware(now, "now")
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
        require_aware(now, "now")
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
