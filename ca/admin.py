"""Administrators of the CA: roles, the TOTP second factor (RFC 6238) and admin sessions.

Two factors guard every admin action. The CA passphrase unlocks ca.db: it is the *machine*
credential, which `kmsnet ca serve` holds too. A human administrator proves themself with a
TOTP code from their authenticator app; a correct, fresh code opens a **session** (15 minutes,
bound to the administrator's role at login), and each admin action checks the session and the
role (`PERMISSIONS`).

TOTP parameters are the ones every authenticator app uses by default: HMAC-SHA1, 6 digits, a
30-second step (RFC 6238 4, RFC 4226 5.3; SHA-1 is sound in HMAC, and apps ignore the URI's
algorithm field more often than not). Each secret is 160 random bits (RFC 4226 4). A code is
checked against the steps now-1, now and now+1 (clock drift), every comparison in constant
time. Three rules make a code worth one login only:

- *replay*: the step of the last accepted code is remembered per administrator; a code for that
  step or an earlier one is refused (`OtpReplayed`);
- *throttle*: MAX_FAILURES refused attempts within FAILURE_WINDOW lock the administrator out for
  LOCKOUT (`AdminLocked`), whatever code comes next;
- *audit*: the CA writes every login, failure, lock-out and refusal to its audit log.

The rules are pure (no storage, no wall clock): `check_code` takes the stored `AdminRecord` and
`now` and returns the record to store and the refusal, if any. `Administrators` keeps the
records and the sessions in ca.db (`admin/<name>`, `session/<index>`, `ca/cli_session`) and
audits every attempt; `CertificateAuthority` asks it to authorise each admin action.
"""

from __future__ import annotations

import base64
import hmac
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Literal, get_args
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from ca.errors import (
    AdminError,
    AdminExists,
    AdminLocked,
    AdminNotFound,
    AuthenticationFailed,
    InvalidRequest,
    LastAdmin,
    OtpReplayed,
    PermissionDenied,
    SessionRequired,
)
from ca.home import NS_ADMIN, NS_CA, NS_SESSION, secret_index
from ca.records import JsonRecord
from node.audit import AuditLog, AuditValue
from node.errors import code_of
from node.keystore import Keystore
from protocol import certs

__all__ = [
    "FAILURE_WINDOW",
    "ISSUER",
    "LOCKOUT",
    "MAX_FAILURES",
    "PERMISSIONS",
    "ROLES",
    "SESSION_TTL",
    "Action",
    "AdminInfo",
    "AdminRecord",
    "AdminSession",
    "Administrators",
    "NewAdmin",
    "Role",
    "SessionRecord",
    "check_admin_name",
    "check_code",
    "code_at",
    "new_admin",
    "provisioning_uri",
    "secret_from_uri",
]

Role = Literal["admin", "operator", "auditor"]
ROLES: tuple[Role, ...] = get_args(Role)

Action = Literal["token", "revoke", "relay-cert", "admins", "list", "audit"]

PERMISSIONS: Mapping[Action, frozenset[Role]] = MappingProxyType(
    {
        "token": frozenset({"admin", "operator"}),
        "revoke": frozenset({"admin"}),
        "relay-cert": frozenset({"admin"}),
        "admins": frozenset({"admin"}),
        "list": frozenset({"admin", "auditor"}),
        "audit": frozenset({"admin", "auditor"}),
    }
)
"""Which roles may do what: `admin` everything, `operator` enrolment tokens, `auditor` read the
certificate list and the audit log."""

#: The issuer label of provisioning URIs (what the authenticator app shows).
ISSUER = "kmsnet"
SECRET_BYTES = 20
DIGITS = 6
STEP_SECONDS = 30
#: Steps accepted on either side of the current one (clock drift between phone and CA).
WINDOW = 1
SESSION_TTL = timedelta(minutes=15)
MAX_FAILURES = 5
FAILURE_WINDOW = timedelta(minutes=5)
LOCKOUT = timedelta(minutes=5)

_CODE_RE = re.compile(r"[0-9]{6}")
#: Admin session secrets: 256 random bits, URL-safe base64 without padding (43 characters).
SESSION_BYTES = 32
_SESSION_RE = re.compile(r"[A-Za-z0-9_-]{43}")

log = logging.getLogger("kmsnet.ca")


def check_admin_name(name: str) -> str:
    """Return `name` if it is a valid administrator name (the node-name syntax), else `InvalidRequest`."""
    if not isinstance(name, str) or certs.NODE_NAME_RE.fullmatch(name) is None:
        raise InvalidRequest(f"invalid administrator name {name!r}: 1..64 of [a-z0-9._-], starting with [a-z0-9]")
    return name


