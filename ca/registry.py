"""The register of every certificate the CA issued (issued/<serial> in ca.db), and its serial numbers."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ca.errors import InvalidRequest
from ca.home import NS_ISSUED
from ca.policy import CRL_RETENTION
from ca.records import TEXT, JsonRecord
from node.audit import AuditLog
from node.keystore import Keystore
from protocol import certs
from protocol.errors import LocalError

__all__ = [
    "CA_NODE_NAME",
    "CertificateKind",
    "CertificateStatus",
    "IssuedCertificate",
    "Registry",
    "check_node_name",
    "fingerprint_hex",
    "random_serial",
    "serial_name",
]

#: The node name the CA uses on the relay; the relay takes CRLs from this name only
#: (`relay.server.RelayConfig.crl_publisher`), so no enrolment token is ever made for it.
CA_NODE_NAME = "ca"

CertificateKind = Literal["node", "server"]
CertificateStatus = Literal["valid", "revoked", "expired"]


@dataclass(frozen=True)
class IssuedCertificate(JsonRecord):
    """The CA's record of one certificate it issued (issued/<serial>), and whether it revoked it."""

    RECORD = "an issued-certificate record"

    serial: int
    kind: CertificateKind
    name: str
    not_before: datetime
    not_after: datetime
    fingerprint: str
    issued_at: datetime
    pem: bytes = field(repr=False, metadata=TEXT)
    revoked_at: datetime | None = None
    #: A key of `protocol.revocation.REASONS` when revoked.
    reason: str | None = None

    def status(self, now: datetime) -> CertificateStatus:
        """`revoked` (whenever it expires), else `expired` past notAfter, else `valid`."""
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if now >= self.not_after else "valid"

    def may_back_session(self, now: datetime) -> bool:
        """True until CRL_RETENTION past notAfter: a session made under it may still be alive somewhere."""
        return now < self.not_after + CRL_RETENTION

    def to_json(self, now: datetime) -> dict[str, object]:
        """What `kmsnet ca list --json` and the admin API show: no PEM, the status at `now`."""
        return {
            "serial": f"{self.serial:x}",
            "kind": self.kind,
            "name": self.name,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "fingerprint": self.fingerprint,
            "issued_at": self.issued_at.isoformat(),
            "status": self.status(now),
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
            "reason": self.reason,
        }

    def public_key(self) -> bytes:
        """The certified public key's raw bytes (Ed25519: 32; anything else: its DER SubjectPublicKeyInfo)."""
        key = x509.load_pem_x509_certificate(self.pem).public_key()
        if isinstance(key, Ed25519PublicKey):
            return key.public_bytes_raw()
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Registry:
    """The issued certificates in ca.db, and the audit log every change to them is written to.

    Its writes belong inside the caller's keystore transaction, so that a certificate, its record
    and its audit entry commit together or not at all.
    """

    keystore: Keystore
    audit: AuditLog

    def get(self, serial: int) -> IssuedCertificate | None:
        """The record of `serial`, or None if this CA never issued it."""
        if isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial < 2**64:
            return None  # this CA issues 64-bit serials only
        raw = self.keystore.get(NS_ISSUED, serial_name(serial))
        return None if raw is None else IssuedCertificate.from_record(raw)

    def records(self) -> Iterator[IssuedCertificate]:
        """Every record, in no particular order."""
        for name in self.keystore.names(NS_ISSUED):
            raw = self.keystore.get(NS_ISSUED, name)
            if raw is not None:
                yield IssuedCertificate.from_record(raw)

    def store(self, record: IssuedCertificate) -> None:
        """Write `record` (a new one, or one just revoked)."""
        self.keystore.put(NS_ISSUED, serial_name(record.serial), record.to_record())

    def new_serial(self) -> int:
        """A random serial this CA has not used."""
        while True:
            serial = random_serial()
            if self.keystore.get(NS_ISSUED, serial_name(serial)) is None:
                return serial

    def add(
        self, kind: CertificateKind, name: str, cert: x509.Certificate, now: datetime, *, actor: str, via: str
    ) -> IssuedCertificate:
        """Store and audit a certificate just issued."""
        issued = IssuedCertificate(
            serial=cert.serial_number,
            kind=kind,
            name=name,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            fingerprint=fingerprint_hex(cert),
            issued_at=now,
            pem=certs.certificate_pem(cert),
        )
        self.store(issued)
        fields = {"kind": kind, "name": name, "serial": serial_name(issued.serial)}
        fields |= {"not_after": issued.not_after.isoformat(), "fingerprint": issued.fingerprint, "via": via}
        self.audit.append(actor, "certificate_issued", fields)
        return issued


def serial_name(serial: int) -> str:
    """A serial as ca.db, the audit log and the logs name it: 16 hex digits."""
    return f"{serial:016x}"


def random_serial() -> int:
    """64 random bits, positive (RFC 5280 4.1.2.2; CA/B Forum asks for at least 64 bits of entropy)."""
    while True:
        serial = secrets.randbits(64)
        if serial:
            return serial


def fingerprint_hex(cert: x509.Certificate) -> str:
    """A certificate's SHA-256 fingerprint in hex, as the CA records and shows it."""
    return certs.fingerprint(cert).hex()


def check_node_name(name: str) -> str:
    """`name` if it is a valid node name, else `InvalidRequest` saying why."""
    try:
        return certs.validate_node_name(name)
    except LocalError as exc:
        raise InvalidRequest(str(exc)) from exc
