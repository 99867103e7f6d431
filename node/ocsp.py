"""Revocation by OCSP (RFC 6960) instead of the CRL feed.

`await checker.refresh(certificate)` asks the CA's responder about a peer's certificate (with a
fresh nonce, so an old answer cannot be replayed) and remembers the verified answer until its
nextUpdate (or `ttl` when it gives none). Only a certificate that verifies under the pinned root is
asked about — a forged INIT (the right issuer name, any key) costs no request — and after a failed
request not again for `MIN_INTERVAL`, so no peer can make the node hammer the responder (issue #13
part 4);
`checker.check(serial, now)` — the handshake's revocation check — then answers from
memory and fails closed when it knows nothing fresh. The network call runs in a thread so the
event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.error
import urllib.request
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.x509 import ocsp

from protocol import certs
from protocol.errors import NoRevocationData, OcspError, ProtocolError
from protocol.ocsp import OcspAnswer, build_ocsp_request, verify_ocsp_response

log = logging.getLogger("kmsnet.node.ocsp")

#: How long a verified answer is used before the responder is asked again.
DEFAULT_TTL = timedelta(minutes=5)
#: Seconds to wait for the responder.
TIMEOUT = 5.0
#: Largest answer read.
MAX_RESPONSE = 64 * 1024
#: After a failed request, the responder is asked about that certificate again at most this often.
MIN_INTERVAL = timedelta(seconds=30)
#: Rate-limit marks kept before the old ones are pruned.
MAX_MARKS = 4096


class OcspChecker:
    """Answers `check(serial, now)` from OCSP responses fetched with `refresh`."""

    def __init__(self, url: str, root: x509.Certificate, *, ttl: timedelta = DEFAULT_TTL) -> None:
        self.url = url
        self.root = root
        self.ttl = ttl
        self._answers: dict[int, tuple[OcspAnswer, datetime]] = {}
        #: When the responder last failed to answer about a serial: not asked again before
        #: MIN_INTERVAL, so a peer cannot make each of its frames wait for a dead responder.
        self._failed: dict[int, datetime] = {}
        #: Requests actually sent (for tests and the bench).
        self.requests = 0

    async def refresh(self, certificate: bytes, now: datetime) -> OcspAnswer:
        """Ask the responder about `certificate` (DER) and remember the verified answer.

        Raises OcspError (bad or unverifiable answer) or NoRevocationData (responder unreachable):
        either way the peer is not trusted until an answer verifies.
        """
        return await self._ask(certs.load_certificate(certificate), now)

    async def _ask(self, cert: x509.Certificate, now: datetime) -> OcspAnswer:
        # The certificate first: one that does not verify under the root is refused by the handshake
        # anyway, and must cost no request.
        certs.verify(cert, self.root, now)
        serial = cert.serial_number
        failed = self._failed.get(serial)
        if failed is not None and now - failed < MIN_INTERVAL:
            raise NoRevocationData(f"the responder failed on serial {serial:x} less than {MIN_INTERVAL} ago")
        nonce = os.urandom(16)
        request = build_ocsp_request(cert, self.root, nonce)
        self.requests += 1
        try:
            der = await asyncio.to_thread(self._post, request)
            answer = verify_ocsp_response(der, cert=cert, root=self.root, nonce=nonce, now=now)
        except ProtocolError:
            if len(self._failed) >= MAX_MARKS:  # marks older than MIN_INTERVAL hold nothing back
                self._failed = {s: t for s, t in self._failed.items() if now - t < MIN_INTERVAL}
            self._failed[serial] = now
            raise
        self._failed.pop(serial, None)
        self._answers[serial] = (answer, _next_update(der) or now + self.ttl)
        log.info("ocsp_answer", extra={"fields": {"serial": f"{serial:x}", "status": answer.status}})
        return answer

    def _post(self, request: bytes) -> bytes:
        http = urllib.request.Request(  # noqa: S310 - the CA's URL, given by the operator
            self.url, data=request, headers={"Content-Type": "application/ocsp-request"}, method="POST"
        )
        try:
            with urllib.request.urlopen(http, timeout=TIMEOUT) as response:  # noqa: S310
                data: bytes = response.read(MAX_RESPONSE + 1)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise NoRevocationData(f"OCSP responder {self.url} unreachable: {exc}") from exc
        if len(data) > MAX_RESPONSE:
            raise OcspError(f"OCSP answer over {MAX_RESPONSE} bytes")
        return data

    def check(self, serial: int, now: datetime) -> None:
        """Fail closed unless a fresh, verified answer says good."""
        known = self._answers.get(serial)
        if known is None or now > known[1]:
            raise NoRevocationData(f"no fresh OCSP answer for serial {serial:x}")
        known[0].require_good(serial)

    async def ensure(self, certificate: bytes, now: datetime) -> None:
        """Refresh unless a fresh answer is at hand; errors are left for `check` to report."""
        cert = certs.load_certificate(certificate)
        known = self._answers.get(cert.serial_number)
        if known is not None and now <= known[1]:
            return
        try:
            await self._ask(cert, now)
        except ProtocolError as exc:
            log.info("ocsp_failed", extra={"fields": {"serial": f"{cert.serial_number:x}", "reason": str(exc)}})


def _next_update(der: bytes) -> datetime | None:
    """The nextUpdate of a (verified) OCSP response, if it gives one."""
    try:
        return ocsp.load_der_ocsp_response(der).next_update_utc
    except ValueError:
        return None
