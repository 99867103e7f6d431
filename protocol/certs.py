"""X.509 certificates for kmsnet: the CA root, node identity certificates, the relay's TLS certificate.

Every node holds one pinned CA root (an Ed25519 key). A node certificate binds a node name to an
Ed25519 identity key; `verify` is the only way to turn one into a `VerifiedCertificate`, and it is
what every handshake calls, so it parses once and does no more work than the checks need.

The chain is always exactly root -> leaf. That is why `verify` uses
`Certificate.verify_directly_issued_by` rather than `x509.verification.PolicyBuilder`: the latter
refuses Ed25519 issuers, and a one-link chain needs no path building.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from protocol._util import (
    MALFORMED,
    authority_key_identifier,
    require_aware,
    require_issuer_key,
    require_serial,
    require_window,
)
from protocol.errors import (
    CertificateConstraintError,
    CertificateExpired,
    CertificateNotYetValid,
    DecodeError,
    LocalError,
    NameMismatch,
    UntrustedIssuer,
    library_detail,
)

__all__ = [
    "CLOCK_SKEW",
    "NODE_NAME_RE",
    "CaKey",
    "DelegatedKey",
    "VerifiedCertificate",
    "certificate_pem",
    "fingerprint",
    "issue",
    "issue_server",
    "load_certificate",
    "make_root",
    "validate_node_name",
    "verify",
]

CLOCK_SKEW = timedelta(minutes=5)
"""Validity checks tolerate this much clock difference on each side: a certificate is accepted from
notBefore - CLOCK_SKEW through notAfter + CLOCK_SKEW inclusive. CRL and OCSP freshness use it too."""

NODE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""A node name: 1..64 characters, lowercase ASCII letters, digits, '.', '_' and '-', not starting
with punctuation. Match it with `fullmatch` (64 is the X.520 upper bound for a common name)."""

# Extensions this module understands. RFC 5280 4.2 says a certificate with any other *critical*
# extension must be refused.
# Compared by OID: isinstance against the extension classes goes through ABC machinery, which
# costs more than the rest of the constraint checks together on the handshake path.
_KNOWN_CRITICAL = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
)

_MALFORMED_OR_MISSING: tuple[type[Exception], ...] = (*MALFORMED, x509.ExtensionNotFound)

_DNS_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

# Only `verify` holds this, so a `VerifiedCertificate` cannot be constructed (or `replace`d) elsewhere.
_MINT = object()


# --- the CA key ----------------------------------------------------------------------------------


class DelegatedKey(Protocol):
    """An Ed25519 CA key that never leaves its device (a PKCS#11 token: `node.pkcs11`).

    `cryptography` signs only with keys it holds, so for such a key this module builds what is to
    be signed and hands the builder over: the key signs the to-be-signed bytes on its device and
    returns the finished object, which must be exactly what `builder.sign(key, None)` would make.
    """

    def public_key(self) -> Ed25519PublicKey:
        """The key's public half."""
        ...

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of `data`, made on the device."""
        ...

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """The certificate `builder` describes, signed by this key."""
        ...

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        """The CRL `builder` describes, signed by this key."""
        ...

    def sign_ocsp_response(self, builder: ocsp.OCSPResponseBuilder, responder: x509.Certificate) -> ocsp.OCSPResponse:
        """The OCSP response `builder` describes (responder ID: by key hash of `responder`), signed by this key."""
        ...


CaKey = Ed25519PrivateKey | DelegatedKey
"""What signs for the CA: a key `cryptography` holds, or one held by a device."""


def sign_certificate(builder: x509.CertificateBuilder, key: CaKey) -> x509.Certificate:
    """Sign `builder` with `key`, wherever the key lives."""
    if isinstance(key, Ed25519PrivateKey):
        return builder.sign(key, None)
    return key.sign_certificate(builder)


# --- names and small helpers ---------------------------------------------------------------------


def validate_node_name(name: str) -> str:
    """Return `name` if it is a valid node name (see `NODE_NAME_RE`), else raise `LocalError`."""
    if not isinstance(name, str) or NODE_NAME_RE.fullmatch(name) is None:
        raise LocalError(f"invalid node name {name!r}: 1..64 of [a-z0-9._-], starting with [a-z0-9]")
    return name


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER encoding."""
    return cert.fingerprint(hashes.SHA256())


