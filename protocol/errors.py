"""The protocol's exception hierarchy.

Every error the core raises is a `ProtocolError`. The subclasses say what was wrong
precisely enough for a node to report it (and for a scenario to assert it) without
parsing messages. `RemoteError` means the bytes or keys came from the other side (or
an attacker) and were refused; `LocalError` means the caller misused the API.
"""

from __future__ import annotations

import re
from typing import ClassVar

# A Rust struct dump (`ParseError { kind: ShortData }`), an object repr (`<ObjectIdentifier(...)>`) or
# a class name: what a library's message may hold that is no sentence for people.
_DEBUG_TEXT = re.compile(r"[{}<>]|\b[A-Z][a-z0-9]+[A-Z]\w*")


def library_detail(exc: BaseException) -> str:
    """`": " + str(exc)` when a library's message reads as words, else "" (the chained exception
    keeps it for a debugger)."""
    text = str(exc)
    return "" if not text or _DEBUG_TEXT.search(text) else f": {text}"


class ProtocolError(Exception):
    """Base of every error raised by `protocol`."""


def code_of(error: BaseException | type[BaseException]) -> str:
    """The stable, snake_case code of an error class (`BadSignature` -> `bad_signature`): what
    scripts and tests match on (`--json` errors, security events), so that no message a person
    reads has to carry a class name."""
    cls = error if isinstance(error, type) else type(error)
    explicit = cls.__dict__.get("code")  # the remote errors name theirs (PROTOCOL.md §15)
    if isinstance(explicit, str):
        return explicit
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in cls.__name__).lstrip("_")


class LocalError(ProtocolError):
    """The caller used the API wrongly (a bug on our side, not an attack)."""


class RemoteError(ProtocolError):
    """Input from the peer, the relay or an attacker was refused.

    Every subclass names its stable `code` explicitly: the `error` of a security event and of a
    `--json` failure (PROTOCOL.md §15), which must not change when a class is renamed.
    """

    code: ClassVar[str] = "remote_error"


# --- wire -----------------------------------------------------------------------------------------


class DecodeError(RemoteError):
    """Bytes that are not a well-formed frame of a known version and type."""

    code: ClassVar[str] = "decode_error"


class UnknownFrameType(DecodeError):
    """A well-formed frame of a type this side does not know."""

    code: ClassVar[str] = "unknown_frame_type"


# --- certificates ---------------------------------------------------------------------------------


class CertificateError(RemoteError):
    """A certificate was refused."""

    code: ClassVar[str] = "certificate_error"


class UntrustedIssuer(CertificateError):
    """Not signed by the pinned CA root (or the signature does not verify)."""

    code: ClassVar[str] = "untrusted_issuer"


class CertificateExpired(CertificateError):
    """Now is past notAfter (plus the allowed clock skew)."""

    code: ClassVar[str] = "certificate_expired"


class CertificateNotYetValid(CertificateError):
    """Now is before notBefore (minus the allowed clock skew)."""

    code: ClassVar[str] = "certificate_not_yet_valid"


class CertificateConstraintError(CertificateError):
    """Basic constraints, key usage, key type or subject do not fit the certificate's role."""

    code: ClassVar[str] = "certificate_constraint_error"


class NameMismatch(CertificateError):
    """The certificate names another node than the one expected."""

    code: ClassVar[str] = "name_mismatch"


# --- revocation -----------------------------------------------------------------------------------


class RevocationError(RemoteError):
    """Revocation status could not be established, or says no."""

    code: ClassVar[str] = "revocation_error"


class CertificateRevoked(RevocationError):
    """The serial is on the CRL (or OCSP says revoked)."""

    code: ClassVar[str] = "certificate_revoked"

    def __init__(self, serial: int, reason: str | None = None) -> None:
        super().__init__(f"certificate serial {serial:x} is revoked" + (f" ({reason})" if reason else ""))
        self.serial = serial
        self.reason = reason


class CrlInvalid(RevocationError):
    """A CRL that does not verify (signature, issuer, format, dates)."""

    code: ClassVar[str] = "crl_invalid"


class CrlRollback(RevocationError):
    """A CRL whose number is lower than one already accepted."""

    code: ClassVar[str] = "crl_rollback"


class StaleFeed(RevocationError):
    """The newest CRL held is past its nextUpdate: fail closed."""

    code: ClassVar[str] = "stale_feed"


class NoRevocationData(RevocationError):
    """No CRL has been accepted yet: fail closed."""

    code: ClassVar[str] = "no_revocation_data"


class OcspError(RevocationError):
    """An OCSP response that does not verify or does not answer the question asked."""

    code: ClassVar[str] = "ocsp_error"


# --- handshake ------------------------------------------------------------------------------------


class HandshakeError(RemoteError):
    """A prekey bundle or an initial message was refused."""

    code: ClassVar[str] = "handshake_error"


class BadSignature(HandshakeError):
    """An identity signature (bundle, prekey or transcript) does not verify."""

    code: ClassVar[str] = "bad_signature"


class WeakKey(HandshakeError):
    """An X25519 exchange produced the all-zero output (a low-order public key)."""

    code: ClassVar[str] = "weak_key"


class SuiteError(HandshakeError):
    """The suite is unknown, or not the one the bundle offers (a downgrade)."""

    code: ClassVar[str] = "suite_error"


class ReplayedInitialMessage(HandshakeError):
    """An initial message seen before, or naming a one-time prekey already consumed."""

    code: ClassVar[str] = "replayed_initial_message"


class ReplayCacheQuota(HandshakeError):
    """An initial message without a one-time prekey from an initiator whose share of the replay cache is used up."""

    code: ClassVar[str] = "replay_cache_quota"


class UnknownPrekey(HandshakeError):
    """An initial message names a prekey we do not hold (rotated out, or never ours)."""

    code: ClassVar[str] = "unknown_prekey"


class StaleInit(HandshakeError):
    """An initial message older than the confirmed session it would join (a delayed or held INIT)."""

    code: ClassVar[str] = "stale_init"


class UnexpectedFrame(RemoteError):
    """A frame type that the current state does not accept."""

    code: ClassVar[str] = "unexpected_frame"


# --- ratchet --------------------------------------------------------------------------------------


class RatchetError(RemoteError):
    """A ratchet message was refused; the session state is unchanged."""

    code: ClassVar[str] = "ratchet_error"


class AuthenticationFailed(RatchetError):
    """The AES-GCM tag does not verify (tampered, or not for this session)."""

    code: ClassVar[str] = "authentication_failed"


class DuplicateMessage(RatchetError):
    """A message key already used: a replay or a duplicate delivery."""

    code: ClassVar[str] = "duplicate_message"


class TooManySkipped(RatchetError):
    """The header skips more than MAX_SKIP messages, or would exceed the chain bounds."""

    code: ClassVar[str] = "too_many_skipped"


class SessionClosed(RemoteError):
    """The session was torn down (peer revoked, or closed) and refuses all frames."""

    code: ClassVar[str] = "session_closed"
