"""OCSP (RFC 6960): the CA answers status requests, signed by its root key; a node verifies the answers.

The CA's responder (`build_ocsp_response`) answers from its registry of issued serials; a node asks
(`build_ocsp_request`) with a fresh nonce and accepts only an answer that echoes it, about its
certificate, signed by the pinned root (`verify_ocsp_response`). The node's asking side is
`node/ocsp.py`. Nothing here reads the clock; `now` is always a parameter. (cryptography's OCSP
builder stamps producedAt from the system clock by itself; nothing here reads that field back.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509 import ocsp

from protocol._util import MALFORMED, require_aware, require_issuer_key
from protocol.certs import CLOCK_SKEW, CaKey
from protocol.crl import REASONS, VerifiedCrl, reason_name
from protocol.errors import CertificateRevoked, LocalError, OcspError, library_detail

__all__ = [
    "OcspAnswer",
    "OcspStatus",
    "build_ocsp_request",
    "build_ocsp_response",
    "crl_answer",
    "verify_ocsp_response",
]

# Hashes cryptography can put in a CertID. `openssl ocsp` sends SHA-1 by default, so the responder
# must answer SHA-1 CertIDs; it is only an identifier here, the response itself is Ed25519-signed.
_CERT_ID_HASHES = (hashes.SHA1, hashes.SHA224, hashes.SHA256, hashes.SHA384, hashes.SHA512)

# RFC 8954 2.1: a nonce is 1..32 octets; we send at least 16 so that it is unpredictable.
_MAX_NONCE = 32
_MIN_OUR_NONCE = 16

_MALFORMED_OR_UNSUPPORTED: tuple[type[Exception], ...] = (*MALFORMED, UnsupportedAlgorithm)


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
            require_aware(self.revoked_at, "revoked_at")
        elif self.revoked_at is not None or self.reason is not None:
            raise LocalError(f"a {self.status} answer carries no revocation time or reason")

    def require_good(self, serial: int) -> None:
        """Fail closed unless good: `CertificateRevoked` if revoked, `OcspError` if unknown."""
        if self.status == "revoked":
            raise CertificateRevoked(serial, self.reason)
        if self.status == "unknown":
            raise OcspError(f"the responder does not know serial {serial:x}")


def crl_answer(crl: VerifiedCrl, serial: int) -> OcspAnswer:
    """What `crl` says about `serial`, as an OCSP answer (`good` or `revoked`; a CRL cannot say
    `unknown`, that needs the CA's list of issued serials)."""
    entry = crl.entries.get(serial)
    if entry is None:
        return OcspAnswer("good")
    return OcspAnswer("revoked", entry.revoked_at, entry.reason)


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
    require_aware(now, "now")
    require_issuer_key(ca_key, ca_cert)
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
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
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
    require_aware(now, "now")
    root_key = root.public_key()
    if not isinstance(root_key, Ed25519PublicKey):
        raise LocalError(f"the pinned root key must be Ed25519, got {type(root_key).__name__}")
    try:
        response = ocsp.load_der_ocsp_response(der)
    except MALFORMED as exc:
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
    reason = "unspecified" if flag is None else reason_name(flag)
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
