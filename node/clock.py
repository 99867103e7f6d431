"""Time for the node and the CA: the wall clock, and when a validity window is due for renewal.

`utcnow` is the default of every injectable `clock` (tests and the lab pass their own); nothing
else in node/ or ca/ should read wall time for a decision.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["RENEW_FRACTION", "renewal_due", "renewal_time", "utcnow"]

#: Certificates and CRLs are renewed once this fraction of their lifetime has passed (a node's own
#: certificate, the CA node's, the CRL the CA publishes).
RENEW_FRACTION = 2 / 3


def utcnow() -> datetime:
    """The current time in UTC (timezone-aware)."""
    return datetime.now(UTC)


def renewal_time(not_before: datetime, not_after: datetime) -> datetime:
    """When to renew something valid from `not_before` to `not_after`: at RENEW_FRACTION of it."""
    return not_before + (not_after - not_before) * RENEW_FRACTION


def renewal_due(not_before: datetime, not_after: datetime, now: datetime) -> bool:
    """True once `renewal_time` has come, or while `now` is before `not_before` (a clock set back
    gets a fresh one rather than one its verifiers would see as from the future)."""
    return not not_before <= now < renewal_time(not_before, not_after)
