"""Errors of the certificate authority (`ca`).

They extend the node's `node.errors.CaError` family (the enrolment client's errors live there: the
node never imports the CA), so the command line maps them like every other node error: the
`TrustError` ones (a refused token, CSR or renewal, a wrong or replayed TOTP code, a missing admin
session, a role that does not allow the action) exit 4, the `Unavailable` ones exit 3, the rest
(bad input, a CA home in the wrong state) exit 1. The HTTP server maps them too:
`EnrolmentRefused` and `RenewalRefused` are 403, `EnrolmentError` 400, and the admin API maps the
`AdminError`s (401 authentication, 403 permission, 429 locked out).

Messages never contain a token, a key or a passphrase.
"""

from __future__ import annotations

from node.errors import CaError, EnrolmentError, EnrolmentRefused, RenewalRefused, TrustError

# What the CA raises from the shared family, for `from ca.errors import ...` in the CA's own modules.
__all__ = [
    "AdminError",
    "AdminExists",
    "AdminLocked",
    "AdminNotFound",
    "AuthenticationFailed",
    "CaError",
    "CaExists",
    "CaNotFound",
    "CertificateNotFound",
    "CsrSignatureInvalid",
    "EnrolmentError",
    "EnrolmentRefused",
    "InvalidRequest",
    "LastAdmin",
    "OtpReplayed",
    "PermissionDenied",
    "RenewalRefused",
    "SessionRequired",
    "TokenExpired",
    "TokenNameMismatch",
    "TokenUnknown",
    "TokenUsed",
]


# --- CA state ---------------------------------------------------------------------------------------


class CaExists(CaError):
    """`init` found a CA (or one of its files) in the home already: key files are never overwritten."""


class CaNotFound(CaError):
    """The home holds no CA (run `kmsnet ca init` first)."""


class InvalidRequest(CaError):
    """An argument is malformed: a node name, a token lifetime, a hostname."""


# --- enrolment ----------------------------------------------------------------------------------------


class TokenUnknown(EnrolmentRefused):
    """No enrolment token like this was ever issued."""


class TokenExpired(EnrolmentRefused):
    """The enrolment token is past its lifetime."""


class TokenUsed(EnrolmentRefused):
    """The enrolment token was consumed by an earlier enrolment (tokens are one-time)."""


class TokenNameMismatch(EnrolmentRefused):
    """The CSR asks for another node name than the one the token was made for."""


class CsrSignatureInvalid(EnrolmentRefused):
    """The CSR's self-signature does not verify: its requester does not hold the key it names."""


# --- administrators ---------------------------------------------------------------------------


class AdminError(CaError):
    """An administrator action was refused or is impossible (base of the classes below)."""


class AuthenticationFailed(AdminError, TrustError):
    """A login was refused: unknown administrator, or a TOTP code that is wrong or outside the window."""


class OtpReplayed(AuthenticationFailed):
    """The TOTP code (or an older one) was accepted before: each code opens one session only."""


class AdminLocked(AuthenticationFailed):
    """Too many wrong codes for this administrator lately; `retry_after` seconds until the next try."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SessionRequired(AdminError, TrustError):
    """No admin session (none opened, expired, ended, or its administrator changed): log in first."""


class PermissionDenied(AdminError, TrustError):
    """The session's role does not allow the action (see `ca.admin.PERMISSIONS`)."""


class AdminExists(AdminError):
    """An administrator with this name exists already."""


class AdminNotFound(AdminError):
    """No administrator with this name."""


class LastAdmin(AdminError):
    """Removing this administrator would leave no one with the admin role."""


# --- revocation -------------------------------------------------------------------


class CertificateNotFound(CaError):
    """No certificate (still valid and unrevoked, where that matters) matches the name or serial given."""