def certificate_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_kind(public_key: object) -> str:
    """What kind of public key this is, in words for a message ("an RSA key"), never a class name."""
    kinds = (
        (Ed25519PublicKey, "an Ed25519 key"),
        (ec.EllipticCurvePublicKey, "an EC key"),
        (rsa.RSAPublicKey, "an RSA key"),
        (ed448.Ed448PublicKey, "an Ed448 key"),
        (dsa.DSAPublicKey, "a DSA key"),
    )
    return next((words for cls, words in kinds if isinstance(public_key, cls)), "another kind of key")


def load_certificate(data: bytes) -> x509.Certificate:
    """Parse one certificate from PEM or DER; anything else raises `DecodeError`."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except MALFORMED as exc:
        raise DecodeError(f"not an X.509 certificate in PEM or DER{library_detail(exc)}") from exc


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        return None
    return attrs[0].value


# --- issuing (CA side) ---------------------------------------------------------------------------


def make_root(*, key: CaKey, name: str, serial: int, not_before: datetime, not_after: datetime) -> x509.Certificate:
    """Build the self-signed CA root: CN=`name`, a CA that may sign leaves only (path length 0)
    and CRLs. Raises `LocalError` on a bad name, serial or window."""
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise LocalError(f"CA name must be 1..64 characters, got {name!r}")
    require_serial(serial)
    require_window(not_before, not_after)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return sign_certificate(builder, key)


def _leaf_builder(
    ca_key: CaKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    public_key: Ed25519PublicKey | ec.EllipticCurvePublicKey,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    require_issuer_key(ca_key, ca_cert)
    require_serial(serial)
    require_window(not_before, not_after)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(authority_key_identifier(ca_key, ca_cert), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def issue(
    *,
    ca_key: CaKey,
    ca_cert: x509.Certificate,
    subject_name: str,
    public_key: Ed25519PublicKey,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """Issue a node certificate binding `subject_name` to the Ed25519 identity key `public_key`.

    The result is exactly what `verify` accepts: CN=subject_name, not a CA, digitalSignature only,
    extended key usage clientAuth. Raises `LocalError` on a bad name, key, serial or window, or a
    `ca_key` that does not match `ca_cert`.
    """
    validate_node_name(subject_name)
    if not isinstance(public_key, Ed25519PublicKey):
        raise LocalError(f"node identity keys are Ed25519, got {type(public_key).__name__}")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_name)])
    builder = _leaf_builder(ca_key, ca_cert, subject, public_key, serial, not_before, not_after)
    builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return sign_certificate(builder, ca_key)


def _general_name(host: str) -> x509.GeneralName:
    if not isinstance(host, str):
        raise LocalError(f"hostname must be a str, got {host!r}")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    dns = host.lower()
    labels = dns.split(".")
    if len(dns) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise LocalError(f"not a DNS name or IP address literal: {host!r}")
    return x509.DNSName(dns)


def issue_server(
    *,
    ca_key: CaKey,
    ca_cert: x509.Certificate,
    hostnames: Sequence[str],
    public_key: Ed25519PublicKey | ec.EllipticCurvePublicKey,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """Issue the relay's TLS server certificate for `hostnames` (DNS names or IP literals).

    Names go in subjectAltName (which is what TLS clients match, RFC 6125); the subject CN repeats
    the first name for humans when it fits in 64 characters, otherwise the subject is empty and the
    SAN extension is marked critical as RFC 5280 4.2.1.6 requires. Extended key usage is serverAuth
    only, so `verify` refuses this certificate as a node identity even if a hostname looks like a
    node name. Raises `LocalError` on bad input.
    """
    if isinstance(hostnames, str | bytes) or not hostnames:
        raise LocalError("hostnames must be a non-empty sequence of names")
    if not isinstance(public_key, Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise LocalError(f"server keys are Ed25519 or EC, got {type(public_key).__name__}")
    names: list[x509.GeneralName] = []
    for host in hostnames:
        general = _general_name(host)
        if general not in names:
            names.append(general)
    first = names[0].value
    first_text = str(first)
    if len(first_text) <= 64:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first_text)])
    else:
        subject = x509.Name([])
    builder = _leaf_builder(ca_key, ca_cert, subject, public_key, serial, not_before, not_after)
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=len(subject) == 0)
    builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return sign_certificate(builder, ca_key)


# --- verifying (every handshake) -----------------------------------------------------------------


@dataclass(frozen=True, repr=False, slots=True)
class VerifiedCertificate:
    """A node certificate that `verify` accepted against the pinned root at some `now`.

    Only `verify` can construct one (the constructor demands a module-private token), so holding a
    `VerifiedCertificate` means the checks ran. It does not mean the certificate is unrevoked:
    revocation is the business of `protocol.crl` and `protocol.ocsp`.
    """

    name: str
    serial: int
    public_key: Ed25519PublicKey = field(compare=False)
    not_before: datetime
    not_after: datetime
    fingerprint: bytes
    der: bytes
    _mint: InitVar[object] = None

    def __post_init__(self, _mint: object) -> None:
        if _mint is not _MINT:
            raise LocalError("VerifiedCertificate is only produced by protocol.certs.verify")

    def __repr__(self) -> str:
        return f"VerifiedCertificate(name={self.name!r}, serial={self.serial:#x}, fingerprint={self.fingerprint.hex()})"


def check_root(root: x509.Certificate) -> None:
    """Raise UntrustedIssuer unless `root` is a CA certificate (cA true, keyCertSign).

    A leaf passed as the trust anchor would let its holder mint "node" certificates. Every
    verification asks, so a root that passed is remembered by identity (hashing a certificate
    costs more than the lookup; the dict keeps it alive, so its id cannot be reused).
    """
    if _CHECKED_ROOTS.get(id(root)) is root:
        return
    _check_root(root)
    if len(_CHECKED_ROOTS) >= 8:
        _CHECKED_ROOTS.clear()
    _CHECKED_ROOTS[id(root)] = root


_CHECKED_ROOTS: dict[int, x509.Certificate] = {}


def _check_root(root: x509.Certificate) -> None:
    try:
        bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    except _MALFORMED_OR_MISSING as exc:
        raise UntrustedIssuer(f"the pinned root is not a CA certificate{library_detail(exc)}") from exc
    if not bc.ca or not ku.key_cert_sign:
        raise UntrustedIssuer("the pinned root is not a CA certificate (cA false or no keyCertSign)")


def verify(
    cert: x509.Certificate | bytes, root: x509.Certificate, now: datetime, *, expected_name: str | None = None
) -> VerifiedCertificate:
    """Verify a node certificate against the pinned CA `root` at `now`.

    Checks, in this order, raising the first failure:

    1. `cert` given as bytes parses as DER -> else `DecodeError`;
    2. `root` is a CA (basicConstraints cA, keyCertSign), `cert`'s issuer is `root`'s subject and
       `root`'s key signed it -> else `UntrustedIssuer`;
    3. `now` lies within [notBefore - CLOCK_SKEW, notAfter + CLOCK_SKEW] -> else
       `CertificateNotYetValid` / `CertificateExpired`;
    4. basicConstraints present with cA false, keyUsage present with digitalSignature (and not
       keyCertSign), extendedKeyUsage present with clientAuth, no unknown critical extension, an
       Ed25519 public key -> else `CertificateConstraintError`;
    5. exactly one CN, a valid node name, equal to `expected_name` when given -> else `NameMismatch`.

    Raises `LocalError` if `now` is naive.

    What depends only on the certificate's bytes (parsing, constraints, name) is remembered for
    the last CACHE_SIZE certificates that passed; what depends on the root and on `now` — the
    signature, the validity window, the expected name — is checked on every call.
    """
    require_aware(now, "now")
    if not isinstance(cert, bytes | bytearray | memoryview):
        der = cert.public_bytes(serialization.Encoding.DER)
    else:
        der = bytes(cert)
    digest = hashlib.sha256(der).digest()
    known = _VERIFIED.get(digest)
    if known is not None:
        cert = known[0]
    elif isinstance(cert, bytes | bytearray | memoryview):
        try:
            # Trailing bytes are refused by the parser, so `der` is exactly the certificate.
            cert = x509.load_der_x509_certificate(der)
        except MALFORMED as exc:
            raise DecodeError(f"certificate does not parse as DER{library_detail(exc)}") from exc

    check_root(root)
    if now > root.not_valid_after_utc + CLOCK_SKEW:
        raise UntrustedIssuer(f"the pinned root expired at {root.not_valid_after_utc.isoformat()}")
    try:
        # Checks the issuer name against the root's subject, then the signature, in Rust.
        cert.verify_directly_issued_by(root)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # Say precisely why, parsing the issuer only on this (rare) path: names are parsed lazily,
        # so garbage in the issuer surfaces here.
        try:
            issuer = cert.issuer
        except MALFORMED as bad:
            raise DecodeError(f"certificate issuer does not parse{library_detail(bad)}") from bad
        if issuer != root.subject:
            raise UntrustedIssuer(f"issued by {issuer.rfc4514_string()!r}, not the pinned root") from exc
        raise UntrustedIssuer(f"signature does not verify under the pinned root{library_detail(exc)}") from exc

    if known is not None:
        verified = known[1]
        _check_window(verified.not_before, verified.not_after, now)
        _check_expected_name(verified.name, expected_name)
        _VERIFIED.move_to_end(digest)
        return verified

    not_before = cert.not_valid_before_utc
    not_after = cert.not_valid_after_utc
    _check_window(not_before, not_after, now)

    public_key = _check_constraints(cert)

    try:
        subject = cert.subject
    except MALFORMED as exc:
        raise NameMismatch(f"subject does not parse{library_detail(exc)}") from exc
    name = _common_name(subject)
    if name is None or NODE_NAME_RE.fullmatch(name) is None:
        raise NameMismatch(f"subject {subject.rfc4514_string()!r} does not name a node")
    _check_expected_name(name, expected_name)

    verified = VerifiedCertificate(
        name=name,
        serial=cert.serial_number,
        public_key=public_key,
        not_before=not_before,
        not_after=not_after,
        fingerprint=digest,
        der=der,
        _mint=_MINT,
    )
    _VERIFIED[digest] = (cert, verified)
    if len(_VERIFIED) > CACHE_SIZE:
        _VERIFIED.popitem(last=False)
    return verified


#: Certificates whose byte-only checks passed, by SHA-256 of their DER (least recently used first).
CACHE_SIZE = 1024
_VERIFIED: OrderedDict[bytes, tuple[x509.Certificate, VerifiedCertificate]] = OrderedDict()


def _check_window(not_before: datetime, not_after: datetime, now: datetime) -> None:
    if now < not_before - CLOCK_SKEW:
        raise CertificateNotYetValid(f"not valid before {not_before.isoformat()} (now {now.isoformat()})")
    if now > not_after + CLOCK_SKEW:
        raise CertificateExpired(f"expired at {not_after.isoformat()} (now {now.isoformat()})")


def _check_expected_name(name: str, expected_name: str | None) -> None:
    if expected_name is not None and name != expected_name:
        raise NameMismatch(f"certificate names {name!r}, expected {expected_name!r}")


def _check_constraints(cert: x509.Certificate) -> Ed25519PublicKey:
    bc: x509.BasicConstraints | None = None
    ku: x509.KeyUsage | None = None
    eku: x509.ExtendedKeyUsage | None = None
    try:
        extensions = cert.extensions
    except MALFORMED as exc:
        # Signed by our CA yet malformed (e.g. a duplicated extension): refuse the role, not the bytes.
        raise CertificateConstraintError(f"extensions do not parse{library_detail(exc)}") from exc
    # One pass over a handful of extensions beats three get_extension_for_class scans.
    for ext in extensions:
        oid = ext.oid
        if oid == ExtensionOID.BASIC_CONSTRAINTS:
            bc = ext.value
        elif oid == ExtensionOID.KEY_USAGE:
            ku = ext.value
        elif oid == ExtensionOID.EXTENDED_KEY_USAGE:
            eku = ext.value
        if ext.critical and oid not in _KNOWN_CRITICAL:
            raise CertificateConstraintError(f"unknown critical extension {oid.dotted_string}")
    if bc is None or bc.ca:
        raise CertificateConstraintError("not an end-entity certificate (basicConstraints absent or cA true)")
    if ku is None or not ku.digital_signature or ku.key_cert_sign:
        raise CertificateConstraintError("keyUsage must be present with digitalSignature and without keyCertSign")
    if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertificateConstraintError("extendedKeyUsage must be present with clientAuth")
    try:
        public_key = cert.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise CertificateConstraintError(f"unusable public key{library_detail(exc)}") from exc
    if not isinstance(public_key, Ed25519PublicKey):
        raise CertificateConstraintError(f"identity key must be Ed25519, got {key_kind(public_key)}")
    return public_key
