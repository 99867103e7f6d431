"""The running CA: `CaService` (the HTTP API with its admin routes, and the CRL publisher),
`CrlPublisher` (the relay feed), and `serve`, which runs them until SIGINT or SIGTERM.

The CA publishes its CRL two ways: over HTTP (`GET /crl`) and to the relay's feed, which pushes
it to every node. For the feed it connects to the relay as an ordinary authenticated node named
"ca" (`ca.registry.CA_NODE_NAME`), the only name the relay accepts a PUBLISH_CRL from. The relay
only stores and forwards it: nodes verify it under the root they pin.

A revocation may happen in another process (`kmsnet ca revoke` opens ca.db while `serve` runs):
it issues and stores the new CRL itself, and the publisher, which reads the stored CRL every
CRL_CHECK_INTERVAL, sends it to the relay within that interval. It sends it again every interval
until the relay confirms it holds that number (the relay pushes its feed back to the CA node too):
a CRL the relay could not take (its store full, a connection lost) is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from ca.admin_api import AdminApi
from ca.authority import CertificateAuthority
from ca.http import DEFAULT_PORT, CaHttpServer
from node.clock import utcnow
from node.errors import RelayUnreachable
from node.link import RelayLink, check_url
from node.pkcs11 import Pin
from protocol.errors import ProtocolError
from protocol.link import CrlFeed, Error, LinkFrame, PublishCrl, Welcome
from protocol.revocation import verify_crl

__all__ = ["CRL_CHECK_INTERVAL", "CaService", "CrlPublisher", "serve"]

log = logging.getLogger("kmsnet.ca")

#: Seconds between checks for a re-issued CRL (and a renewed CA node certificate). A revocation
#: reaches the relay within this (plus a round trip), whichever process made it. A check is two
#: reads of ca.db and two certificate parses: well under a millisecond.
CRL_CHECK_INTERVAL = 1.0


class CrlPublisher:
    """Keeps the relay's CRL feed current.

    `run()` connects to the relay as node "ca" (reconnecting with the link's backoff), publishes
    `authority.current_crl()` on every connect, then checks every `check_interval` seconds and
    publishes again when the CRL was re-issued. When the CA node's certificate is renewed it
    reconnects with the new one.
    """

    def __init__(
        self, authority: CertificateAuthority, relay_url: str, *, check_interval: float = CRL_CHECK_INTERVAL
    ) -> None:
        self.authority = authority
        self.url = check_url(relay_url)
        self.check_interval = check_interval
        #: The CRL last sent on the current connection (None: nothing sent yet).
        self.published: bytes | None = None
        #: The highest CRL number the relay's feed showed us (0: none yet): what it confirmed holding.
        self.confirmed = 0
        self._link: RelayLink | None = None

    async def run(self) -> None:
        """Publish until cancelled."""
        while True:
            identity, certificate = self.authority.node_credentials()
            link = RelayLink(
                self.url,
                identity=identity,
                certificate=certificate,
                root_pem=self.authority.root_pem,
                on_frame=self._on_frame,
                on_connected=self._on_connected,
            )
            self._link = link
            task = asyncio.create_task(link.run(), name="ca-relay-link")
            try:
                while self.authority.node_credentials()[1] == certificate:
                    await asyncio.sleep(self.check_interval)
                    await self._publish()
                log.info("ca_relay_reconnect", extra={"fields": {"reason": "node certificate renewed"}})
            finally:
                await link.close()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                self.published = None

    async def _on_connected(self, welcome: Welcome) -> None:
        # A new connection (perhaps to a relay that restarted empty): publish whatever we published before.
        self.published = None
        await self._publish()

    async def _publish(self) -> None:
        link = self._link
        if link is None or not link.connected.is_set():
            return  # published on connect
        crl = self.authority.current_crl()
        if crl == self.published and self.confirmed >= self._number(crl):
            return
        try:
            await link.send(PublishCrl(crl))
        except RelayUnreachable:
            return  # the link reconnects and publishes then
        self.published = crl
        log.info("crl_sent_to_relay", extra={"fields": {"relay": self.url, "bytes": len(crl)}})

    async def _on_frame(self, frame: LinkFrame) -> None:
        if isinstance(frame, Error):
            # The relay refuses a CRL older than the one it holds (a CA restored from a backup) or one
            # that does not verify under the root it pins (a relay configured with another CA).
            log.warning("relay_error", extra={"fields": {"relay": self.url, "code": frame.code, "text": frame.text}})
        elif isinstance(frame, CrlFeed):
            log.debug("relay_feed", extra={"fields": {"relay": self.url, "bytes": len(frame.crl)}})
            self.confirmed = max(self.confirmed, self._number(frame.crl))

    def _number(self, crl: bytes) -> int:
        """The number of `crl` if it is ours and valid now (0 otherwise: it confirms nothing)."""
        try:
            return verify_crl(crl, self.authority.root, self.authority.clock()).number
        except ProtocolError:
            return 0
        # Nothing else is addressed to the CA node.


class CaService:
    """A running CA: the HTTP API (with the admin routes) and, given a relay URL, the CRL publisher.

    `async with CaService(authority, port=0, relay_url=...) as service:`; the caller keeps
    ownership of `authority` (and closes it).
    """

    def __init__(
        self,
        authority: CertificateAuthority,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        relay_url: str | None = None,
        crl_check_interval: float = CRL_CHECK_INTERVAL,
    ) -> None:
        self.authority = authority
        self.http = CaHttpServer(authority, host=host, port=port)
        AdminApi(authority).install(self.http)
        self.publisher = (
            CrlPublisher(authority, relay_url, check_interval=crl_check_interval) if relay_url is not None else None
        )
        self._publishing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen for HTTP and start publishing to the relay."""
        await self.http.start()
        if self.publisher is not None:
            self._publishing = asyncio.create_task(self.publisher.run(), name="ca-crl-publisher")

    async def close(self) -> None:
        """Stop publishing, then stop the HTTP server (in-flight requests finish first)."""
        if self._publishing is not None:
            self._publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publishing
            self._publishing = None
        await self.http.close()

    async def __aenter__(self) -> CaService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """The HTTP API's URL."""
        return self.http.url


async def serve(
    home: Path | str,
    passphrase: str,
    *,
    http: tuple[str, int] = ("127.0.0.1", DEFAULT_PORT),
    relay_url: str | None = None,
    clock: Callable[[], datetime] = utcnow,
    on_ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    pin: Pin | None = None,
) -> None:
    """Run the CA in `home` until SIGINT or SIGTERM (or until `stop` is set), then shut down cleanly.

    Serves the HTTP API on `http` (host, port; port 0 picks a free one) and, with `relay_url`,
    publishes the CRL to the relay as node "ca". `on_ready(url)` is called once the API listens.
    `pin` unlocks the PKCS#11 token of a CA whose root key is in one.
    Raises what `CertificateAuthority.open` raises, `LinkError` for a bad relay URL and `OSError`
    when the address cannot be bound.
    """
    if relay_url is not None:
        check_url(relay_url)  # a typo should fail now, not in a reconnect loop
    if stop is None:
        stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with CertificateAuthority.open(home, passphrase, clock=clock, pin=pin) as authority:
        async with CaService(authority, host=http[0], port=http[1], relay_url=relay_url) as service:
            signals = (signal.SIGINT, signal.SIGTERM)
            for signum in signals:
                loop.add_signal_handler(signum, stop.set)
            try:
                log.info("ca_serving", extra={"fields": {"url": service.url, "relay": relay_url or "-"}})
                if on_ready is not None:
                    on_ready(service.url)
                await stop.wait()
            finally:
                for signum in signals:
                    loop.remove_signal_handler(signum)
    log.info("ca_stopped", extra={"fields": {}})
