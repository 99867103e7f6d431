"""The node's own way to the CA's CRL (issue #13 part 2).

The relay's feed is the usual CRL channel, and the relay may withhold a new CRL (it is untrusted).
So when the newest CRL a node holds was issued more than `max_age` ago (20 minutes by default,
`NodeOptions.crl_max_age`), the node fetches `GET {ca_url}/crl` from the CA itself, at most once
per check (the maintenance tick, a minute), and verifies it exactly as one from the feed. A relay
that withholds a CRL therefore delays a revocation by at most `max_age` plus one check (PROTOCOL.md
§12.1); a node that reaches neither still fails closed at the CRL's nextUpdate.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from datetime import datetime, timedelta

from node.errors import Unavailable
from protocol.crl import VerifiedCrl
from protocol.link import MAX_CRL

log = logging.getLogger("kmsnet.node.crlfetch")

#: A CRL issued longer ago than this is fetched again from the CA directly.
DEFAULT_MAX_AGE = timedelta(minutes=20)
#: Seconds to wait for the CA.
TIMEOUT = 10.0


class CrlFetchFailed(Unavailable):
    """The CA's /crl could not be fetched (the node keeps what it holds, and fails closed at nextUpdate)."""


def due(held: VerifiedCrl | None, now: datetime, max_age: timedelta) -> bool:
    """Whether the CRL held (None: none) is old enough to ask the CA for a newer one."""
    return held is None or now - held.this_update >= max_age


async def fetch(ca_url: str) -> bytes:
    """The CA's current CRL (DER, unverified: the caller verifies it); CrlFetchFailed if unreachable."""
    return await asyncio.to_thread(_get, ca_url.rstrip("/") + "/crl")


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:  # noqa: S310 - the CA's URL, from enrolment
            data: bytes = response.read(MAX_CRL + 1)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise CrlFetchFailed(f"cannot fetch the CRL from {url}: {getattr(exc, 'reason', exc)}") from exc
    if len(data) > MAX_CRL:
        raise CrlFetchFailed(f"the CRL at {url} is over {MAX_CRL} bytes")
    return data
