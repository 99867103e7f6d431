"""Whether this node's own certificate is revoked, as the CRLs it verified say (issue #13 part 3).

A revoked node must be told, in words a person reads: "revoked (CRL #n, reason, time)". The node
learns it from a CRL it verified itself (the feed, the relay's refusal, which carries the CRL,
or the CA's `/crl`), never from the relay's word alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from protocol.crl import VerifiedCrl


@dataclass(frozen=True)
class Revoked:
    """This node's certificate is listed in CRL `crl_number`."""

    serial: int
    crl_number: int
    reason: str
    revoked_at: datetime

    def words(self) -> str:
        """One line for a person: "revoked (CRL #3, key-compromise, 2026-12-01 18:05 UTC)"."""
        return f"revoked (CRL #{self.crl_number}, {self.reason}, {self.revoked_at:%Y-%m-%d %H:%M} UTC)"

    def to_json(self) -> dict[str, Any]:
        """What `status --json` carries."""
        return {
            "serial": format(self.serial, "x"),
            "crl_number": self.crl_number,
            "reason": self.reason,
            "revoked_at": self.revoked_at.isoformat(),
            "text": self.words(),
        }


def own_revocation(crl: VerifiedCrl | None, serial: int) -> Revoked | None:
    """`Revoked` if the verified `crl` lists `serial`, else None."""
    if crl is None or serial not in crl.revoked:
        return None
    entry = crl.entries.get(serial)
    if entry is None:
        return Revoked(serial, crl.number, "unspecified", crl.this_update)
    return Revoked(serial, crl.number, entry.reason, entry.revoked_at)
