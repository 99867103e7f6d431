"""What vouches for our peers and ends sessions with revoked ones: the CRL feed (and OCSP answers
when configured), fetching the CA's CRL when the feed goes quiet, and our own revocation.

Which sessions a CRL ends is the peer engine's decision (`Peer.revoked_by`, PROTOCOL.md §10.5);
this module only feeds it CRLs and has the node close what it names.

Records: `node/revocation` (the verified CRL state, protocol/revocation.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from cryptography import x509

from node import crlfetch
from node.errors import code_of
from node.events import SecurityEvent
from node.home import NS_NODE
from node.journal import Journal, log_failure
from node.keystore import Keystore
from node.ocsp import OcspChecker
from node.options import NodeOptions
from node.selfrevoked import Revoked, own_revocation
from node.sessions import Sessions
from protocol import handshake
from protocol.errors import ProtocolError, RevocationError
from protocol.peer import event_name
from protocol.revocation import RevocationState

log = logging.getLogger("kmsnet.node")


class Revocations:
    """The node's revocation state and what it does with each new CRL or OCSP answer.

    `emit` records a security event for the user; `close(peer, reason)` ends every session with
    a revoked peer (the node commits what the engine returns).
    """

    def __init__(
        self,
        keystore: Keystore,
        journal: Journal,
        sessions: Sessions,
        options: NodeOptions,
        root: x509.Certificate,
        clock: Callable[[], datetime],
        *,
        node: str,
        emit: Callable[[SecurityEvent], asyncio.Future[None]],
        close: Callable[[str, str], None],
    ) -> None:
        self._keystore = keystore
        self._journal = journal
        self._sessions = sessions
        self._options = options
        self._root = root
        self._clock = clock
        self._node = node
        self._emit = emit
        self._close = close
        held = keystore.get(NS_NODE, "revocation")
        #: The CRLs verified so far (the feed, or the CA's /crl fetched directly).
        self.state = RevocationState.from_bytes(held, root, clock()) if held else RevocationState()
        #: OCSP answers, when the node is configured to ask a responder instead of trusting the feed alone.
        self.ocsp = OcspChecker(options.ocsp_url, root) if options.ocsp_url else None

    @property
    def check(self) -> handshake.RevocationCheck:
        """What vouches for peers at handshake time: OCSP answers if so configured, else the CRL feed."""
        return self.ocsp if self.ocsp is not None else self.state

    def own(self, certificate: bytes) -> Revoked | None:
        """Whether our `certificate` is revoked, by the newest CRL we verified (issue #13)."""
        return own_revocation(self.state.current, x509.load_der_x509_certificate(certificate).serial_number)

    async def refresh(self, certificate: bytes) -> bool:
        """Fetch the CA's /crl directly if the newest CRL held is older than `options.crl_max_age`
        (a relay may withhold the feed: issue #13); True if a newer CRL was accepted."""
        ca_url = self._keystore.get(NS_NODE, "ca_url")
        if ca_url is None or not crlfetch.due(self.state.current, self._clock(), self._options.crl_max_age):
            return False
        before = self.state.highest_number
        try:
            self.on_crl(await crlfetch.fetch(ca_url.decode()), certificate)
        except crlfetch.CrlFetchFailed as exc:
            log.info("crl_fetch_failed", extra={"fields": {"node": self._node, "reason": str(exc)}})
            return False
        return self.state.highest_number != before

    def on_crl(self, der: bytes, certificate: bytes) -> None:
        """A CRL from the feed or the CA: verify it, keep it, tell the user if it revokes us (`certificate`),
        and close the sessions the peer engines say it ends (each told once, on the CRL that did)."""
        previous = self.state.current
        try:
            before = self.state.highest_number
            crl = self.state.accept(der, self._root, self._clock())
        except RevocationError as exc:
            self._emit(SecurityEvent(event_name(exc), None, f"CRL refused: {exc}", code_of(exc)))
            return
        except ProtocolError as exc:
            self._emit(SecurityEvent("crl_refused", None, f"CRL refused: {exc}", code_of(exc)))
            return
        if crl.number == before:
            return
        self._journal.commit({(NS_NODE, "revocation"): self.state.to_bytes()}).add_done_callback(log_failure)
        log.info("crl_accepted", extra={"fields": {"node": self._node, "number": crl.number}})
        own = self.own(certificate)
        if own is not None and (previous is None or own.serial not in previous.revoked):
            self._emit(SecurityEvent("revoked", None, f"this node's certificate is {own.words()}", "node_revoked"))
        listed = previous.revoked if previous is not None else ()
        for name in self._sessions.peer_names():
            serial = self._sessions.get(name).revoked_by(crl.revoked, listed)
            if serial is not None:
                reason = crl.entries[serial].reason if serial in crl.entries else "revoked"
                self._close(name, f"certificate {serial:x} revoked ({reason})")

    async def recheck_by_ocsp(self) -> None:
        """In OCSP mode the feed may never tell: ask again about every peer with an open session."""
        if self.ocsp is None:
            return
        for name, engine in list(self._sessions.engines.items()):
            record = engine.record
            if engine.current is None or record is None:
                continue
            try:
                answer = await self.ocsp.refresh(record.certificate, self._clock())
            except ProtocolError as exc:
                log.info("ocsp_recheck_failed", extra={"fields": {"peer": name, "reason": str(exc)}})
                continue
            if answer.status == "revoked":
                self._close(name, f"certificate {record.serial:x} revoked ({answer.reason or 'revoked'})")
