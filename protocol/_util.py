"""Private helpers that several protocol/ modules share (certs, crl, ocsp): argument checks, what
cryptography raises on malformed input, and the CA-key checks both certificate and CRL issuance make.

Not API: nothing outside protocol/ imports it.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from protocol.errors import LocalError

if TYPE_CHECKING:
    from protocol.certs import CaKey

#: What cryptography raises for malformed input. Only some of it is a ValueError: a bad version field
#: raises InvalidVersion, a repeated extension DuplicateExtension, both plain Exceptions.
MALFORMED: tuple[type[Exception], ...] = (ValueError, x509.InvalidVersion, x509.DuplicateExtension)
#: Certificate serials and CRL entries: positive, at most 20 octets (RFC 5280 §4.1.2.2).
MAX_SERIAL = 2**159


def require_aware(when: datetime, what: str) -> None:
    """Refuse a naive datetime: it compares wrongly (or raises) against the aware ones cryptography returns."""
    if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise LocalError(f"{what} must be a timezone-aware datetime, got {when!r}")


def require_window(not_before: datetime, not_after: datetime) -> None:
    """Refuse a validity window that is naive or empty."""
    require_aware(not_before, "not_before")
    require_aware(not_after, "not_after")
    if not_before >= not_after:
        raise LocalError(f"not_before {not_before} is not before not_after {not_after}")


def require_serial(serial: int) -> None:
    """Refuse a serial outside 1..2**159-1 (or a bool, which is an int to Python)."""
    if isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial < MAX_SERIAL:
        raise LocalError(f"serial must be an int in 1..2**159-1, got {serial!r}")


def require_number(number: int, what: str, limit: int) -> None:
    """Refuse `number` unless it is an int in 0..limit-1."""
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < limit:
        raise LocalError(f"{what} must be an int in 0..{limit - 1}, got {number!r}")


def require_issuer_key(ca_key: CaKey, ca_cert: x509.Certificate) -> None:
    """Refuse a key that is not `ca_cert`'s: what it signs, nobody could verify."""
    if ca_key.public_key() != ca_cert.public_key():
        raise LocalError("ca_key does not belong to ca_cert")


def authority_key_identifier(ca_key: CaKey, ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI of what `ca_cert` signs: the CA's own SKI when it has one, so AKI/SKI matching works
    for any verifier."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def sha256(data: bytes) -> bytes:
    """SHA-256 of `data`."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()
