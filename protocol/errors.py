"""The protocol's exception hierarchy.

Every error the core raises is a `ProtocolError`. The subclasses say what was wrong
precisely enough for a node to report it (and for a scenario to assert it) without
parsing messages. `RemoteError` means the bytes or keys came from the other side (or
an attacker) and were refused; `LocalError` means the caller misused the API.
"""

from __future__ import annotations

import re

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


class LocalError(ProtocolError):
    """The caller used the API wrongly (a bug on our side, not an attack)."""


class RemoteError(ProtocolError):
    """Input from the peer, the relay or an attacker was refused."""


# --- wire -----------------------------------------------------------------------------------------


class DecodeError(RemoteError):
    """Bytes that are not a well-formed frame of a known version and type."""


class UnknownFrameType(DecodeError):
    """A well-formed frame of a type this side does not know."""


# --- certificates ---------------------------------------------------------------------------------


class CertificateError(RemoteError):
    """A certificate was refused."""


class UntrustedIssuer(CertificateError):
    """Not signed by the pinned CA root (or the signature does not verify)."""


class CertificateExpired(CertificateError):
    """Now is past notAfter (plus the allowed clock skew)."""


class CertificateNotYetValid(CertificateError):
    """Now is before notBefore (minus the allowed clock skew)."""


class CertificateConstraintError(CertificateError):
    """Basic constraints, key usage, key type or subject do not fit the certificate's role."""


class NameMismatch(CertificateError):
    """The certificate names another node than the one expected."""


# --- revocation -----------------------------------------------------------------------------------


class RevocationError(RemoteError):
    """Revocation status could not be established, or says no."""


class CertificateRevoked(RevocationError):
    """The serial is on the CRL (or OCSP says revoked)."""

    def __init__(self, serial: int, reason: str | None = None) -> None:
        super().__init__(f"certificate serial {serial:x} is revoked" + (f" ({reason})" if reason else ""))
        self.serial = serial
        self.reason = reason


class CrlInvalid(RevocationError):
    """A CRL that does not verify (signature, issuer, format, dates)."""


class CrlRollback(RevocationError):
    """A CRL whose number is lower than one already accepted."""


class StaleFeed(RevocationError):
    """The newest CRL held is past its nextUpdate: fail closed."""


class NoRevocationData(RevocationError):
    """No CRL has been accepted yet: fail closed."""


class OcspError(RevocationError):
    """An OCSP response that does not verify or does not answer the question asked."""


# --- handshake ------------------------------------------------------------------------------------


class HandshakeError(RemoteError):
    """A prekey bundle or an initial message was refused."""


class BadSignature(HandshakeError):
    """An identity signature (bundle, prekey or transcript) does not verify."""


class WeakKey(HandshakeError):
    """An X25519 exchange produced the all-zero output (a low-order public key)."""


class SuiteError(HandshakeError):
    """The suite is unknown, or not the one the bundle offers (a downgrade)."""


class ReplayedInitialMessage(HandshakeError):
    """An initial message seen before, or naming a one-time prekey already consumed."""


class UnknownPrekey(HandshakeError):
    """An initial message names a prekey we do not hold (rotated out, or never ours)."""


class StaleInit(HandshakeError):
    """An initial message older than the confirmed session it would join (a delayed or held INIT)."""


class UnexpectedFrame(RemoteError):
    """A frame type that the current state does not accept."""


# --- ratchet --------------------------------------------------------------------------------------


class RatchetError(RemoteError):
    """A ratchet message was refused; the session state is unchanged."""


class AuthenticationFailed(RatchetError):
    """The AES-GCM tag does not verify (tampered, or not for this session)."""


class DuplicateMessage(RatchetError):
    """A message key already used: a replay or a duplicate delivery."""


class TooManySkipped(RatchetError):
    """The header skips more than MAX_SKIP messages, or would exceed the chain bounds."""


class SessionClosed(RemoteError):
    """The session was torn down (peer revoked, or closed) and refuses all frames."""
