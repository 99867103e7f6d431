"""Errors of the CA role (`node.ca`) and of the enrolment client (`node.enrol`).

All are `node.errors.NodeError`s, so the command line maps them like every other node error:
the `TrustError` ones (a refused token or CSR, a root whose fingerprint differs, a certificate
that does not verify) exit 4, the `Unavailable` ones (the CA cannot be reached or is busy) exit 3,
the rest (bad input, a CA home in the wrong state) exit 1. The HTTP server maps them too:
`EnrolmentRefused` is 403, `EnrolmentError` 400.

Messages never contain a token, a key or a passphrase.
"""

from __future__ import annotations

from node.errors import NodeError, TrustError, Unavailable


class CaError(NodeError):
    """Base of every error the CA role and the enrolment client raise on purpose."""


# --- CA state ---------------------------------------------------------------------------------------


class CaExists(CaError):
    """`init` found a CA (or one of its files) in the home already: key files are never overwritten."""


class CaNotFound(CaError):
    """The home holds no CA (run `kmsnet ca init` first)."""


class InvalidRequest(CaError):
    """An argument is malformed: a node name, a token lifetime, a hostname."""


# --- enrolment (CA side) ------------------------------------------------------------------------------


class EnrolmentError(CaError):
    """An enrolment request is malformed: a CSR that does not parse, an unsupported key type, a bad name."""


class EnrolmentRefused(EnrolmentError, TrustError):
    """An enrolment was refused as untrusted; the subclasses say why. A refused CSR never consumes the token."""


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


# --- enrolment (client side) --------------------------------------------------------------------------


class CaUnreachable(CaError, Unavailable):
    """The CA cannot be reached (refused, timed out, bad address) or is temporarily refusing us (429, 5xx)."""


class CaProtocolError(CaError):
    """The CA answered something that is not what the enrolment protocol says."""


class FingerprintMismatch(CaError, TrustError):
    """The CA root's SHA-256 fingerprint is not the one the user said to expect."""


class CertificateRefused(CaError, TrustError):
    """The certificate or root the CA returned does not verify, or is not for our name or key."""


class AlreadyEnrolled(CaError):
    """The node home holds a keystore already: enrolment never overwrites one."""
