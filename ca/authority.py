"""The certificate authority: root key, administrators, enrolment tokens, certificates, revocation.

A CA lives in a home directory:

    HOME/ca.pem   the root certificate (public: what nodes pin, what the relay is given)
    HOME/ca.db    a `node.keystore.Keystore` sealed under the CA passphrase (Argon2id):
        ca/root_key          the Ed25519 root private key (32 raw bytes), or, for a CA made with
        ca/root_token        `--pkcs11`, instead: where the root key is in the PKCS#11 token
                             (`node.pkcs11.TokenKeyRef`: module, token label, key id, public key;
                             never key bytes): the key is generated there and never leaves it
        ca/root              the root certificate (PEM; the copy the CA trusts and serves)
        ca/policy            the lifetimes chosen at `init` (JSON, seconds), so that every process
                             opening the CA (`serve`, `revoke`) issues alike
        ca/node_identity     the CA *node*'s Ed25519 identity key (32 raw bytes), or, with a token,
        ca/node_token        where that key is in the token
        ca/node_certificate  its certificate for the name "ca" (DER): the CA connects to the
                             relay as this node, the only one the relay takes CRLs from
        ca/crl_number        the number of the newest CRL (decimal ASCII; only ever rises)
        ca/crl               the newest CRL (DER)
        ca/cli_session       the secret of the session `kmsnet ca login` opened (UTF-8)
        admin/<name>         one administrator: role, TOTP secret, replay and throttle state
                             (`ca.admin.AdminRecord`)
        session/<index>      one admin session, JSON: SHA-256 of its secret, administrator, role,
                             creation and expiry. <index> is the digest's first 16 hex digits
        token/<index>        one enrolment token, JSON: its SHA-256 digest, node name, creation,
                             expiry and use times. The token itself is never stored; <index> is
                             the first 16 hex digits of the digest, a lookup key only
        issued/<serial>      one issued certificate (16 hex digits), JSON: kind, name, validity,
                             fingerprint, issue time, the PEM, and revocation time and reason
    and, in the same file, the audit log "ca" (`node.audit.AuditLog`): hash-chained and signed
    by the root key, one entry per issuance, revocation, token, CRL, login, admin change and
    refused admin attempt.

Who may do what: enrolment is authenticated by a one-time token, renewal by the node's current
key, OCSP and the CRL are public; everything else is an *admin action* and needs an
`AdminSession` (`login` with a TOTP code, see `ca.admin`) whose role allows it.

Every method reads the time from the injectable `clock`, never from the system directly, so
tests and the lab can move time. Every change to ca.db happens inside one keystore transaction
(SQLite `BEGIN IMMEDIATE`), so `kmsnet ca revoke` run while `kmsnet ca serve` enrols cannot
race it, and a refused request leaves nothing behind but its audit entry: in particular a
refused enrolment leaves its token unused.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from ca.admin import (
    PERMISSIONS,
    SESSION_TTL,
    Action,
    AdminInfo,
    AdminRecord,
    AdminSession,
    NewAdmin,
    Role,
    check_admin_name,
    check_code,
    new_admin,
)
from ca.errors import (
    AdminError,
    AdminExists,
    AdminNotFound,
    AuthenticationFailed,
    CaError,
    CaExists,
    CaNotFound,
    CertificateNotFound,
    CsrSignatureInvalid,
    EnrolmentError,
    InvalidRequest,
    LastAdmin,
    PermissionDenied,
    RenewalRefused,
    SessionRequired,
    TokenExpired,
    TokenNameMismatch,
    TokenUnknown,
    TokenUsed,
)
from ca.records import TEXT, JsonRecord
from node.audit import AuditEntry, AuditLog, AuditValue
from node.clock import renewal_due, utcnow
from node.errors import KeystoreCorrupt, code_of
from node.home import create_keystore, remove_database, write_new_files
from node.keystore import ARGON2_INTERACTIVE, Argon2Params, Keystore
from node.pkcs11 import Pin, TokenIdentityKey, TokenKeyRef, TokenSession, TokenSlot, environment_pin
from protocol import certs
from protocol.certs import CaKey
from protocol.errors import LocalError, ProtocolError
from protocol.identity import IdentityKey
from protocol.revocation import REASONS, OcspAnswer, RevokedEntry, build_ocsp_response, issue_crl

__all__ = [
    "CA_DB",
    "CA_NODE_NAME",
    "CA_PEM",
    "FIRST_ADMIN",
    "CaCreated",
    "CaPolicy",
    "CertificateAuthority",
    "EnrolmentToken",
    "IssuedCertificate",
    "Revocation",
    "require_ca",
    "require_no_ca",
]

log = logging.getLogger("kmsnet.ca")

CA_DB = "ca.db"
CA_PEM = "ca.pem"
#: The node name the CA uses on the relay; the relay takes CRLs from this name only
#: (`relay.server.RelayConfig.crl_publisher`), so no enrolment token is ever made for it.
CA_NODE_NAME = "ca"
#: The administrator `init` creates (role admin); it adds the others.
FIRST_ADMIN = "admin"
#: The audit log's name in ca.db, and the actor of what the CA does by itself (CRLs, its own certificate).
AUDIT_LOG = "ca"

#: Enrolment tokens: 128 random bits, URL-safe base64 without padding (22 characters).
TOKEN_BYTES = 16
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{22}")
#: Admin session secrets: 256 random bits (43 characters).
SESSION_BYTES = 32
_SESSION_RE = re.compile(r"[A-Za-z0-9_-]{43}")
#: Bounds on a token's lifetime.
MIN_TOKEN_TTL = timedelta(seconds=1)
MAX_TOKEN_TTL = timedelta(days=7)
DEFAULT_TOKEN_TTL = timedelta(hours=1)
#: Records of spent or expired tokens are purged this long after their expiry (until then an
#: attempt with one gets the precise "used"/"expired" answer rather than "unknown").
TOKEN_RETENTION = timedelta(days=7)
#: Hex digits of a secret's digest used as its record name (tokens, sessions).
_INDEX_LEN = 16
#: How long past its notAfter a certificate may still back a session somewhere. A node ends the
#: sessions made under a peer certificate at its notAfter + CLOCK_SKEW, by its own clock (PROTOCOL.md
#: §10.5); the rest of the margin covers a verifier whose clock runs slow. Until then `revoke NAME`
#: covers the certificate (expired or not) and the CRL lists it once revoked; never below CLOCK_SKEW.
CRL_RETENTION = timedelta(days=1)

NS_CA = "ca"
NS_TOKEN = "token"  # noqa: S105 - a keystore namespace, not a secret
NS_ISSUED = "issued"
NS_ADMIN = "admin"
NS_SESSION = "session"

CertificateKind = Literal["node", "server"]
CertificateStatus = Literal["valid", "revoked", "expired"]


_POLICY_FIELDS = ("certificate_validity", "server_validity", "root_validity", "crl_lifetime", "ocsp_validity")


@dataclass(frozen=True)
class CaPolicy(JsonRecord):
    """Lifetimes the CA issues with (the defaults are the product's). Chosen at `init`, stored in ca.db
    under ca/policy (whole seconds; a field the record lacks keeps its default)."""

    RECORD = "the CA policy record"

    #: Node certificates are short-lived: a node renews at RENEW_FRACTION of this (`node.enrol.renew_certificate`).
    certificate_validity: timedelta = timedelta(days=7)
    #: The relay's TLS certificate.
    server_validity: timedelta = timedelta(days=90)
    #: The root; node certificates never outlive it.
    root_validity: timedelta = timedelta(days=3650)
    #: A CRL's nextUpdate - thisUpdate; a new one is issued after RENEW_FRACTION of it, and at every revocation.
    #: An hour, re-issued at 2/3 (40 min): with the nodes' direct fetch (node/crlfetch.py) a relay that
    #: withholds the feed delays a revocation by at most 20 minutes (PROTOCOL.md §12.1).
    crl_lifetime: timedelta = timedelta(hours=1)
    #: An OCSP response's nextUpdate - thisUpdate (clients send a nonce, so they never reuse one anyway).
    ocsp_validity: timedelta = timedelta(hours=1)

    def __post_init__(self) -> None:
        for name in _POLICY_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise InvalidRequest(f"{name} must be a positive duration")


@dataclass(frozen=True)
class CaCreated:
    """What `init` made: the root's fingerprint and the first administrator's credential (show it once)."""

    fingerprint: str
    admin: NewAdmin


@dataclass(frozen=True)
class EnrolmentToken:
    """A one-time enrolment token for node `name`; `secret` is what the node presents (never in repr)."""

    name: str
    expires_at: datetime
    secret: str = field(repr=False)


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
class Revocation:
    """What `revoke` did: the certificates it revoked and the number of the CRL that lists them."""

    certificates: tuple[IssuedCertificate, ...]
    crl_number: int


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
class SessionRecord(JsonRecord):
    """One admin session as ca.db stores it (session/<index>): the digest of its secret, never the secret."""

    RECORD = "an admin-session record"

    digest: bytes
    admin: str
    role: Role
    created: datetime
    expires: datetime


def _secret_index(secret: str) -> tuple[str, bytes]:
    """(record name, SHA-256) of a token or session secret: the name finds the record, the digest decides."""
    digest = hashlib.sha256(secret.encode("ascii")).digest()
    return digest.hex()[:_INDEX_LEN], digest


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


class CertificateAuthority:
    """An open CA home. Create one with `init`, open it with `open`; `close()` (or `with`) when done.

    One instance is one SQLite connection: use it from one thread (the asyncio loop when serving).
    Several processes may open the same home at once (`serve` and the admin commands do).
    """

    def __init__(
        self,
        keystore: Keystore,
        *,
        clock: Callable[[], datetime] = utcnow,
        policy: CaPolicy | None = None,
        pin: Pin | None = None,
    ) -> None:
        """Internal: use `open`."""
        self._ks = keystore
        self.clock = clock
        """The time source of every decision (injectable: tests and the lab move time)."""
        root_pem = keystore.get(NS_CA, "root")
        if root_pem is None:
            raise KeystoreCorrupt(f"{keystore.path} holds no CA root")
        try:
            self.root = certs.load_certificate(root_pem)
        except ProtocolError as exc:
            raise KeystoreCorrupt(f"{keystore.path} holds an unreadable CA root") from exc
        self._token: TokenSession | None = None
        self._root_key: CaKey = self._load_root_key(pin)
        if self._root_key.public_key() != self.root.public_key():
            self.close_token()
            raise KeystoreCorrupt(f"{keystore.path}: the root key does not belong to the root certificate")
        stored_policy = keystore.get(NS_CA, "policy")
        self.policy = policy or (CaPolicy.from_record(stored_policy) if stored_policy else CaPolicy())
        self.root_pem = root_pem
        self.fingerprint = _fingerprint_hex(self.root)
        """The root's SHA-256 fingerprint (hex): what a node checks with `--ca-fingerprint`."""
        # Signed by the root key: whoever edits ca.db's audit table without it cannot re-sign the chain.
        self._audit_log = AuditLog(keystore, name=AUDIT_LOG, signer=self._root_key, clock=clock)

    def _load_root_key(self, pin: Pin | None) -> CaKey:
        """The root key: from ca.db, or, for a token-backed CA, a handle on it in the token (logging in)."""
        ref = self._ks.get(NS_CA, "root_token")
        if ref is not None:
            root_ref = TokenKeyRef.from_record(ref)
            self._token = TokenSession.open(root_ref.slot, pin if pin is not None else environment_pin)
            try:
                return self._token.ed25519(root_ref)
            except BaseException:
                self.close_token()
                raise
        raw = self._ks.get(NS_CA, "root_key")
        if raw is None:
            raise KeystoreCorrupt(f"{self._ks.path} holds no CA root key")
        try:
            return Ed25519PrivateKey.from_private_bytes(raw)
        except ValueError as exc:
            raise KeystoreCorrupt(f"{self._ks.path} holds an unreadable CA root key") from exc

    @property
    def key_token(self) -> TokenSlot | None:
        """The PKCS#11 token holding the root key, or None when ca.db holds it."""
        return None if self._token is None else self._token.slot

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
        token: TokenSlot | None = None,
        pin: Pin | None = None,
    ) -> CaCreated:
        """Create a CA in `home`: root key and certificate, the CA node's identity, the first
        administrator (FIRST_ADMIN, role admin), the policy, an empty state and its audit log.

        With `token` (and its `pin`), the root key and the CA node's identity key are generated in
        that PKCS#11 token, non-extractable, and ca.db records only where they are; every later
        `open` then needs the PIN. If creation fails, the keys it made in the token are deleted.

        Refuses (`CaExists`) if ca.db or ca.pem exists: key files are never overwritten. Writes
        ca.db first, then ca.pem; if anything fails, whatever it created is removed. Returns the
        root's SHA-256 fingerprint (hex) and the administrator's credential: show its `otpauth`
        URI to the administrator now, it is never shown again.
        """
        home = Path(home)
        require_no_ca(home)
        policy = policy or CaPolicy()
        now = clock()
        session = None if token is None else TokenSession.open(token, pin)
        made: list[TokenKeyRef] = []
        try:
            return cls._create(home, passphrase, name, clock, argon2, policy, now, (session, pin), made)
        except BaseException:
            if session is not None:
                for ref in made:  # nothing refers to them any more: leave no orphan keys in the token
                    session.destroy(ref)
            raise
        finally:
            if session is not None:
                session.close()

    @classmethod
    def _create(
        cls,
        home: Path,
        passphrase: str,
        name: str,
        clock: Callable[[], datetime],
        argon2: Argon2Params,
        policy: CaPolicy,
        now: datetime,
        token: tuple[TokenSession | None, Pin | None],
        made: list[TokenKeyRef],
    ) -> CaCreated:
        """`init`'s work; the token keys it generates are appended to `made` as they appear."""
        session, pin = token
        root_key: CaKey
        if session is None:
            root_key = Ed25519PrivateKey.generate()
        else:
            root_key = session.generate_ed25519("kmsnet-ca-root")
            made.append(root_key.ref)
            node_key = session.generate_ed25519("kmsnet-ca-node")
            made.append(node_key.ref)
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
        fingerprint = _fingerprint_hex(root)
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        created: list[NewAdmin] = []

        def fill(keystore: Keystore) -> None:
            with keystore.transaction():
                if isinstance(root_key, Ed25519PrivateKey):
                    keystore.put(NS_CA, "root_key", root_key.private_bytes_raw())
                    keystore.put(NS_CA, "node_identity", IdentityKey.generate().private_bytes())
                else:
                    keystore.put(NS_CA, "root_token", made[0].to_record())
                    keystore.put(NS_CA, "node_token", made[1].to_record())
                keystore.put(NS_CA, "root", root_pem)
                keystore.put(NS_CA, "policy", policy.to_record())
                keystore.put(NS_CA, "crl_number", b"0")
                authority = cls(keystore, clock=clock, pin=pin)
                try:
                    authority._audit(AUDIT_LOG, "ca_created", name=name, fingerprint=fingerprint)
                    record, credential = new_admin(FIRST_ADMIN, "admin", now)
                    keystore.put(NS_ADMIN, FIRST_ADMIN, record.to_record())
                    authority._audit(AUDIT_LOG, "admin_added", admin=FIRST_ADMIN, role="admin")
                    authority.node_credentials(now)  # issues the CA node's certificate
                finally:
                    authority.close_token()
                created.append(credential)

        db_path, pem_path = home / CA_DB, home / CA_PEM
        try:
            create_keystore(db_path, passphrase=passphrase, argon2=argon2, fill=fill)
        except FileExistsError as exc:
            raise CaExists(f"{db_path} appeared meanwhile; it was left as it is") from exc
        try:
            write_new_files([(pem_path, root_pem, 0o644)])
        except BaseException:
            remove_database(db_path)  # ours (created just now): a CA without its ca.pem is half made
            raise
        fields = {"home": str(home), "name": name, "fingerprint": fingerprint, "token": session is not None}
        log.info("ca_initialised", extra={"fields": fields})
        return CaCreated(fingerprint=fingerprint, admin=created[0])

    @classmethod
    def open(
        cls,
        home: Path | str,
        passphrase: str,
        *,
        clock: Callable[[], datetime] = utcnow,
        policy: CaPolicy | None = None,
        pin: Pin | None = None,
    ) -> CertificateAuthority:
        """Open the CA in `home` (with its stored policy unless `policy` overrides it).

        `pin` is asked for only when the root key is in a PKCS#11 token (default: KMSNET_PKCS11_PIN_FILE
        or KMSNET_PKCS11_PIN). Raises `CaNotFound`, the
        keystore's errors (`WrongPassphrase`...) or the token's (`PinRequired`, `WrongPin`...).
        """
        require_ca(home)
        keystore = Keystore.open(Path(home) / CA_DB, passphrase=passphrase)
        try:
            return cls(keystore, clock=clock, policy=policy, pin=pin)
        except BaseException:
            keystore.close()
            raise

    def close(self) -> None:
        """Close ca.db (and the token session); the instance is unusable afterwards."""
        self.close_token()
        self._ks.close()

    def close_token(self) -> None:
        """End the token session, if any (closing twice is fine)."""
        if self._token is not None:
            self._token.close()

    def __enter__(self) -> CertificateAuthority:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CertificateAuthority {self._ks.path} root={self.fingerprint[:16]}>"

    # --- audit ---------------------------------------------------------------------------------------

    def _audit(self, actor: str, action: str, /, **fields: AuditValue) -> None:
        """Append to the audit log (inside the caller's transaction, if any: both commit or neither)."""
        self._audit_log.append(actor, action, fields)

    def audit_entries(self, *, session: AdminSession | None) -> builtins.list[AuditEntry]:
        """Every audit entry, oldest first, as stored (`verify_audit` says whether to trust them).

        Role auditor or admin.
        """
        self._authorize(session, "audit")
        return builtins.list(self._audit_log.entries())

    def verify_audit(self, *, session: AdminSession | None) -> int:
        """Check the audit log's chain, signatures and sealed head; return its length.

        Raises `node.errors.AuditChainBroken` naming the first entry edited, removed, inserted or
        reordered. Role auditor or admin.
        """
        self._authorize(session, "audit")
        return self._audit_log.verify()

    # --- administrators and sessions ----------------------------------------------------------------

    def _admin(self, name: str) -> AdminRecord | None:
        raw = self._ks.get(NS_ADMIN, name)
        return None if raw is None else AdminRecord.from_record(raw)

    def login(self, admin: str, code: str, *, remember: bool = False) -> AdminSession:
        """Open an admin session for `admin` with a TOTP code; valid SESSION_TTL, bound to the role.

        With `remember`, the session replaces the one `remembered_session` returns (what
        `kmsnet ca login` does). Raises `AuthenticationFailed` (unknown administrator or wrong
        code), `OtpReplayed` (a code already used) or `AdminLocked` (throttled); every attempt is
        audited, and a refused one counts toward the lock-out (`ca.admin.check_code`).
        """
        now = self.clock()
        known = certs.NODE_NAME_RE.fullmatch(admin) is not None if isinstance(admin, str) else False
        refusal: AuthenticationFailed | None
        session: AdminSession | None = None
        with self._ks.transaction():
            record = self._admin(admin) if known else None
            if record is None:
                text = f"no administrator named {admin!r}" if known else "bad administrator name"
                refusal = AuthenticationFailed(text)
                self._audit(admin if known else "?", "login_failed", reason=str(refusal))
            else:
                updated, refusal = check_code(record, code if isinstance(code, str) else "", now)
                self._ks.put(NS_ADMIN, admin, updated.to_record())
                if refusal is not None:
                    self._audit(admin, "login_failed", reason=str(refusal))
                    if updated.locked_until is not None and updated.locked_until != record.locked_until:
                        self._audit(admin, "admin_locked", until=updated.locked_until.isoformat())
                else:
                    session = self._open_session(updated, now, remember)
        if refusal is not None or session is None:
            log.info("admin_login_refused", extra={"fields": {"reason": code_of(refusal or AuthenticationFailed)}})
            raise refusal or AuthenticationFailed("login refused")
        log.info("admin_login", extra={"fields": {"admin": admin, "role": session.role, "remember": remember}})
        return session

    def _open_session(self, admin: AdminRecord, now: datetime, remember: bool) -> AdminSession:
        """Store a new session for `admin` (inside the caller's transaction) and return it."""
        for index in self._ks.names(NS_SESSION):
            raw = self._ks.get(NS_SESSION, index)
            if raw is not None and SessionRecord.from_record(raw).expires <= now:
                self._ks.delete(NS_SESSION, index)  # bounds ca.db: expired sessions are useless
        secret = secrets.token_urlsafe(SESSION_BYTES)
        index, digest = _secret_index(secret)
        expires = now + SESSION_TTL
        self._ks.put(NS_SESSION, index, SessionRecord(digest, admin.name, admin.role, now, expires).to_record())
        if remember:
            previous = self._ks.get(NS_CA, "cli_session")
            if previous is not None:
                self._ks.delete(NS_SESSION, _secret_index(previous.decode("ascii"))[0])
            self._ks.put(NS_CA, "cli_session", secret.encode("ascii"))
        self._audit(admin.name, "login", role=admin.role, expires_at=expires.isoformat(), remembered=remember)
        return AdminSession(admin=admin.name, role=admin.role, expires_at=expires, secret=secret)

    def _session_record(self, secret: str) -> tuple[str, SessionRecord] | None:
        if not isinstance(secret, str) or _SESSION_RE.fullmatch(secret) is None:
            return None
        index, digest = _secret_index(secret)
        raw = self._ks.get(NS_SESSION, index)
        if raw is None:
            return None
        record = SessionRecord.from_record(raw)
        # The index only finds the record; the full digest decides, compared in constant time.
        return (index, record) if hmac.compare_digest(record.digest, digest) else None

    def resume(self, secret: str) -> AdminSession:
        """The session named by `secret` (an HTTP bearer token); `SessionRequired` (audited) unless it is open."""
        found = self._session_record(secret)
        now = self.clock()
        if found is None or found[1].expires <= now:
            refusal = SessionRequired("no open admin session with this token: log in")
            self._audit("?", "admin_refused", action="resume", reason=str(refusal))
            raise refusal
        record = found[1]
        return AdminSession(admin=record.admin, role=record.role, expires_at=record.expires, secret=secret)

    def remembered_session(self) -> AdminSession | None:
        """The session `kmsnet ca login` opened, while it is still open (else None)."""
        raw = self._ks.get(NS_CA, "cli_session")
        if raw is None:
            return None
        secret = raw.decode("ascii")
        found = self._session_record(secret)
        if found is None or found[1].expires <= self.clock():
            return None
        record = found[1]
        return AdminSession(admin=record.admin, role=record.role, expires_at=record.expires, secret=secret)

    def logout(self, session: AdminSession) -> None:
        """End `session` (and forget it as the remembered one). Ending an ended session does nothing."""
        with self._ks.transaction():
            found = self._session_record(session.secret)
            if found is None:
                return
            self._ks.delete(NS_SESSION, found[0])
            remembered = self._ks.get(NS_CA, "cli_session")
            if remembered is not None and hmac.compare_digest(remembered, session.secret.encode("ascii")):
                self._ks.delete(NS_CA, "cli_session")
            self._audit(found[1].admin, "logout")

    def _authorize(self, session: AdminSession | None, action: Action) -> SessionRecord:
        """Check that `session` is open and its role may do `action`; audit and raise if not.

        The stored session record decides, not the `AdminSession` object: it must exist, be
        unexpired, and its administrator must still exist with the role the session was opened in.
        """
        try:
            if session is None:
                raise SessionRequired("no admin session: log in (`kmsnet ca login`) or give a TOTP code (--otp)")
            found = self._session_record(session.secret)
            if found is None:
                raise SessionRequired("the admin session ended: log in again")
            record = found[1]
            if record.expires <= self.clock():
                raise SessionRequired(f"the admin session expired at {record.expires.isoformat()}: log in again")
            admin = self._admin(record.admin)
            if admin is None or admin.role != record.role:
                raise SessionRequired(f"administrator {record.admin!r} was removed or changed role: log in again")
            if record.role not in PERMISSIONS[action]:
                allowed = " or ".join(sorted(PERMISSIONS[action]))
                raise PermissionDenied(f"role {record.role!r} may not do {action!r} (needs {allowed})")
        except AdminError as exc:
            self._audit(session.admin if session is not None else "?", "admin_refused", action=action, reason=str(exc))
            log.info("admin_refused", extra={"fields": {"action": action, "reason": code_of(exc)}})
            raise
        return record

    def add_admin(self, name: str, role: str, *, session: AdminSession | None) -> NewAdmin:
        """Create administrator `name` with `role` (admin, operator or auditor). Role admin.

        Returns the credential: show its `otpauth` URI to its holder once. Raises `AdminExists`,
        or `InvalidRequest` for a bad name or role.
        """
        actor = self._authorize(session, "admins").admin
        now = self.clock()
        record, credential = new_admin(name, role, now)
        with self._ks.transaction():
            if self._admin(name) is not None:
                raise AdminExists(f"an administrator named {name!r} exists already")
            self._ks.put(NS_ADMIN, name, record.to_record())
            self._audit(actor, "admin_added", admin=name, role=record.role)
        log.info("admin_added", extra={"fields": {"admin": name, "role": record.role, "by": actor}})
        return credential

    def remove_admin(self, name: str, *, session: AdminSession | None) -> None:
        """Remove administrator `name`; its sessions end with it. Role admin.

        Raises `AdminNotFound`, or `LastAdmin` if no one with the admin role would remain.
        """
        actor = self._authorize(session, "admins").admin
        check_admin_name(name)
        with self._ks.transaction():
            record = self._admin(name)
            if record is None:
                raise AdminNotFound(f"no administrator named {name!r}")
            others = [a for a in self._admin_records() if a.name != name and a.role == "admin"]
            if record.role == "admin" and not others:
                raise LastAdmin(f"{name!r} is the last administrator with the admin role: add another first")
            self._ks.delete(NS_ADMIN, name)
            self._audit(actor, "admin_removed", admin=name, role=record.role)
        log.info("admin_removed", extra={"fields": {"admin": name, "by": actor}})

    def _admin_records(self) -> builtins.list[AdminRecord]:
        return [record for name in self._ks.names(NS_ADMIN) if (record := self._admin(name)) is not None]

    def admins(self, *, session: AdminSession | None) -> builtins.list[AdminInfo]:
        """Every administrator (name, role, creation, lock-out), by name. Role admin."""
        self._authorize(session, "admins")
        return [record.info() for record in self._admin_records()]

    # --- enrolment tokens ----------------------------------------------------------------------------

    def token(self, name: str, ttl: timedelta = DEFAULT_TOKEN_TTL, *, session: AdminSession | None) -> EnrolmentToken:
        """Make a one-time enrolment token for node `name`, valid for `ttl`. Role operator or admin.

        Only its SHA-256 digest is stored (and never in the audit log). Raises `InvalidRequest`
        for an invalid node name, the reserved name "ca", or a lifetime outside
        MIN_TOKEN_TTL..MAX_TOKEN_TTL.
        """
        actor = self._authorize(session, "token").admin
        _check_node_name(name)
        if name == CA_NODE_NAME:
            raise InvalidRequest(f"{CA_NODE_NAME!r} is the CA's own node name: no node may enrol as it")
        if not isinstance(ttl, timedelta) or not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
            raise InvalidRequest(f"a token lifetime must be within {MIN_TOKEN_TTL}..{MAX_TOKEN_TTL}")
        now = self.clock()
        secret = secrets.token_urlsafe(TOKEN_BYTES)
        index, digest = _secret_index(secret)
        record = TokenRecord(digest=digest, name=name, created=now, expires=now + ttl)
        with self._ks.transaction():
            self._purge_tokens(now)
            self._ks.put(NS_TOKEN, index, record.to_record())
            self._audit(actor, "token_issued", node=name, expires_at=record.expires.isoformat())
        log.info("token_issued", extra={"fields": {"node": name, "expires_at": record.expires.isoformat()}})
        return EnrolmentToken(name=name, expires_at=record.expires, secret=secret)

    def _purge_tokens(self, now: datetime) -> None:
        # Bounds ca.db: a token record is useless once its precise refusal no longer matters.
        for index in self._ks.names(NS_TOKEN):
            raw = self._ks.get(NS_TOKEN, index)
            if raw is not None and TokenRecord.from_record(raw).expires + TOKEN_RETENTION < now:
                self._ks.delete(NS_TOKEN, index)

    def _find_token(self, token: str) -> tuple[str, TokenRecord]:
        if not isinstance(token, str) or _TOKEN_RE.fullmatch(token) is None:
            raise TokenUnknown("unknown enrolment token")
        index, digest = _secret_index(token)
        raw = self._ks.get(NS_TOKEN, index)
        # The index only finds the record; the full digest decides, compared in constant time.
        if raw is None:
            raise TokenUnknown("unknown enrolment token")
        record = TokenRecord.from_record(raw)
        if not hmac.compare_digest(record.digest, digest):
            raise TokenUnknown("unknown enrolment token")
        return index, record

    # --- enrolment and renewal -----------------------------------------------------------------------

    def enrol(self, token: str, csr_pem: str | bytes) -> bytes:
        """Enrol a node: check `token` and the CSR, consume the token, issue and record a certificate.

        Checks, in this order: the token exists (`TokenUnknown`), is unused (`TokenUsed`, but see
        below) and not expired (`TokenExpired`); the CSR parses (`EnrolmentError`), its
        self-signature verifies (`CsrSignatureInvalid`), its key is Ed25519 and its subject one
        valid node name (`EnrolmentError`), the name is the token's (`TokenNameMismatch`). Any
        refusal leaves the token as it was. Returns the certificate (PEM), valid for
        `policy.certificate_validity`.

        Enrolment is idempotent for the key that redeemed the token: within the token's lifetime, a
        retry with a CSR for the same name and key, signed by that key, gets the same certificate
        back (the node lost the answer, or could not store it); any other key gets `TokenUsed`, and
        so does a retry once the token expired or its certificate was revoked.
        """
        now = self.clock()
        name = "?"
        try:
            with self._ks.transaction():
                index, record = self._find_token(token)
                name = record.name
                if record.used is not None:
                    pem = self._enrolled_again(record, csr_pem, now)
                    log.info(
                        "node_enrolled_again",
                        extra={"fields": {"node": name, "serial": _serial_name(record.serial or 0)}},
                    )
                    return pem
                if now >= record.expires:
                    raise TokenExpired(f"this enrolment token for {name!r} expired at {record.expires.isoformat()}")
                asked, public_key = _csr_subject(csr_pem)
                if asked != name:
                    raise TokenNameMismatch(f"the token is for {name!r}, the CSR asks for {asked!r}")
                serial = self._new_serial()
                self._ks.put(NS_TOKEN, index, replace(record, used=now, serial=serial).to_record())
                cert = self._issue_node(name, public_key, now, via="enrolment", serial=serial)
        except EnrolmentError as exc:
            log.info("enrolment_refused", extra={"fields": {"node": name, "reason": code_of(exc)}})
            raise
        log.info("node_enrolled", extra={"fields": {"node": name, "serial": _serial_name(cert.serial_number)}})
        return certs.certificate_pem(cert)

    def _enrolled_again(self, record: TokenRecord, csr_pem: str | bytes, now: datetime) -> bytes:
        """The certificate a used token enrolled, for a retry by the same key within the token's lifetime
        (inside `enrol`'s transaction); `TokenUsed` for anyone else."""
        used = f"this enrolment token for {record.name!r} was used already"
        issued = None if record.serial is None else self._issued(record.serial)
        if issued is None or now >= record.expires:
            raise TokenUsed(used)
        asked, public_key = _csr_subject(csr_pem)  # the signature proves the requester holds the key
        if asked != record.name or public_key.public_bytes_raw() != issued.public_key():
            raise TokenUsed(f"{used}, by another key")
        if issued.revoked_at is not None:
            raise TokenUsed(f"{used}, and its certificate {issued.serial:x} is revoked")
        self._audit(record.name, "enrolment_repeated", serial=_serial_name(issued.serial))
        return issued.pem

    def renew(self, certificate_pem: str | bytes, csr_pem: str | bytes) -> bytes:
        """Renew a node certificate for the same name and key; return the new certificate (PEM).

        Authenticated by the key itself: the CSR's self-signature proves that the requester holds
        the key of `certificate_pem`, which must be a node certificate this CA issued, unrevoked,
        within its validity, and no certificate of this CA for that key may be revoked (a revoked
        key is never renewed, whichever of its certificates asks). A new key needs a new
        enrolment token (`kmsnet node rekey`). Raises `RenewalRefused`, `EnrolmentError` for a
        malformed request, `CsrSignatureInvalid`.
        """
        now = self.clock()
        try:
            data = certificate_pem.encode("ascii", "replace") if isinstance(certificate_pem, str) else certificate_pem
            presented = certs.load_certificate(data)
        except ProtocolError as exc:
            raise EnrolmentError("the certificate to renew is not a PEM certificate") from exc
        name = "?"
        try:
            with self._ks.transaction():
                record = self._issued(presented.serial_number)
                if record is None or record.fingerprint != _fingerprint_hex(presented) or record.kind != "node":
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
                for other in self._issued_records():
                    if other.name == name and other.revoked_at is not None and other.public_key() == key:
                        raise RenewalRefused(f"the key of {name!r} was revoked (certificate {other.serial:x})")
                cert = self._issue_node(name, public_key, now, via="renewal", renews=record.serial)
        except EnrolmentError as exc:
            log.info("renewal_refused", extra={"fields": {"node": name, "reason": code_of(exc)}})
            raise
        except RenewalRefused as exc:
            log.info("renewal_refused", extra={"fields": {"node": name, "reason": str(exc)}})
            raise
        log.info("node_renewed", extra={"fields": {"node": name, "serial": _serial_name(cert.serial_number)}})
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

    def _record(
        self, kind: CertificateKind, name: str, cert: x509.Certificate, now: datetime, *, actor: str, via: str
    ) -> None:
        """Store and audit an issued certificate (inside the caller's transaction)."""
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
        self._audit(
            actor,
            "certificate_issued",
            kind=kind,
            name=name,
            serial=_serial_name(issued.serial),
            not_after=issued.not_after.isoformat(),
            fingerprint=issued.fingerprint,
            via=via,
        )

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
        not_before, not_after = self._window(now, self.policy.certificate_validity)
        cert = certs.issue(
            ca_key=self._root_key,
            ca_cert=self.root,
            subject_name=name,
            public_key=public_key,
            serial=serial if serial is not None else self._new_serial(),
            not_before=not_before,
            not_after=not_after,
        )
        via_text = via if renews is None else f"{via} of {_serial_name(renews)}"
        self._record("node", name, cert, now, actor=AUDIT_LOG if name == CA_NODE_NAME else name, via=via_text)
        return cert

    def issue_relay_certificate(
        self,
        hostnames: Sequence[str],
        public_key: Ed25519PublicKey | ec.EllipticCurvePublicKey,
        *,
        session: AdminSession | None,
    ) -> x509.Certificate:
        """Issue (and record) the relay's TLS server certificate for `hostnames` (DNS names or IP literals).

        Valid for `policy.server_validity`; usable for serverAuth only, never as a node identity.
        Role admin. Raises `InvalidRequest` on a bad hostname or key type.
        """
        actor = self._authorize(session, "relay-cert").admin
        now = self.clock()
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
            self._record("server", ",".join(hostnames), cert, now, actor=actor, via="relay-cert")
        log.info(
            "relay_certificate_issued",
            extra={"fields": {"hosts": ",".join(hostnames), "serial": _serial_name(cert.serial_number)}},
        )
        return cert

    def issue_relay_credentials(
        self, hostnames: Sequence[str], *, session: AdminSession | None
    ) -> tuple[x509.Certificate, bytes]:
        """A fresh ECDSA P-256 TLS key for the relay and its certificate: (certificate, key PEM). Role admin.

        P-256 rather than Ed25519 because every TLS client speaks it. The key (unencrypted
        PKCS#8, as `ssl.SSLContext.load_cert_chain` reads it) is never stored by the CA.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.issue_relay_certificate(hostnames, key.public_key(), session=session)
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
            now = self.clock()
        identity = self._node_identity()
        # Read first: `serve` asks every second, and the write lock is only needed when renewing.
        der = self._ks.get(NS_CA, "node_certificate")
        if der is None or _due(x509.load_der_x509_certificate(der), now):
            with self._ks.transaction():
                der = self._ks.get(NS_CA, "node_certificate")
                if der is None or _due(x509.load_der_x509_certificate(der), now):
                    cert = self._issue_node(CA_NODE_NAME, identity.public, now, via="ca-node")
                    der = cert.public_bytes(serialization.Encoding.DER)
                    self._ks.put(NS_CA, "node_certificate", der)
                    fields = {"serial": _serial_name(cert.serial_number)}
                    log.info("ca_node_certificate_issued", extra={"fields": fields})
        return identity, der

    def _node_identity(self) -> IdentityKey:
        """The CA node's identity key: from ca.db, or in the root's token."""
        if self._token is not None:
            ref = self._ks.get(NS_CA, "node_token")
            if ref is None:
                raise KeystoreCorrupt(f"{self._ks.path} holds no CA node identity")
            return TokenIdentityKey(self._token.ed25519(TokenKeyRef.from_record(ref)))
        raw = self._ks.get(NS_CA, "node_identity")
        if raw is None:
            raise KeystoreCorrupt(f"{self._ks.path} holds no CA node identity")
        return IdentityKey.from_private_bytes(raw)

    # --- the list of issued certificates -------------------------------------------------------------

    def _issued(self, serial: int) -> IssuedCertificate | None:
        if isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial < 2**64:
            return None  # this CA issues 64-bit serials only
        raw = self._ks.get(NS_ISSUED, _serial_name(serial))
        return None if raw is None else IssuedCertificate.from_record(raw)

    def _issued_records(self) -> Iterator[IssuedCertificate]:
        for name in self._ks.names(NS_ISSUED):
            raw = self._ks.get(NS_ISSUED, name)
            if raw is not None:
                yield IssuedCertificate.from_record(raw)

    def list(self, *, session: AdminSession | None) -> builtins.list[IssuedCertificate]:
        """Every certificate this CA issued, oldest first, with its revocation. Role auditor or admin."""
        self._authorize(session, "list")
        return sorted(self._issued_records(), key=lambda r: (r.issued_at, r.serial))

    # --- revocation ------------------------------------------------------------------------------------

    def revoke(
        self,
        name: str | None = None,
        *,
        serial: int | None = None,
        reason: str = "unspecified",
        session: AdminSession | None,
    ) -> Revocation:
        """Revoke certificates and issue a new CRL at once (persisted: `serve` publishes it). Role admin.

        With `name`, every unrevoked node certificate for any key `name` was ever certified with
        that may still back a session (`IssuedCertificate.may_back_session`: until CRL_RETENTION
        past its notAfter, so also one that expired a moment ago, or the one a renewal replaced:
        a peer's session made under it lives until its notAfter + CLOCK_SKEW); with `serial`,
        that one certificate (of `name`, if given too). `reason` is a key of `protocol.revocation.REASONS`. Raises
        `InvalidRequest` (bad arguments, the CA node's own certificate) or `CertificateNotFound`.
        """
        actor = self._authorize(session, "revoke").admin
        if reason not in REASONS:
            raise InvalidRequest(f"unknown revocation reason {reason!r}; expected one of {', '.join(REASONS)}")
        if name is None and serial is None:
            raise InvalidRequest("name a node or give a serial to revoke")
        if name is not None:
            _check_node_name(name)
        now = self.clock()
        with self._ks.transaction():
            if serial is not None:
                record = self._issued(serial)
                if record is None or (name is not None and record.name != name):
                    whose = f" to {name!r}" if name is not None else ""
                    raise CertificateNotFound(f"this CA issued no certificate {serial:x}{whose}")
                if record.revoked_at is not None:
                    raise CertificateNotFound(f"certificate {serial:x} is revoked already")
                targets = [record]
            else:
                nodes = [r for r in self._issued_records() if r.kind == "node"]
                keys = {r.public_key() for r in nodes if r.name == name}
                targets = [
                    r
                    for r in nodes
                    if r.revoked_at is None and r.may_back_session(now) and (r.name == name or r.public_key() in keys)
                ]
                if not targets:
                    raise CertificateNotFound(
                        f"{name!r} holds no valid certificate to revoke: none could still back a session"
                    )
            if any(r.kind == "node" and r.name == CA_NODE_NAME for r in targets):
                raise InvalidRequest(f"{CA_NODE_NAME!r} is the CA's own node: it is not revoked this way")
            revoked = tuple(replace(r, revoked_at=now, reason=reason) for r in targets)
            for record in revoked:
                self._ks.put(NS_ISSUED, _serial_name(record.serial), record.to_record())
                serial_text = _serial_name(record.serial)
                self._audit(actor, "certificate_revoked", name=record.name, serial=serial_text, reason=reason)
            number = self._issue_crl(now)[1]
        for record in revoked:
            log.info(
                "certificate_revoked",
                extra={"fields": {"name": record.name, "serial": _serial_name(record.serial), "reason": reason}},
            )
        return Revocation(certificates=revoked, crl_number=number)

    # --- CRL -------------------------------------------------------------------------------------------

    def current_crl(self, now: datetime | None = None) -> bytes:
        """The CRL to publish now (DER): the newest one stored, by whichever process issued it.

        The held CRL is returned while it is young; a new one is issued (CRLNumber + 1, valid
        `policy.crl_lifetime`, persisted) when none exists yet, once RENEW_FRACTION of the held
        one's lifetime has passed, or when the clock is before its thisUpdate.
        """
        if now is None:
            now = self.clock()
        # Read first: `serve` asks every second, and the write lock is only needed to re-issue.
        held = self._ks.get(NS_CA, "crl")
        if held is not None and not _crl_due(held, now):
            return held
        with self._ks.transaction():
            held = self._ks.get(NS_CA, "crl")
            if held is not None and not _crl_due(held, now):
                return held
            return self._issue_crl(now)[0]

    def _issue_crl(self, now: datetime) -> tuple[bytes, int]:
        """Issue, persist, audit and return the next CRL and its number (inside the caller's transaction).

        It lists every revoked certificate while it may back a session (until CRL_RETENTION past
        its notAfter, `IssuedCertificate.may_back_session`). The number is
        persisted with the CRL, so it only ever rises.
        """
        raw_number = self._ks.get(NS_CA, "crl_number")
        try:
            number = int(raw_number or b"0") + 1
        except ValueError as exc:
            raise KeystoreCorrupt(f"{self._ks.path} holds an unreadable CRL number") from exc
        revoked = [
            RevokedEntry(r.serial, r.revoked_at, r.reason or "unspecified")
            for r in self._issued_records()
            if r.revoked_at is not None and r.may_back_session(now)
        ]
        next_update = now + self.policy.crl_lifetime
        der = issue_crl(
            ca_key=self._root_key,
            ca_cert=self.root,
            number=number,
            this_update=now,
            next_update=next_update,
            revoked=revoked,
        )
        self._ks.put(NS_CA, "crl_number", str(number).encode())
        self._ks.put(NS_CA, "crl", der)
        self._audit(AUDIT_LOG, "crl_issued", number=number, revoked=len(revoked), next_update=next_update.isoformat())
        fields = {"number": number, "revoked": len(revoked), "next_update": next_update.isoformat()}
        log.info("crl_issued", extra={"fields": fields})
        return der, number

    # --- OCSP ------------------------------------------------------------------------------------------

    def ocsp_status(self, serial: int) -> OcspAnswer:
        """What this CA says about `serial`: revoked (time, reason), good (issued, not revoked), else unknown."""
        record = self._issued(serial)
        if record is None:
            return OcspAnswer("unknown")
        if record.revoked_at is not None:
            return OcspAnswer("revoked", record.revoked_at, record.reason or "unspecified")
        return OcspAnswer("good")

    def ocsp_response(self, request_der: bytes) -> bytes:
        """Answer one DER OCSP request (RFC 6960) with a DER response signed by the root key.

        Malformed requests and requests about another issuer get the unsigned error responses of
        `protocol.revocation.build_ocsp_response`; the nonce is echoed.
        """
        return build_ocsp_response(
            request_der,
            ca_key=self._root_key,
            ca_cert=self.root,
            lookup=self.ocsp_status,
            now=self.clock(),
            validity=self.policy.ocsp_validity,
        )


def _due(cert: x509.Certificate, now: datetime) -> bool:
    """True once RENEW_FRACTION of `cert`'s validity has passed (or before it starts)."""
    return renewal_due(cert.not_valid_before_utc, cert.not_valid_after_utc, now)


def _crl_due(der: bytes, now: datetime) -> bool:
    crl = x509.load_der_x509_crl(der)
    end = crl.next_update_utc
    # Never None (issue_crl always sets nextUpdate); a clock set back before thisUpdate gets a fresh CRL.
    return end is None or renewal_due(crl.last_update_utc, end, now)


def require_no_ca(home: Path | str) -> None:
    """Raise `CaExists` if `home` holds ca.db or ca.pem."""
    for path in (Path(home) / CA_DB, Path(home) / CA_PEM):
        if path.exists():
            raise CaExists(f"{path} exists: a CA lives here already (key files are never overwritten)")


def require_ca(home: Path | str) -> None:
    """Raise `CaNotFound` unless `home` holds a CA's ca.db."""
    if not (Path(home) / CA_DB).exists():
        raise CaNotFound(f"no CA in {home} (run `kmsnet ca init --home {home}` first)")
