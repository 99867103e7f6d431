"""The certificate authority as one object: `CertificateAuthority`, the door every caller uses.

It opens a CA home (`ca.home`: ca.pem and the sealed ca.db) and composes the rooms that do the
work, each over the same ca.db and audit log:

- `ca.admin.Administrators`: logins with a TOTP code, sessions, roles, lock-out, adding and
  removing administrators;
- `ca.issuance.Issuer`: enrolment tokens, enrolment (idempotent for the key that redeemed the
  token), renewal, the relay's TLS certificate, the CA node's own certificate;
- `ca.revocation.Revoker`: revocation, the CRL, OCSP answers;
- `ca.registry.Registry`: the issued certificates they all read and write.

Who may do what: enrolment is authenticated by a one-time token, renewal by the node's current
key, OCSP and the CRL are public; everything else is an *admin action* and needs an
`AdminSession` (`login` with a TOTP code, see `ca.admin`) whose role allows it. This object
checks the session first (refusals are audited) and then hands the action to its room.

Every method reads the time from the injectable `clock`, never from the system directly, so
tests and the lab can move time; the rooms take that time as an argument. Every change to ca.db
happens inside one keystore transaction (SQLite `BEGIN IMMEDIATE`), so `kmsnet ca revoke` run
while `kmsnet ca serve` enrols cannot race it, and a refused request leaves nothing behind but its
audit entry: in particular a refused enrolment leaves its token unused.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ca.admin import Action, AdminInfo, Administrators, AdminSession, NewAdmin
from ca.errors import InvalidRequest
from ca.home import (
    AUDIT_LOG,
    CA_DB,
    CA_PEM,
    NS_CA,
    create_home,
    load_node_identity,
    load_root_key,
    require_ca,
    require_no_ca,
)
from ca.issuance import DEFAULT_TOKEN_TTL, EnrolmentToken, Issuer
from ca.policy import CRL_RETENTION, CaPolicy, Signer
from ca.registry import CA_NODE_NAME, IssuedCertificate, Registry, fingerprint_hex, random_serial
from ca.revocation import Revocation, Revoker
from node.audit import AuditEntry, AuditLog
from node.clock import utcnow
from node.errors import KeystoreCorrupt
from node.keystore import ARGON2_INTERACTIVE, Argon2Params, Keystore
from node.pkcs11 import Pin, TokenKeyRef, TokenSession, TokenSlot
from protocol import certs
from protocol.certs import CaKey
from protocol.errors import LocalError, ProtocolError
from protocol.identity import IdentityKey
from protocol.revocation import OcspAnswer

# The names callers import from here, whichever room defines them.
__all__ = [
    "CA_DB",
    "CA_NODE_NAME",
    "CA_PEM",
    "CRL_RETENTION",
    "DEFAULT_TOKEN_TTL",
    "FIRST_ADMIN",
    "NS_CA",
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

#: The administrator `init` creates (role admin); it adds the others.
FIRST_ADMIN = "admin"


@dataclass(frozen=True)
class CaCreated:
    """What `init` made: the root's fingerprint and the first administrator's credential (show it once)."""

    fingerprint: str
    admin: NewAdmin


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
        root_key, self._token = load_root_key(keystore, pin)
        if root_key.public_key() != self.root.public_key():
            self.close_token()
            raise KeystoreCorrupt(f"{keystore.path}: the root key does not belong to the root certificate")
        stored_policy = keystore.get(NS_CA, "policy")
        self.policy = policy or (CaPolicy.from_record(stored_policy) if stored_policy else CaPolicy())
        self.root_pem = root_pem
        self.fingerprint = fingerprint_hex(self.root)
        """The root's SHA-256 fingerprint (hex): what a node checks with `--ca-fingerprint`."""
        # Signed by the root key: whoever edits ca.db's audit table without it cannot re-sign the chain.
        self._audit_log = AuditLog(keystore, name=AUDIT_LOG, signer=root_key, clock=clock)
        signer = Signer(self.root, root_key, self.policy)
        self._registry = Registry(keystore, self._audit_log)
        self._admins = Administrators(keystore, self._audit_log)
        self._issuer = Issuer(self._registry, signer)
        self._revoker = Revoker(self._registry, signer)

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
                serial=random_serial(),
                not_before=now,
                not_after=now + policy.root_validity,
            )
        except LocalError as exc:
            raise InvalidRequest(str(exc)) from exc
        root_pem = certs.certificate_pem(root)
        fingerprint = fingerprint_hex(root)
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
                    authority._audit_log.append(AUDIT_LOG, "ca_created", {"name": name, "fingerprint": fingerprint})
                    credential = authority._admins.add(FIRST_ADMIN, "admin", actor=AUDIT_LOG, now=now)
                    authority.node_credentials(now)  # issues the CA node's certificate
                finally:
                    authority.close_token()
                created.append(credential)

        create_home(home, passphrase, argon2=argon2, fill=fill, root_pem=root_pem)
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

    def _authorize(self, session: AdminSession | None, action: Action) -> str:
        """The administrator `session` belongs to, if it is open and its role may do `action` (else
        the refusal, audited: `Administrators.authorize`)."""
        return self._admins.authorize(session, action, self.clock()).admin

    # --- audit ---------------------------------------------------------------------------------------

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

    def login(self, admin: str, code: str, *, remember: bool = False) -> AdminSession:
        """Open an admin session for `admin` with a TOTP code; valid SESSION_TTL, bound to the role.

        With `remember`, the session replaces the one `remembered_session` returns (what
        `kmsnet ca login` does). Raises `AuthenticationFailed` (unknown administrator or wrong
        code), `OtpReplayed` (a code already used) or `AdminLocked` (throttled); every attempt is
        audited, and a refused one counts toward the lock-out (`ca.admin.check_code`).
        """
        return self._admins.login(admin, code, self.clock(), remember=remember)

    def resume(self, secret: str) -> AdminSession:
        """The session named by `secret` (an HTTP bearer token); `SessionRequired` (audited) unless it is open."""
        return self._admins.resume(secret, self.clock())

    def remembered_session(self) -> AdminSession | None:
        """The session `kmsnet ca login` opened, while it is still open (else None)."""
        return self._admins.remembered(self.clock())

    def logout(self, session: AdminSession) -> None:
        """End `session` (and forget it as the remembered one). Ending an ended session does nothing."""
        self._admins.logout(session)

    def add_admin(self, name: str, role: str, *, session: AdminSession | None) -> NewAdmin:
        """Create administrator `name` with `role` (admin, operator or auditor). Role admin.

        Returns the credential: show its `otpauth` URI to its holder once. Raises `AdminExists`,
        or `InvalidRequest` for a bad name or role.
        """
        actor = self._authorize(session, "admins")
        return self._admins.add(name, role, actor=actor, now=self.clock())

    def remove_admin(self, name: str, *, session: AdminSession | None) -> None:
        """Remove administrator `name`; its sessions end with it. Role admin.

        Raises `AdminNotFound`, or `LastAdmin` if no one with the admin role would remain.
        """
        self._admins.remove(name, actor=self._authorize(session, "admins"))

    def admins(self, *, session: AdminSession | None) -> builtins.list[AdminInfo]:
        """Every administrator (name, role, creation, lock-out), by name. Role admin."""
        self._authorize(session, "admins")
        return [record.info() for record in self._admins.records()]

    # --- enrolment tokens, enrolment and renewal -----------------------------------------------------

    def token(self, name: str, ttl: timedelta = DEFAULT_TOKEN_TTL, *, session: AdminSession | None) -> EnrolmentToken:
        """Make a one-time enrolment token for node `name`, valid for `ttl`. Role operator or admin.

        Only its SHA-256 digest is stored (and never in the audit log). Raises `InvalidRequest`
        for an invalid node name, the reserved name "ca", or a lifetime outside
        MIN_TOKEN_TTL..MAX_TOKEN_TTL.
        """
        actor = self._authorize(session, "token")
        return self._issuer.token(name, ttl, actor=actor, now=self.clock())

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
        return self._issuer.enrol(token, csr_pem, self.clock())

    def renew(self, certificate_pem: str | bytes, csr_pem: str | bytes) -> bytes:
        """Renew a node certificate for the same name and key; return the new certificate (PEM).

        Authenticated by the key itself: the CSR's self-signature proves that the requester holds
        the key of `certificate_pem`, which must be a node certificate this CA issued, unrevoked,
        within its validity, and no certificate of this CA for that key may be revoked (a revoked
        key is never renewed, whichever of its certificates asks). A new key needs a new
        enrolment token (`kmsnet node rekey`). Raises `RenewalRefused`, `EnrolmentError` for a
        malformed request, `CsrSignatureInvalid`.
        """
        return self._issuer.renew(certificate_pem, csr_pem, self.clock())

    # --- the relay's certificate and the CA node's -----------------------------------------------------

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
        actor = self._authorize(session, "relay-cert")
        return self._issuer.relay_certificate(hostnames, public_key, actor=actor, now=self.clock())

    def issue_relay_credentials(
        self, hostnames: Sequence[str], *, session: AdminSession | None
    ) -> tuple[x509.Certificate, bytes]:
        """A fresh ECDSA P-256 TLS key for the relay and its certificate: (certificate, key PEM). Role admin.

        The key is never stored by the CA (`Issuer.relay_credentials`).
        """
        actor = self._authorize(session, "relay-cert")
        return self._issuer.relay_credentials(hostnames, actor=actor, now=self.clock())

    def node_credentials(self, now: datetime | None = None) -> tuple[IdentityKey, bytes]:
        """The CA node's identity key and certificate (DER), for its link to the relay.

        The certificate is renewed (same key, new serial) once RENEW_FRACTION of its validity
        has passed, so a long-running `ca serve` never presents an expired one.
        """
        identity = load_node_identity(self._ks, self._token)
        return identity, self._issuer.node_certificate(identity.public, self.clock() if now is None else now)

    # --- issued certificates and revocation ------------------------------------------------------------

    def list(self, *, session: AdminSession | None) -> builtins.list[IssuedCertificate]:
        """Every certificate this CA issued, oldest first, with its revocation. Role auditor or admin."""
        self._authorize(session, "list")
        return sorted(self._registry.records(), key=lambda r: (r.issued_at, r.serial))

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
        actor = self._authorize(session, "revoke")
        return self._revoker.revoke(name, serial, reason, actor=actor, now=self.clock())

    def current_crl(self, now: datetime | None = None) -> bytes:
        """The CRL to publish now (DER): the newest one stored, by whichever process issued it.

        The held CRL is returned while it is young; a new one is issued (CRLNumber + 1, valid
        `policy.crl_lifetime`, persisted) when none exists yet, once RENEW_FRACTION of the held
        one's lifetime has passed, or when the clock is before its thisUpdate.
        """
        return self._revoker.current_crl(self.clock() if now is None else now)

    def ocsp_status(self, serial: int) -> OcspAnswer:
        """What this CA says about `serial`: revoked (time, reason), good (issued, not revoked), else unknown."""
        return self._revoker.ocsp_status(serial)

    def ocsp_response(self, request_der: bytes) -> bytes:
        """Answer one DER OCSP request (RFC 6960) with a DER response signed by the root key.

        Malformed requests and requests about another issuer get the unsigned error responses of
        `protocol.revocation.build_ocsp_response`; the nonce is echoed.
        """
        return self._revoker.ocsp_response(request_der, self.clock())