def _check_role(role: str) -> Role:
    for known in ROLES:
        if role == known:
            return known
    raise InvalidRequest(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")


def _totp(secret: bytes) -> TOTP:
    # SHA-1: what authenticator apps implement (module docstring); enforce_key_length keeps >= 128 bits.
    return TOTP(secret, DIGITS, SHA1(), STEP_SECONDS)  # noqa: S303 - HMAC-SHA1, RFC 6238's default


def _step(when: datetime) -> int:
    return int(when.timestamp()) // STEP_SECONDS


def code_at(secret: bytes, when: datetime) -> str:
    """The code an authenticator app shows at `when` (for tests, scripts and the lab)."""
    return _totp(secret).generate(_step(when) * STEP_SECONDS).decode("ascii")


def provisioning_uri(name: str, secret: bytes) -> str:
    """`otpauth://totp/kmsnet:NAME?secret=...&issuer=kmsnet...`: what an authenticator app scans."""
    return _totp(secret).get_provisioning_uri(name, ISSUER)


def secret_from_uri(uri: str) -> bytes:
    """The secret inside an otpauth:// URI (as `provisioning_uri` makes them); `InvalidRequest` otherwise."""
    parts = urlsplit(uri)
    values = parse_qs(parts.query).get("secret", [])
    if parts.scheme != "otpauth" or parts.netloc != "totp" or len(values) != 1:
        raise InvalidRequest("not an otpauth://totp/ URI with one secret")
    text = values[0].upper()
    try:
        return base64.b32decode(text + "=" * (-len(text) % 8))
    except ValueError as exc:
        raise InvalidRequest("the otpauth URI's secret is not base32") from exc


def _matching_step(secret: bytes, code: str, now: datetime) -> int | None:
    """The step within the window whose code is `code`, or None. Every candidate is compared, in
    constant time, so the time taken says nothing about which (if any) matched."""
    totp = _totp(secret)
    given = code.encode("ascii")
    current = _step(now)
    found = None
    for step in range(current - WINDOW, current + WINDOW + 1):
        if hmac.compare_digest(totp.generate(step * STEP_SECONDS), given):
            found = step
    return found


@dataclass(frozen=True)
class AdminRecord(JsonRecord):
    """One administrator as ca.db stores it (admin/<name>): role, TOTP secret and login state."""

    RECORD = "an administrator record"

    name: str
    role: Role
    secret: bytes = field(repr=False)
    created: datetime
    #: The TOTP step of the last accepted code: codes for it or earlier steps are refused.
    last_step: int | None = None
    #: Times of recent refused attempts (within FAILURE_WINDOW).
    failures: tuple[datetime, ...] = ()
    locked_until: datetime | None = None

    def info(self) -> AdminInfo:
        """What may be shown about this administrator (never the secret)."""
        return AdminInfo(self.name, self.role, self.created, self.locked_until)


@dataclass(frozen=True)
class AdminInfo:
    """An administrator as `kmsnet ca admin list` shows it."""

    name: str
    role: Role
    created: datetime
    locked_until: datetime | None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (`kmsnet ca admin list --json`, the admin API)."""
        return {
            "name": self.name,
            "role": self.role,
            "created": self.created.isoformat(),
            "locked_until": None if self.locked_until is None else self.locked_until.isoformat(),
        }


@dataclass(frozen=True)
class NewAdmin:
    """A credential just created: show `otpauth` to its holder once (it is never shown again)."""

    name: str
    role: Role
    secret: bytes = field(repr=False)

    @property
    def otpauth(self) -> str:
        """The provisioning URI for an authenticator app (holds the secret)."""
        return provisioning_uri(self.name, self.secret)


@dataclass(frozen=True)
class AdminSession:
    """An open admin session: who, in which role, until when. `secret` names it (a bearer token over
    HTTP); the CA checks it against its own record on every action, so a session ends for real at
    its expiry, at logout, or when its administrator is removed or changes role."""

    admin: str
    role: Role
    expires_at: datetime
    secret: str = field(repr=False)


def new_admin(name: str, role: str, now: datetime) -> tuple[AdminRecord, NewAdmin]:
    """A fresh credential for `name` in `role`: the record to store and what to show once."""
    check_admin_name(name)
    checked = _check_role(role)
    secret = secrets.token_bytes(SECRET_BYTES)
    return AdminRecord(name=name, role=checked, secret=secret, created=now), NewAdmin(name, checked, secret)


def check_code(record: AdminRecord, code: str, now: datetime) -> tuple[AdminRecord, AuthenticationFailed | None]:
    """Judge a login attempt: the record to store (always) and the refusal, or None if accepted.

    Refusals: `AdminLocked` while locked out (the code is not even looked at), `OtpReplayed` for
    a code of an already used step, `AuthenticationFailed` for a wrong or malformed code. Every
    refusal but the lock-out itself counts toward it; MAX_FAILURES within FAILURE_WINDOW lock the
    administrator out for LOCKOUT. Messages never contain the code.
    """
    if record.locked_until is not None and now < record.locked_until:
        wait = max(1, int((record.locked_until - now).total_seconds() + 0.999))
        return record, AdminLocked(f"too many wrong codes for {record.name!r}: locked for {wait} s more", wait)
    step = _matching_step(record.secret, code, now) if _CODE_RE.fullmatch(code) else None
    if step is not None and (record.last_step is None or step > record.last_step):
        return replace(record, last_step=step, failures=(), locked_until=None), None
    refusal: AuthenticationFailed
    if step is not None:
        refusal = OtpReplayed(f"this code for {record.name!r} was used already: wait for the next one")
    else:
        refusal = AuthenticationFailed(f"wrong TOTP code for {record.name!r}")
    failures = (*(f for f in record.failures if f > now - FAILURE_WINDOW), now)
    if len(failures) >= MAX_FAILURES:
        return replace(record, failures=(), locked_until=now + LOCKOUT), refusal
    return replace(record, failures=failures, locked_until=None), refusal


@dataclass(frozen=True)
class SessionRecord(JsonRecord):
    """One admin session as ca.db stores it (session/<index>): the digest of its secret, never the secret."""

    RECORD = "an admin-session record"

    digest: bytes
    admin: str
    role: Role
    created: datetime
    expires: datetime

    def session(self, secret: str) -> AdminSession:
        """The open session this record stores, named by `secret`."""
        return AdminSession(admin=self.admin, role=self.role, expires_at=self.expires, secret=secret)


@dataclass(frozen=True)
class Administrators:
    """The administrators and their sessions in ca.db: logins, the role check of every admin action,
    adding and removing administrators. Every attempt, accepted or refused, goes to `audit`."""

    keystore: Keystore
    audit: AuditLog

    def get(self, name: str) -> AdminRecord | None:
        """The record of administrator `name`, or None."""
        raw = self.keystore.get(NS_ADMIN, name)
        return None if raw is None else AdminRecord.from_record(raw)

    def records(self) -> list[AdminRecord]:
        """Every administrator, by name."""
        return [record for name in self.keystore.names(NS_ADMIN) if (record := self.get(name)) is not None]

    # --- sessions ------------------------------------------------------------------------------------

    def login(self, admin: str, code: str, now: datetime, *, remember: bool) -> AdminSession:
        """Open a session for `admin` with a TOTP code (see `CertificateAuthority.login`)."""
        known = certs.NODE_NAME_RE.fullmatch(admin) is not None if isinstance(admin, str) else False
        refusal: AuthenticationFailed | None
        session: AdminSession | None = None
        with self.keystore.transaction():
            record = self.get(admin) if known else None
            if record is None:
                text = f"no administrator named {admin!r}" if known else "bad administrator name"
                refusal = AuthenticationFailed(text)
                self.audit.append(admin if known else "?", "login_failed", {"reason": str(refusal)})
            else:
                updated, refusal = check_code(record, code if isinstance(code, str) else "", now)
                self.keystore.put(NS_ADMIN, admin, updated.to_record())
                if refusal is not None:
                    self.audit.append(admin, "login_failed", {"reason": str(refusal)})
                    if updated.locked_until is not None and updated.locked_until != record.locked_until:
                        self.audit.append(admin, "admin_locked", {"until": updated.locked_until.isoformat()})
                else:
                    session = self._open_session(updated, now, remember)
        if refusal is not None or session is None:
            log.info("admin_login_refused", extra={"fields": {"reason": code_of(refusal or AuthenticationFailed)}})
            raise refusal or AuthenticationFailed("login refused")
        log.info("admin_login", extra={"fields": {"admin": admin, "role": session.role, "remember": remember}})
        return session

    def _open_session(self, admin: AdminRecord, now: datetime, remember: bool) -> AdminSession:
        """Store a new session for `admin` (inside the caller's transaction) and return it."""
        for index in self.keystore.names(NS_SESSION):
            raw = self.keystore.get(NS_SESSION, index)
            if raw is not None and SessionRecord.from_record(raw).expires <= now:
                self.keystore.delete(NS_SESSION, index)  # bounds ca.db: expired sessions are useless
        secret = secrets.token_urlsafe(SESSION_BYTES)
        index, digest = secret_index(secret)
        record = SessionRecord(digest, admin.name, admin.role, now, now + SESSION_TTL)
        self.keystore.put(NS_SESSION, index, record.to_record())
        if remember:
            previous = self.keystore.get(NS_CA, "cli_session")
            if previous is not None:
                self.keystore.delete(NS_SESSION, secret_index(previous.decode("ascii"))[0])
            self.keystore.put(NS_CA, "cli_session", secret.encode("ascii"))
        fields: dict[str, AuditValue] = {
            "role": admin.role,
            "expires_at": record.expires.isoformat(),
            "remembered": remember,
        }
        self.audit.append(admin.name, "login", fields)
        return record.session(secret)

    def _find_session(self, secret: str) -> tuple[str, SessionRecord] | None:
        """(index, record) of the session `secret` names, if it exists (expired or not)."""
        if not isinstance(secret, str) or _SESSION_RE.fullmatch(secret) is None:
            return None
        index, digest = secret_index(secret)
        raw = self.keystore.get(NS_SESSION, index)
        if raw is None:
            return None
        record = SessionRecord.from_record(raw)
        # The index only finds the record; the full digest decides, compared in constant time.
        return (index, record) if hmac.compare_digest(record.digest, digest) else None

    def resume(self, secret: str, now: datetime) -> AdminSession:
        """The session named by `secret` (an HTTP bearer token); `SessionRequired` (audited) unless it is open."""
        found = self._find_session(secret)
        if found is None or found[1].expires <= now:
            refusal = SessionRequired("no open admin session with this token: log in")
            self.audit.append("?", "admin_refused", {"action": "resume", "reason": str(refusal)})
            raise refusal
        return found[1].session(secret)

    def remembered(self, now: datetime) -> AdminSession | None:
        """The session `kmsnet ca login` opened, while it is still open (else None)."""
        raw = self.keystore.get(NS_CA, "cli_session")
        if raw is None:
            return None
        secret = raw.decode("ascii")
        found = self._find_session(secret)
        if found is None or found[1].expires <= now:
            return None
        return found[1].session(secret)

    def logout(self, session: AdminSession) -> None:
        """End `session` (and forget it as the remembered one). Ending an ended session does nothing."""
        with self.keystore.transaction():
            found = self._find_session(session.secret)
            if found is None:
                return
            self.keystore.delete(NS_SESSION, found[0])
            remembered = self.keystore.get(NS_CA, "cli_session")
            if remembered is not None and hmac.compare_digest(remembered, session.secret.encode("ascii")):
                self.keystore.delete(NS_CA, "cli_session")
            self.audit.append(found[1].admin, "logout", {})

    def authorize(self, session: AdminSession | None, action: Action, now: datetime) -> SessionRecord:
        """Check that `session` is open and its role may do `action`; audit and raise if not.

        The stored session record decides, not the `AdminSession` object: it must exist, be
        unexpired, and its administrator must still exist with the role the session was opened in.
        """
        try:
            if session is None:
                raise SessionRequired("no admin session: log in (`kmsnet ca login`) or give a TOTP code (--otp)")
            found = self._find_session(session.secret)
            if found is None:
                raise SessionRequired("the admin session ended: log in again")
            record = found[1]
            if record.expires <= now:
                raise SessionRequired(f"the admin session expired at {record.expires.isoformat()}: log in again")
            admin = self.get(record.admin)
            if admin is None or admin.role != record.role:
                raise SessionRequired(f"administrator {record.admin!r} was removed or changed role: log in again")
            if record.role not in PERMISSIONS[action]:
                allowed = " or ".join(sorted(PERMISSIONS[action]))
                raise PermissionDenied(f"role {record.role!r} may not do {action!r} (needs {allowed})")
        except AdminError as exc:
            actor = session.admin if session is not None else "?"
            self.audit.append(actor, "admin_refused", {"action": action, "reason": str(exc)})
            log.info("admin_refused", extra={"fields": {"action": action, "reason": code_of(exc)}})
            raise
        return record

    # --- administrators ------------------------------------------------------------------------------

    def add(self, name: str, role: str, *, actor: str, now: datetime) -> NewAdmin:
        """Create administrator `name` (see `CertificateAuthority.add_admin`); its credential, to show once."""
        record, credential = new_admin(name, role, now)
        with self.keystore.transaction():
            if self.get(name) is not None:
                raise AdminExists(f"an administrator named {name!r} exists already")
            self.keystore.put(NS_ADMIN, name, record.to_record())
            self.audit.append(actor, "admin_added", {"admin": name, "role": record.role})
        log.info("admin_added", extra={"fields": {"admin": name, "role": record.role, "by": actor}})
        return credential

    def remove(self, name: str, *, actor: str) -> None:
        """Remove administrator `name` (see `CertificateAuthority.remove_admin`)."""
        check_admin_name(name)
        with self.keystore.transaction():
            record = self.get(name)
            if record is None:
                raise AdminNotFound(f"no administrator named {name!r}")
            others = [a for a in self.records() if a.name != name and a.role == "admin"]
            if record.role == "admin" and not others:
                raise LastAdmin(f"{name!r} is the last administrator with the admin role: add another first")
            self.keystore.delete(NS_ADMIN, name)
            self.audit.append(actor, "admin_removed", {"admin": name, "role": record.role})
        log.info("admin_removed", extra={"fields": {"admin": name, "by": actor}})
