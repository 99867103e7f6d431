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

This module is pure (no storage, no wall clock): `check_code` takes the stored `AdminRecord` and
`now` and returns the record to store and the refusal, if any; `CertificateAuthority` persists it.
"""

from __future__ import annotations

import base64
import hmac
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

from ca.errors import AdminLocked, AuthenticationFailed, InvalidRequest, OtpReplayed
from ca.records import JsonRecord
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
    "NewAdmin",
    "Role",
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
