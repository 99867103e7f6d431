"""What the CA issues under: the lifetimes it chose at `init` (`CaPolicy`) and the root that signs (`Signer`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta

from cryptography import x509

from ca.errors import CaError, InvalidRequest
from ca.records import JsonRecord
from protocol.certs import CaKey

__all__ = ["CRL_RETENTION", "CaPolicy", "Signer"]

#: How long past its notAfter a certificate may still back a session somewhere. A node ends the
#: sessions made under a peer certificate at its notAfter + CLOCK_SKEW, by its own clock (PROTOCOL.md
#: §10.5); the rest of the margin covers a verifier whose clock runs slow. Until then `revoke NAME`
#: covers the certificate (expired or not) and the CRL lists it once revoked; never below CLOCK_SKEW.
CRL_RETENTION = timedelta(days=1)


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
        for lifetime in fields(self):
            value = getattr(self, lifetime.name)
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise InvalidRequest(f"{lifetime.name} must be a positive duration")


@dataclass(frozen=True)
class Signer:
    """The root certificate and key that sign everything the CA issues, and the policy it issues under."""

    root: x509.Certificate
    key: CaKey = field(repr=False)
    policy: CaPolicy

    def window(self, now: datetime, validity: timedelta) -> tuple[datetime, datetime]:
        """(notBefore, notAfter) of something valid `validity` from `now`, cut at the root's own end.

        Raises `CaError` once the root has expired: nothing the CA signs may outlive it.
        """
        root_end = self.root.not_valid_after_utc
        if now >= root_end:
            raise CaError(f"the CA root expired at {root_end.isoformat()}: it can issue nothing more")
        return now, min(now + validity, root_end)
