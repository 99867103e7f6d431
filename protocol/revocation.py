"""Revocation for kmsnet, by its public names: CRLs (`protocol.crl`) and OCSP (`protocol.ocsp`).

Both are signed by the CA root itself. The two rooms are `protocol/crl.py` (issue, verify, the
node's `RevocationState`) and `protocol/ocsp.py` (request, responder, verification); this module
names what either offers, for callers that speak of revocation as one thing (the CA, the node,
the relay's feed). New code may import from the room it uses.
"""

from __future__ import annotations

from protocol.crl import REASONS, Freshness, RevocationState, RevokedEntry, VerifiedCrl, issue_crl, verify_crl
from protocol.ocsp import OcspAnswer, OcspStatus, build_ocsp_request, build_ocsp_response, verify_ocsp_response

__all__ = [
    "REASONS",
    "Freshness",
    "OcspAnswer",
    "OcspStatus",
    "RevocationState",
    "RevokedEntry",
    "VerifiedCrl",
    "build_ocsp_request",
    "build_ocsp_response",
    "issue_crl",
    "verify_crl",
    "verify_ocsp_response",
]
