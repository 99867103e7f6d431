"""The certificate authority: root key, one-time enrolment tokens, node certificates, CRLs.

A CA lives in a home directory:

    HOME/ca.pem   the root certificate (public: what nodes pin, what the relay is given)
    HOME/ca.db    a `node.keystore.Keystore` sealed under the CA passphrase (Argon2id):
        ca/root_key          the Ed25519 root private key (32 raw bytes)
        ca/root              the root certificate (PEM; the copy the CA trusts and serves)
        ca/node_identity     the CA *node*'s Ed25519 identity key (32 raw bytes)
        ca/node_certificate  its certificate for the name "ca" (DER): the CA connects to the
                             relay as this node, the only one the relay takes CRLs from
        ca/crl_number        the number of the newest CRL (decimal ASCII; only ever rises)
        ca/crl               the newest CRL (DER)
        token/<index>        one enrolment token, JSON: its SHA-256 digest, node name, creation,
                             expiry and use times. The token itself is never stored; <index> is
                             the first 16 hex digits of the digest, a lookup key only
        issued/<serial>      one issued certificate (16 hex digits), JSON: kind, name, validity,
                             fingerprint, issue time and the PEM

Every method reads the time from the injectable `clock`, never from the system directly, so
tests and the lab can move time. Every change to ca.db happens inside one keystore transaction
(SQLite `BEGIN IMMEDIATE`), so a `kmsnet ca token` run while `kmsnet ca serve` enrols cannot
race it, and a refused enrolment leaves nothing behind: in particular its token stays unused.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from node.ca.errors import (
    CaError,
    CaExists,
    CaNotFound,
    CsrSignatureInvalid,
    EnrolmentError,
    InvalidRequest,
    TokenExpired,
    TokenNameMismatch,
    TokenUnknown,
    TokenUsed,
)
from node.errors import KeystoreCorrupt
from node.keystore import ARGON2_INTERACTIVE, Argon2Params, Keystore
from protocol import certs
from protocol.errors import LocalError, ProtocolError
from protocol.identity import IdentityKey
from protocol.revocation import RevokedEntry, issue_crl

__all__ = [
    "CA_DB",
    "CA_NODE_NAME",
    "CA_PEM",
    "CaPolicy",
    "CertificateAuthority",
    "EnrolmentToken",
    "IssuedCertificate",
    "create_keystore",
    "remove_database",
    "require_ca",
    "require_no_ca",
    "utcnow",
    "write_new_files",
]

log = logging.getLogger("kmsnet.ca")

CA_DB = "ca.db"
CA_PEM = "ca.pem"
#: The node name the CA uses on the relay; the relay takes CRLs from this name only
#: (`relay.server.RelayConfig.crl_publisher`), so no enrolment token is ever made for it.
CA_NODE_NAME = "ca"

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
#: Hex digits of a token's digest used as its record name.
_TOKEN_INDEX_LEN = 16

#: Certificates and CRLs are renewed once this fraction of their lifetime has passed.
RENEW_FRACTION = 2 / 3

NS_CA = "ca"
NS_TOKEN = "token"  # noqa: S105 - a keystore namespace, not a secret
NS_ISSUED = "issued"

CertificateKind = Literal["node", "server"]


def utcnow() -> datetime:
    """The default clock: the current time in UTC (the only place the CA reads wall time)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class CaPolicy:
    """Lifetimes the CA issues with (the defaults are the product's)."""

    #: Node certificates are short-lived: a node re-enrols (or, later, renews) weekly.
    certificate_validity: timedelta = timedelta(days=7)
    #: The relay's TLS certificate.
    server_validity: timedelta = timedelta(days=90)
    #: The root; node certificates never outlive it.
    root_validity: timedelta = timedelta(days=3650)
    #: A CRL's nextUpdate - thisUpdate; a new one is issued after RENEW_FRACTION of it.
    crl_lifetime: timedelta = timedelta(hours=24)

    def __post_init__(self) -> None:
        for name in ("certificate_validity", "server_validity", "root_validity", "crl_lifetime"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise InvalidRequest(f"{name} must be a positive duration")


@dataclass(frozen=True)
class EnrolmentToken:
    """A one-time enrolment token for node `name`; `secret` is what the node presents (never in repr)."""

    name: str
    expires_at: datetime
    secret: str = field(repr=False)


@dataclass(frozen=True)
class IssuedCertificate:
    """The CA's record of one certificate it issued."""

    serial: int
    kind: CertificateKind
    name: str
    not_before: datetime
    not_after: datetime
    fingerprint: str
    issued_at: datetime
    pem: bytes = field(repr=False)

    def to_record(self) -> bytes:
        """The JSON stored under issued/<serial>."""
        return _dump(
            {
                "serial": self.serial,
                "kind": self.kind,
                "name": self.name,
                "not_before": self.not_before.isoformat(),
                "not_after": self.not_after.isoformat(),
                "fingerprint": self.fingerprint,
                "issued_at": self.issued_at.isoformat(),
                "pem": self.pem.decode("ascii"),
            }
        )

    @classmethod
    def from_record(cls, data: bytes) -> IssuedCertificate:
        """Parse what `to_record` wrote."""
        try:
            raw = json.loads(data)
            return cls(
                serial=int(raw["serial"]),
                kind=raw["kind"],
                name=str(raw["name"]),
                not_before=datetime.fromisoformat(raw["not_before"]),
                not_after=datetime.fromisoformat(raw["not_after"]),
                fingerprint=str(raw["fingerprint"]),
                issued_at=datetime.fromisoformat(raw["issued_at"]),
                pem=str(raw["pem"]).encode("ascii"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise KeystoreCorrupt("an issued-certificate record does not parse") from exc


@dataclass(frozen=True)
class _TokenRecord:
    digest: bytes
    name: str
    created: datetime
    expires: datetime
    used: datetime | None = None

    def to_record(self) -> bytes:
        return _dump(
            {
                "digest": self.digest.hex(),
                "name": self.name,
                "created": self.created.isoformat(),
                "expires": self.expires.isoformat(),
                "used": None if self.used is None else self.used.isoformat(),
            }
        )

    @classmethod
    def from_record(cls, data: bytes) -> _TokenRecord:
        try:
            raw = json.loads(data)
            return cls(
                digest=bytes.fromhex(raw["digest"]),
                name=str(raw["name"]),
                created=datetime.fromisoformat(raw["created"]),
                expires=datetime.fromisoformat(raw["expires"]),
                used=None if raw["used"] is None else datetime.fromisoformat(raw["used"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise KeystoreCorrupt("an enrolment-token record does not parse") from exc


def _dump(record: dict[str, object]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


def _serial_name(serial: int) -> str:
    return f"{serial:016x}"


def _random_serial() -> int:
    # 64 random bits, positive (RFC 5280 4.1.2.2; CA/B Forum asks for at least 64 bits of entropy).
    while True:
        serial = secrets.randbits(64)
        if serial:
            return serial


def _fingerprint_hex(cert: x509.Certificate) -> str:
    return certs.fingerprint(cert).hex()


def _check_node_name(name: str) -> str:
    try:
        return certs.validate_node_name(name)
    except LocalError as exc:
        raise InvalidRequest(str(exc)) from exc


def _csr_public_key(csr_pem: str | bytes, expected_name: str) -> Ed25519PublicKey:
    """Check an enrolment CSR and return its key.

    Raises `EnrolmentError` for one that does not parse, is not Ed25519 or names no valid node,
    `CsrSignatureInvalid` when its self-signature does not verify, and `TokenNameMismatch` when it
    names another node than `expected_name`.
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
        raise EnrolmentError(f"node identity keys are Ed25519, the CSR holds {type(public_key).__name__}")
    attributes = list(subject)
    if len(attributes) != 1 or attributes[0].oid != NameOID.COMMON_NAME:
        raise EnrolmentError("the CSR subject must be exactly one common name (CN=<node name>)")
    name = attributes[0].value
    if not isinstance(name, str) or certs.NODE_NAME_RE.fullmatch(name) is None:
        raise EnrolmentError("the CSR's common name is not a valid node name")
    if name != expected_name:
        raise TokenNameMismatch(f"the token is for {expected_name!r}, the CSR asks for {name!r}")
    return public_key


class CertificateAuthority:
    """An open CA home. Create one with `init`, open it with `open`; `close()` (or `with`) when done.

    One instance is one SQLite connection: use it from one thread (the asyncio loop when serving).
    """

    def __init__(
        self,
        keystore: Keystore,
        *,
        clock: Callable[[], datetime] = utcnow,
        policy: CaPolicy | None = None,
    ) -> None:
        """Internal: use `open`."""
        self._ks = keystore
        self._clock = clock
        self.policy = policy or CaPolicy()
        root_key = keystore.get(NS_CA, "root_key")
        root_pem = keystore.get(NS_CA, "root")
        if root_key is None or root_pem is None:
            raise KeystoreCorrupt(f"{keystore.path} holds no CA root")
        try:
            self._root_key = Ed25519PrivateKey.from_private_bytes(root_key)
            self.root = certs.load_certificate(root_pem)
        except (ValueError, ProtocolError) as exc:
            raise KeystoreCorrupt(f"{keystore.path} holds an unreadable CA root") from exc
        if self._root_key.public_key() != self.root.public_key():
            raise KeystoreCorrupt(f"{keystore.path}: the root key does not belong to the root certificate")
        self.root_pem = root_pem
        self.fingerprint = _fingerprint_hex(self.root)
        """The root's SHA-256 fingerprint (hex): what a node checks with `--ca-fingerprint`."""

    # --- creating and opening -----------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        home: Path | str,
        passphrase: str,
        *,
        name: str = "kmsnet-ca",
        clock: Callable[[], datetime] = utcnow,
        argon2: Argon2Params = ARGON2_INTERACTIVE,
        policy: CaPolicy | None = None,
    ) -> str:
        """Create a CA in `home`: root key and certificate, the CA node's identity, an empty state.

        Refuses (`CaExists`) if ca.db or ca.pem exists: key files are never overwritten. Writes
        ca.db first, then ca.pem; if anything fails, whatever it created is removed. Returns the
        root's SHA-256 fingerprint (hex).
        """
        home = Path(home)
        require_no_ca(home)
        db_path, pem_path = home / CA_DB, home / CA_PEM
        policy = policy or CaPolicy()
        now = clock()
        root_key = Ed25519PrivateKey.generate()
        try:
            root = certs.make_root(
                key=root_key,
                name=name,
                serial=_random_serial(),
                not_before=now,
                not_after=now + policy.root_validity,
            )
        except LocalError as exc:
            raise InvalidRequest(str(exc)) from exc
        root_pem = certs.certificate_pem(root)
        home.mkdir(mode=0o700, parents=True, exist_ok=True)

        def fill(keystore: Keystore) -> None:
            with keystore.transaction():
                keystore.put(NS_CA, "root_key", root_key.private_bytes_raw())
                keystore.put(NS_CA, "root", root_pem)
                keystore.put(NS_CA, "node_identity", IdentityKey.generate().private_bytes())
                keystore.put(NS_CA, "crl_number", b"0")
            cls(keystore, clock=clock, policy=policy).node_credentials(now)  # issues the CA node's certificate

        try:
            create_keystore(db_path, passphrase=passphrase, argon2=argon2, fill=fill)
        except FileExistsError as exc:
            raise CaExists(f"{db_path} appeared meanwhile; it was left as it is") from exc
        try:
            write_new_files([(pem_path, root_pem, 0o644)])
        except BaseException:
            remove_database(db_path)  # ours (created just now): a CA without its ca.pem is half made
            raise
        fingerprint = _fingerprint_hex(root)
        log.info("ca_initialised", extra={"fields": {"home": str(home), "name": name, "fingerprint": fingerprint}})
        return fingerprint

    @classmethod
    def open(
        cls,
        home: Path | str,
        passphrase: str,
        *,
        clock: Callable[[], datetime] = utcnow,
        policy: CaPolicy | None = None,
    ) -> CertificateAuthority:
        """Open the CA in `home`. Raises `CaNotFound`, or the keystore's errors (`WrongPassphrase`...)."""
        require_ca(home)
        keystore = Keystore.open(Path(home) / CA_DB, passphrase=passphrase)
        try:
            return cls(keystore, clock=clock, policy=policy)
        except BaseException:
            keystore.close()
            raise

    def close(self) -> None:
        """Close ca.db; the instance is unusable afterwards."""
        self._ks.close()

    def __enter__(self) -> CertificateAuthority:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CertificateAuthority {self._ks.path} root={self.fingerprint[:16]}>"

    # --- enrolment tokens ----------------------------------------------------------------------------

    def token(self, name: str, ttl: timedelta = DEFAULT_TOKEN_TTL) -> EnrolmentToken:
        """Make a one-time enrolment token for node `name`, valid for `ttl`.

        Only its SHA-256 digest is stored. Raises `InvalidRequest` for an invalid node name, the
        reserved name "ca", or a lifetime outside MIN_TOKEN_TTL..MAX_TOKEN_TTL.
        """
        _check_node_name(name)
        if name == CA_NODE_NAME:
            raise InvalidRequest(f"{CA_NODE_NAME!r} is the CA's own node name: no node may enrol as it")
        if not isinstance(ttl, timedelta) or not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
            raise InvalidRequest(f"a token lifetime must be within {MIN_TOKEN_TTL}..{MAX_TOKEN_TTL}")
        now = self._clock()
        secret = secrets.token_urlsafe(TOKEN_BYTES)
        digest = _token_digest(secret)
        record = _TokenRecord(digest=digest, name=name, created=now, expires=now + ttl)
        with self._ks.transaction():
            self._purge_tokens(now)
            self._ks.put(NS_TOKEN, digest.hex()[:_TOKEN_INDEX_LEN], record.to_record())
        log.info("token_issued", extra={"fields": {"node": name, "expires_at": record.expires.isoformat()}})
        return EnrolmentToken(name=name, expires_at=record.expires, secret=secret)

    def _purge_tokens(self, now: datetime) -> None:
        # Bounds ca.db: a token record is useless once its precise refusal no longer matters.
        for index in self._ks.names(NS_TOKEN):
            raw = self._ks.get(NS_TOKEN, index)
            if raw is not None and _TokenRecord.from_record(raw).expires + TOKEN_RETENTION < now:
                self._ks.delete(NS_TOKEN, index)

    def _find_token(self, token: str) -> tuple[str, _TokenRecord]:
        if not isinstance(token, str) or _TOKEN_RE.fullmatch(token) is None:
            raise TokenUnknown("unknown enrolment token")
        digest = _token_digest(token)
        index = digest.hex()[:_TOKEN_INDEX_LEN]
        raw = self._ks.get(NS_TOKEN, index)
        # The index only finds the record; the full digest decides, compared in constant time.
        if raw is None:
            raise TokenUnknown("unknown enrolment token")
        record = _TokenRecord.from_record(raw)
        if not hmac.compare_digest(record.digest, digest):
            raise TokenUnknown("unknown enrolment token")
        return index, record

    # --- enrolment -----------------------------------------------------------------------------------

    def enrol(self, token: str, csr_pem: str | bytes) -> bytes:
        """Enrol a node: check `token` and the CSR, consume the token, issue and record a certificate.

        Checks, in this order: the token exists (`TokenUnknown`), is unused (`TokenUsed`) and not
        expired (`TokenExpired`); the CSR parses (`EnrolmentError`), its self-signature verifies
        (`CsrSignatureInvalid`), its key is Ed25519 and its subject one valid node name
        (`EnrolmentError`), the name is the token's (`TokenNameMismatch`). Any refusal leaves the
        token as it was. Returns the certificate (PEM), valid for `policy.certificate_validity`.
        """
        now = self._clock()
        name = "?"
        try:
            with self._ks.transaction():
                index, record = self._find_token(token)
                name = record.name
                if record.used is not None:
                    raise TokenUsed(f"this enrolment token for {name!r} was used already")
                if now >= record.expires:
                    raise TokenExpired(f"this enrolment token for {name!r} expired at {record.expires.isoformat()}")
                public_key = _csr_public_key(csr_pem, name)
                self._ks.put(NS_TOKEN, index, replace(record, used=now).to_record())
                cert = self._issue_node(name, public_key, now)
        except EnrolmentError as exc:
            log.info("enrolment_refused", extra={"fields": {"node": name, "reason": type(exc).__name__}})
            raise
        log.info("node_enrolled", extra={"fields": {"node": name, "serial": _serial_name(cert.serial_number)}})
        return certs.certificate_pem(cert)

    # --- issuing ---------------------------------------------------------------------------------------

    def _new_serial(self) -> int:
        while True:
            serial = _random_serial()
            if self._ks.get(NS_ISSUED, _serial_name(serial)) is None:
                return serial

    def _window(self, now: datetime, validity: timedelta) -> tuple[datetime, datetime]:
        # Nothing the CA signs may outlive the root that vouches for it.
        root_end = self.root.not_valid_after_utc
        if now >= root_end:
            raise CaError(f"the CA root expired at {root_end.isoformat()}: it can issue nothing more")
        return now, min(now + validity, root_end)

    def _record(self, kind: CertificateKind, name: str, cert: x509.Certificate, now: datetime) -> None:
        issued = IssuedCertificate(
            serial=cert.serial_number,
            kind=kind,
            name=name,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            fingerprint=_fingerprint_hex(cert),
            issued_at=now,
            pem=certs.certificate_pem(cert),
        )
        self._ks.put(NS_ISSUED, _serial_name(issued.serial), issued.to_record())

    def _issue_node(self, name: str, public_key: Ed25519PublicKey, now: datetime) -> x509.Certificate:
        """Issue and record a node certificate (inside the caller's transaction)."""
        not_before, not_after = self._window(now, self.policy.certificate_validity)
        cert = certs.issue(
            ca_key=self._root_key,
            ca_cert=self.root,
            subject_name=name,
            public_key=public_key,
            serial=self._new_serial(),
            not_before=not_before,
            not_after=not_after,
        )
        self._record("node", name, cert, now)
        return cert

    def issue_relay_certificate(
        self, hostnames: Sequence[str], public_key: Ed25519PublicKey | ec.EllipticCurvePublicKey
    ) -> x509.Certificate:
        """Issue (and record) the relay's TLS server certificate for `hostnames` (DNS names or IP literals).

        Valid for `policy.server_validity`; usable for serverAuth only, never as a node identity.
        Raises `InvalidRequest` on a bad hostname or key type.
        """
        now = self._clock()
        not_before, not_after = self._window(now, self.policy.server_validity)
        with self._ks.transaction():
            try:
                cert = certs.issue_server(
                    ca_key=self._root_key,
                    ca_cert=self.root,
                    hostnames=hostnames,
                    public_key=public_key,
                    serial=self._new_serial(),
                    not_before=not_before,
                    not_after=not_after,
                )
            except LocalError as exc:
                raise InvalidRequest(str(exc)) from exc
            self._record("server", ",".join(hostnames), cert, now)
        log.info(
            "relay_certificate_issued",
            extra={"fields": {"hosts": ",".join(hostnames), "serial": _serial_name(cert.serial_number)}},
        )
        return cert

    def issue_relay_credentials(self, hostnames: Sequence[str]) -> tuple[x509.Certificate, bytes]:
        """A fresh ECDSA P-256 TLS key for the relay and its certificate: (certificate, key PEM).

        P-256 rather than Ed25519 because every TLS client speaks it. The key (unencrypted
        PKCS#8, as `ssl.SSLContext.load_cert_chain` reads it) is never stored by the CA.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.issue_relay_certificate(hostnames, key.public_key())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert, key_pem

    def node_credentials(self, now: datetime | None = None) -> tuple[IdentityKey, bytes]:
        """The CA node's identity key and certificate (DER), for its link to the relay.

        The certificate is renewed (same key, new serial) once RENEW_FRACTION of its validity
        has passed, so a long-running `ca serve` never presents an expired one.
        """
        if now is None:
            now = self._clock()
        with self._ks.transaction():
            identity_bytes = self._ks.get(NS_CA, "node_identity")
            if identity_bytes is None:
                raise KeystoreCorrupt(f"{self._ks.path} holds no CA node identity")
            identity = IdentityKey.from_private_bytes(identity_bytes)
            der = self._ks.get(NS_CA, "node_certificate")
            if der is None or _due(x509.load_der_x509_certificate(der), now):
                cert = self._issue_node(CA_NODE_NAME, identity.public, now)
                der = cert.public_bytes(serialization.Encoding.DER)
                self._ks.put(NS_CA, "node_certificate", der)
                log.info("ca_node_certificate_issued", extra={"fields": {"serial": _serial_name(cert.serial_number)}})
        return identity, der

    def list(self) -> builtins.list[IssuedCertificate]:
        """Every certificate this CA issued, oldest first."""
        records = []
        for name in self._ks.names(NS_ISSUED):
            raw = self._ks.get(NS_ISSUED, name)
            if raw is not None:
                records.append(IssuedCertificate.from_record(raw))
        return sorted(records, key=lambda r: (r.issued_at, r.serial))

    # --- CRL -------------------------------------------------------------------------------------------

    def current_crl(self, now: datetime | None = None) -> bytes:
        """The CRL to publish now (DER).

        The held CRL is returned while it is young; a new one is issued (CRLNumber + 1, valid
        `policy.crl_lifetime`, persisted) when none exists yet, once RENEW_FRACTION of the held
        one's lifetime has passed, or when the clock is before its thisUpdate.
        """
        if now is None:
            now = self._clock()
        with self._ks.transaction():
            held = self._ks.get(NS_CA, "crl")
            if held is not None and not _crl_due(held, now):
                return held
            return self._issue_crl(now)

    def _issue_crl(self, now: datetime, revoked: Sequence[RevokedEntry] = ()) -> bytes:
        """Issue, persist and return the next CRL (inside the caller's transaction).

        Revocation (the next issue) stores its entries and passes them here; until then every
        CRL is empty. The number is persisted with the CRL, so it only ever rises.
        """
        raw_number = self._ks.get(NS_CA, "crl_number")
        try:
            number = int(raw_number or b"0") + 1
        except ValueError as exc:
            raise KeystoreCorrupt(f"{self._ks.path} holds an unreadable CRL number") from exc
        der = issue_crl(
            ca_key=self._root_key,
            ca_cert=self.root,
            number=number,
            this_update=now,
            next_update=now + self.policy.crl_lifetime,
            revoked=revoked,
        )
        self._ks.put(NS_CA, "crl_number", str(number).encode())
        self._ks.put(NS_CA, "crl", der)
        fields = {
            "number": number,
            "revoked": len(revoked),
            "next_update": (now + self.policy.crl_lifetime).isoformat(),
        }
        log.info("crl_issued", extra={"fields": fields})
        return der


def _due(cert: x509.Certificate, now: datetime) -> bool:
    """True once RENEW_FRACTION of `cert`'s validity has passed (or before it starts)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return not start <= now < start + (end - start) * RENEW_FRACTION


def _crl_due(der: bytes, now: datetime) -> bool:
    crl = x509.load_der_x509_crl(der)
    start, end = crl.last_update_utc, crl.next_update_utc
    if end is None:  # never: issue_crl always sets nextUpdate
        return True
    # A clock that went back before thisUpdate gets a fresh CRL too: nodes would refuse one from the future.
    return not start <= now < start + (end - start) * RENEW_FRACTION


def require_no_ca(home: Path | str) -> None:
    """Raise `CaExists` if `home` holds ca.db or ca.pem."""
    for path in (Path(home) / CA_DB, Path(home) / CA_PEM):
        if path.exists():
            raise CaExists(f"{path} exists: a CA lives here already (key files are never overwritten)")


def require_ca(home: Path | str) -> None:
    """Raise `CaNotFound` unless `home` holds a CA's ca.db."""
    if not (Path(home) / CA_DB).exists():
        raise CaNotFound(f"no CA in {home} (run `kmsnet ca init --home {home}` first)")


def create_keystore(path: Path, *, passphrase: str, argon2: Argon2Params, fill: Callable[[Keystore], None]) -> None:
    """Create a keystore at `path` and `fill` it, all at once or not at all.

    It is built under a temporary name and hard-linked into place, so a failure or a crash
    leaves nothing at `path`, and a file that appeared there meanwhile is kept as it is
    (`FileExistsError`), never opened or overwritten.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.new")
    try:
        with Keystore.open(tmp, passphrase=passphrase, create=True, argon2=argon2) as keystore:
            fill(keystore)
            keystore.scrub()  # everything into the main file: the link below must carry it all
        os.link(tmp, path)
    finally:
        remove_database(tmp)


def remove_database(path: Path) -> None:
    """Delete an SQLite file and its -wal and -shm side files (missing ones are fine)."""
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)


def write_new_files(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write `(path, data, mode)` files that must not exist yet, all or none.

    Each is created with O_EXCL, so an existing file is never overwritten (`FileExistsError`);
    if one write fails, the files written before it are removed.
    """
    written: builtins.list[Path] = []
    try:
        for path, data, mode in files:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            written.append(path)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
