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

`OcspGate` keeps the lookups off the node's frame read loop: an INIT from a genuine peer whose
certificate has no fresh answer is held, with whatever that peer sends after it, while a task asks
the responder; every other peer's frames go on being handled meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.x509 import ocsp

from protocol import certs, wire
from protocol.errors import NoRevocationData, OcspError, ProtocolError
from protocol.handshake import decode_init
from protocol.link import Deliver
from protocol.messages import FrameType
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
#: A peer's INITs make the node ask about that peer name's certificates at most this often (a
#: renewed certificate is a new serial: without this, each serial a peer holds would cost a request).
PEER_INTERVAL = timedelta(seconds=10)
#: Rate-limit marks kept before the old ones are pruned.
MAX_MARKS = 4096
#: Frames held behind one peer's lookup; beyond, the newest are dropped unacknowledged (the relay
#: delivers them again).
MAX_HELD = 256
#: Peers whose frames may be held at once (each behind one lookup).
MAX_HELD_PEERS = 64


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

    def fresh(self, serial: int, now: datetime) -> bool:
        """Whether a verified answer about `serial` is at hand and not past its nextUpdate."""
        known = self._answers.get(serial)
        return known is not None and now <= known[1]

    def askable(self, cert: x509.Certificate, now: datetime) -> str | None:
        """The peer name of `cert` if `ensure` would send a request about it: it verifies under the
        root and no recent failure about it holds the request back; else None."""
        try:
            name = certs.verify(cert, self.root, now).name
        except ProtocolError:
            return None  # forged or expired: the handshake refuses it, and it costs no request
        failed = self._failed.get(cert.serial_number)
        return name if failed is None or now - failed >= MIN_INTERVAL else None

    async def ensure(self, certificate: bytes, now: datetime) -> None:
        """Refresh unless a fresh answer is at hand or a request is not allowed now (`askable`);
        errors are left for `check` to report."""
        cert = certs.load_certificate(certificate)
        if self.fresh(cert.serial_number, now) or self.askable(cert, now) is None:
            return
        try:
            await self._ask(cert, now)
        except ProtocolError as exc:
            log.info("ocsp_failed", extra={"fields": {"serial": f"{cert.serial_number:x}", "reason": str(exc)}})


class OcspGate:
    """Holds a peer's deliveries while the responder is asked about the certificate of its INIT, off
    the frame read loop (issue #13 part 4).

    `holds(deliver)` is called for each delivery, in the order they arrive. It is True when the gate
    took the frame: an INIT from a certificate that verifies but has no fresh answer (and may be asked
    about now) starts a lookup in a task, and that frame and every later one from the same sender wait
    for it, then go to `handle` in order. A forged certificate, a fresh answer, a recent failure
    (`OcspChecker.askable`) or a lookup about the same peer name less than PEER_INTERVAL ago let the
    frame through at once; the handshake's revocation check then decides, failing closed without an
    answer.
    """

    def __init__(
        self,
        checker: OcspChecker,
        handle: Callable[[Deliver], Awaitable[None]],
        clock: Callable[[], datetime],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self.checker = checker
        self._handle = handle
        self._clock = clock
        #: Where the lookup tasks are kept (the node's: it cancels them when it stops).
        self._tasks = tasks
        #: The frames held per sender, oldest first.
        self._held: dict[str, list[Deliver]] = {}
        #: When a lookup about each peer name was last started (PEER_INTERVAL).
        self._asked: dict[str, datetime] = {}
        #: Frames dropped unacknowledged because a queue was full (the relay delivers them again).
        self.dropped = 0

    def holds(self, deliver: Deliver) -> bool:
        """Whether the gate took `deliver` (to handle it after a lookup, or to drop it for now)."""
        queue = self._held.get(deliver.sender)
        if queue is not None:
            if len(queue) < MAX_HELD:
                queue.append(deliver)
            else:
                self.dropped += 1
            return True
        cert = self._certificate_to_ask(deliver.payload)
        if cert is None:
            return False
        if len(self._held) >= MAX_HELD_PEERS:
            self.dropped += 1  # not refused for want of an answer: delivered again, asked about then
            return True
        self._held[deliver.sender] = [deliver]
        task = asyncio.create_task(self._release(deliver.sender, cert), name=f"node-ocsp-{deliver.sender}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _certificate_to_ask(self, payload: bytes) -> bytes | None:
        """The certificate of an INIT the responder is to be asked about first, else None."""
        try:
            if wire.frame_type(payload) is not FrameType.INIT:
                return None
            certificate = decode_init(payload).certificate
            cert = certs.load_certificate(certificate)
        except ProtocolError:
            return None  # not an INIT we can read: the handshake refuses it
        now = self._clock()
        if self.checker.fresh(cert.serial_number, now):
            return None
        name = self.checker.askable(cert, now)
        asked = self._asked.get(name) if name is not None else None
        if name is None or (asked is not None and now - asked < PEER_INTERVAL):
            return None
        if len(self._asked) >= MAX_MARKS:  # marks older than PEER_INTERVAL hold nothing back
            self._asked = {n: t for n, t in self._asked.items() if now - t < PEER_INTERVAL}
        self._asked[name] = now
        return certificate

    async def _release(self, sender: str, certificate: bytes) -> None:
        """Ask, then hand the sender's held frames on in order (those arriving meanwhile too)."""
        try:
            await self.checker.ensure(certificate, self._clock())
            queue = self._held[sender]
            while queue:
                deliver = queue.pop(0)
                try:
                    await self._handle(deliver)
                except Exception:  # a bug of ours: logged; unacknowledged, so the relay delivers it again
                    log.exception("held_frame_failed", extra={"fields": {"peer": sender}})
        finally:
            del self._held[sender]


def _next_update(der: bytes) -> datetime | None:
    """The nextUpdate of a (verified) OCSP response, if it gives one."""
    try:
        return ocsp.load_der_ocsp_response(der).next_update_utc
    except ValueError:
        return None
