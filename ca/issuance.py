"""Issuing certificates: one-time enrolment tokens, enrolment, renewal, the relay's TLS certificate and
the CA node's own certificate.

Enrolment is authenticated by a one-time token, renewal by the node's current key; the relay's
certificate and tokens are admin actions, authorised by the caller (`CertificateAuthority`) before
they reach `Issuer`. Every method takes `now` and writes inside one keystore transaction, so a
refused request leaves nothing behind but its audit entry: in particular a refused enrolment
leaves its token unused.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from ca.errors import (
    CsrSignatureInvalid,
    EnrolmentError,
    InvalidRequest,
    RenewalRefused,
    TokenExpired,
    TokenNameMismatch,
    TokenUnknown,
    TokenUsed,
)
from ca.home import AUDIT_LOG, NS_CA, NS_TOKEN, secret_index
from ca.policy import Signer
from ca.records import JsonRecord
from ca.registry import CA_NODE_NAME, Registry, check_node_name, fingerprint_hex, serial_name
from node.clock import renewal_due
from node.errors import code_of
from protocol import certs
from protocol.errors import LocalError, ProtocolError

__all__ = [
    "DEFAULT_TOKEN_TTL",
    "MAX_TOKEN_TTL",
    "MIN_TOKEN_TTL",
    "TOKEN_RETENTION",
    "EnrolmentToken",
    "Issuer",
    "TokenRecord",
]

log = logging.getLogger("kmsnet.ca")

#: Enrolment tokens: 128 random bits, URL-safe base64 without padding (22 characters).
TOKEN_BYTES = 16
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{22}")
#: Bounds on a token's lifetime.
MIN_TOKEN_TTL = timedelta(seconds=1)
MAX_TOKEN_TTL = timedelta(days=7)
DEFAULT_TOKEN_TTL = timedelta(hours=1)
#: Records of spent or expired tokens are purged this long after their expiry (until then an
#: attempt with one gets the precise "used"/"expired" answer rather than "unknown").
TOKEN_RETENTION = timedelta(days=7)


@dataclass(frozen=True)
class EnrolmentToken:
    """A one-time enrolment token for node `name`; `secret` is what the node presents (never in repr)."""

    name: str
    expires_at: datetime
    secret: str = field(repr=False)


@dataclass(frozen=True)
class TokenRecord(JsonRecord):
    """One enrolment token as ca.db stores it (token/<index>): its digest, never the token."""

    RECORD = "an enrolment-token record"

    digest: bytes
    name: str
    created: datetime
    expires: datetime
    used: datetime | None = None
    #: The certificate the token enrolled (a retry by the same key gets it again).
    serial: int | None = None


@dataclass(frozen=True)
class Issuer:
    """Makes tokens and issues certificates into `registry`, signed by `signer`."""

    registry: Registry
    signer: Signer

    # --- enrolment tokens ----------------------------------------------------------------------------

    def token(self, name: str, ttl: timedelta, *, actor: str, now: datetime) -> EnrolmentToken:
        """A new one-time token for node `name` (see `CertificateAuthority.token`)."""
        check_node_name(name)
        if name == CA_NODE_NAME:
            raise InvalidRequest(f"{CA_NODE_NAME!r} is the CA's own node name: no node may enrol as it")
        if not isinstance(ttl, timedelta) or not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
            raise InvalidRequest(f"a token lifetime must be within {MIN_TOKEN_TTL}..{MAX_TOKEN_TTL}")
        secret = secrets.token_urlsafe(TOKEN_BYTES)
        index, digest = secret_index(secret)
        record = TokenRecord(digest=digest, name=name, created=now, expires=now + ttl)
        keystore = self.registry.keystore
        with keystore.transaction():
            self._purge_tokens(now)
            keystore.put(NS_TOKEN, index, record.to_record())
            self.registry.audit.append(actor, "token_issued", {"node": name, "expires_at": record.expires.isoformat()})
        log.info("token_issued", extra={"fields": {"node": name, "expires_at": record.expires.isoformat()}})
        return EnrolmentToken(name=name, expires_at=record.expires, secret=secret)

    def _purge_tokens(self, now: datetime) -> None:
        # Bounds ca.db: a token record is useless once its precise refusal no longer matters.
        keystore = self.registry.keystore
        for index in keystore.names(NS_TOKEN):
            raw = keystore.get(NS_TOKEN, index)
            if raw is not None and TokenRecord.from_record(raw).expires + TOKEN_RETENTION < now:
                keystore.delete(NS_TOKEN, index)

    def _find_token(self, token: str) -> tuple[str, TokenRecord]:
        if not isinstance(token, str) or _TOKEN_RE.fullmatch(token) is None:
            raise TokenUnknown("unknown enrolment token")
        index, digest = secret_index(token)
        raw = self.registry.keystore.get(NS_TOKEN, index)
        # The index only finds the record; the full digest decides, compared in constant time.
        if raw is None:
            raise TokenUnknown("unknown enrolment token")
        record = TokenRecord.from_record(raw)
        if not hmac.compare_digest(record.digest, digest):
            raise TokenUnknown("unknown enrolment token")
        return index, record

    # --- enrolment and renewal -----------------------------------------------------------------------

    def enrol(self, token: str, csr_pem: str | bytes, now: datetime) -> bytes:
        """Enrol a node with `token` (see `CertificateAuthority.enrol`); the certificate, PEM."""
        name = "?"
        keystore = self.registry.keystore
        try:
            with keystore.transaction():
                index, record = self._find_token(token)
                name = record.name
                if record.used is not None:
                    pem = self._enrolled_again(record, csr_pem, now)
                    log.info(
                        "node_enrolled_again",
                        extra={"fields": {"node": name, "serial": serial_name(record.serial or 0)}},
                    )
                    return pem
                if now >= record.expires:
                    raise TokenExpired(f"this enrolment token for {name!r} expired at {record.expires.isoformat()}")
                asked, public_key = _csr_subject(csr_pem)
                if asked != name:
                    raise TokenNameMismatch(f"the token is for {name!r}, the CSR asks for {asked!r}")
                serial = self.registry.new_serial()
                keystore.put(NS_TOKEN, index, replace(record, used=now, serial=serial).to_record())
                cert = self._issue_node(name, public_key, now, via="enrolment", serial=serial)
        except EnrolmentError as exc:
            log.info("enrolment_refused", extra={"fields": {"node": name, "reason": code_of(exc)}})
            raise
        log.info("node_enrolled", extra={"fields": {"node": name, "serial": serial_name(cert.serial_number)}})
        return certs.certificate_pem(cert)

    def _enrolled_again(self, record: TokenRecord, csr_pem: str | bytes, now: datetime) -> bytes:
        """The certificate a used token enrolled, for a retry by the same key within the token's lifetime
        (inside `enrol`'s transaction); `TokenUsed` for anyone else."""
        used = f"this enrolment token for {record.name!r} was used already"
        issued = None if record.serial is None else self.registry.get(record.serial)
        if issued is None or now >= record.expires:
            raise TokenUsed(used)
        asked, public_key = _csr_subject(csr_pem)  # the signature proves the requester holds the key
        if asked != record.name or public_key.public_bytes_raw() != issued.public_key():
            raise TokenUsed(f"{used}, by another key")
        if issued.revoked_at is not None:
            raise TokenUsed(f"{used}, and its certificate {issued.serial:x} is revoked")
        self.registry.audit.append(record.name, "enrolment_repeated", {"serial": serial_name(issued.serial)})
        return issued.pem

    def renew(self, certificate_pem: str | bytes, csr_pem: str | bytes, now: datetime) -> bytes:
        """Renew a node certificate, same name and key (see `CertificateAuthority.renew`); the new one, PEM."""
        try:
            data = certificate_pem.encode("ascii", "replace") if isinstance(certificate_pem, str) else certificate_pem
            presented = certs.load_certificate(data)
        except ProtocolError as exc:
            raise EnrolmentError("the certificate to renew is not a PEM certificate") from exc
        name = "?"
        try:
            with self.registry.keystore.transaction():
                record = self.registry.get(presented.serial_number)
                if record is None or record.fingerprint != fingerprint_hex(presented) or record.kind != "node":
                    raise RenewalRefused("this CA did not issue that node certificate")
                name = record.name
                if name == CA_NODE_NAME:
                    raise RenewalRefused("the CA node's own certificate is renewed by the CA itself")
                if record.revoked_at is not None:
                    raise RenewalRefused(f"certificate {record.serial:x} of {name!r} is revoked ({record.reason})")
                if not record.not_before <= now < record.not_after:
                    raise RenewalRefused(f"certificate {record.serial:x} of {name!r} is not valid now: enrol again")
                asked, public_key = _csr_subject(csr_pem)
                key = public_key.public_bytes_raw()
                if asked != name or key != record.public_key():
                    raise RenewalRefused("a renewal keeps the name and the key; a new key needs a new enrolment")
                for other in self.registry.records():
                    if other.name == name and other.revoked_at is not None and other.public_key() == key:
                        raise RenewalRefused(f"the key of {name!r} was revoked (certificate {other.serial:x})")
                cert = self._issue_node(name, public_key, now, via="renewal", renews=record.serial)
        except EnrolmentError as exc:
            log.info("renewal_refused", extra={"fields": {"node": name, "reason": code_of(exc)}})
            raise
        except RenewalRefused as exc:
            log.info("renewal_refused", extra={"fields": {"node": name, "reason": str(exc)}})
            raise
        log.info("node_renewed", extra={"fields": {"node": name, "serial": serial_name(cert.serial_number)}})
        return certs.certificate_pem(cert)

    # --- issuing ---------------------------------------------------------------------------------------

    def _issue_node(
        self,
        name: str,
        public_key: Ed25519PublicKey,
        now: datetime,
        *,
        via: str,
        renews: int | None = None,
        serial: int | None = None,
    ) -> x509.Certificate:
        """Issue and record a node certificate (inside the caller's transaction), with `serial` if given."""
        not_before, not_after = self.signer.window(now, self.signer.policy.certificate_validity)
        cert = certs.issue(
            ca_key=self.signer.key,
            ca_cert=self.signer.root,
            subject_name=name,
            public_key=public_key,
            serial=serial if serial is not None else self.registry.new_serial(),
            not_before=not_before,
            not_after=not_after,
        )
        via_text = via if renews is None else f"{via} of {serial_name(renews)}"
        self.registry.add("node", name, cert, now, actor=AUDIT_LOG if name == CA_NODE_NAME else name, via=via_text)
        return cert

    def relay_certificate(
        self,
        hostnames: Sequence[str],
        public_key: Ed25519PublicKey | ec.EllipticCurvePublicKey,
        *,
        actor: str,
        now: datetime,
    ) -> x509.Certificate:
        """Issue and record the relay's TLS certificate (see `CertificateAuthority.issue_relay_certificate`)."""
        not_before, not_after = self.signer.window(now, self.signer.policy.server_validity)
        with self.registry.keystore.transaction():
            try:
                cert = certs.issue_server(
                    ca_key=self.signer.key,
                    ca_cert=self.signer.root,
                    hostnames=hostnames,
                    public_key=public_key,
                    serial=self.registry.new_serial(),
                    not_before=not_before,
                    not_after=not_after,
                )
            except LocalError as exc:
                raise InvalidRequest(str(exc)) from exc
            self.registry.add("server", ",".join(hostnames), cert, now, actor=actor, via="relay-cert")
        log.info(
            "relay_certificate_issued",
            extra={"fields": {"hosts": ",".join(hostnames), "serial": serial_name(cert.serial_number)}},
        )
        return cert

    def relay_credentials(
        self, hostnames: Sequence[str], *, actor: str, now: datetime
    ) -> tuple[x509.Certificate, bytes]:
        """A fresh ECDSA P-256 TLS key for the relay and its certificate: (certificate, key PEM).

        P-256 rather than Ed25519 because every TLS client speaks it. The key (unencrypted
        PKCS#8, as `ssl.SSLContext.load_cert_chain` reads it) is never stored by the CA.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.relay_certificate(hostnames, key.public_key(), actor=actor, now=now)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert, key_pem

    def node_certificate(self, public_key: Ed25519PublicKey, now: datetime) -> bytes:
        """The CA node's certificate (DER), renewed (same key, new serial) once RENEW_FRACTION of its
        validity has passed, so a long-running `ca serve` never presents an expired one."""
        keystore = self.registry.keystore
        # Read first: `serve` asks every second, and the write lock is only needed when renewing.
        der = keystore.get(NS_CA, "node_certificate")
        if der is None or _due(x509.load_der_x509_certificate(der), now):
            with keystore.transaction():
                der = keystore.get(NS_CA, "node_certificate")
                if der is None or _due(x509.load_der_x509_certificate(der), now):
                    cert = self._issue_node(CA_NODE_NAME, public_key, now, via="ca-node")
                    der = cert.public_bytes(serialization.Encoding.DER)
                    keystore.put(NS_CA, "node_certificate", der)
                    fields = {"serial": serial_name(cert.serial_number)}
                    log.info("ca_node_certificate_issued", extra={"fields": fields})
        return der


def _due(cert: x509.Certificate, now: datetime) -> bool:
    """True once RENEW_FRACTION of `cert`'s validity has passed (or before it starts)."""
    return renewal_due(cert.not_valid_before_utc, cert.not_valid_after_utc, now)


def _csr_subject(csr_pem: str | bytes) -> tuple[str, Ed25519PublicKey]:
    """Check a CSR and return (node name, key).

    Raises `EnrolmentError` for one that does not parse, is not Ed25519 or names no valid node,
    and `CsrSignatureInvalid` when its self-signature does not verify: the requester must hold
    the key it names.
    """
    data = csr_pem.encode("ascii", "replace") if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
        valid = csr.is_signature_valid
        public_key = csr.public_key()
        subject = csr.subject
    except (ValueError, TypeError, x509.InvalidVersion) as exc:
        raise EnrolmentError("the CSR is not a well-formed PEM certificate request") from exc
    except UnsupportedAlgorithm as exc:
        raise EnrolmentError("the CSR uses an unsupported key or signature algorithm") from exc
    if not valid:
        raise CsrSignatureInvalid("the CSR's signature does not verify under the key it names")
    if not isinstance(public_key, Ed25519PublicKey):
        raise EnrolmentError(f"node identity keys are Ed25519, the CSR holds {certs.key_kind(public_key)}")
    attributes = list(subject)
    if len(attributes) != 1 or attributes[0].oid != NameOID.COMMON_NAME:
        raise EnrolmentError("the CSR subject must be exactly one common name (CN=<node name>)")
    name = attributes[0].value
    if not isinstance(name, str) or certs.NODE_NAME_RE.fullmatch(name) is None:
        raise EnrolmentError("the CSR's common name is not a valid node name")
    return name, public_key
