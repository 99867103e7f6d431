"""The node's connection to its relay: authenticate, exchange link frames, reconnect.

`RelayLink.run()` keeps a connection up until `close()`: connect, answer the relay's
challenge with our certificate and a signature, then hand every frame to `on_frame`. When the
connection drops it reconnects with exponential backoff and full jitter, so a relay restart
is not met by a thundering herd; given several relays (a cluster sharing one store), it
reconnects to the next one in the list, where its mailbox is waiting too. Frames to the relay
are queued and written by one writer task, which sends whatever is queued when it runs as
one BATCH: a busy node pays one WebSocket message for many frames. Frames still queued when
a connection drops are lost with it, like frames in flight: the outbox resends SENDs, and an
unacknowledged DELIVER comes again. A `wss://` URL is verified against the pinned CA root
and never downgraded to `ws://`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from node.errors import LinkError, NodeRevoked, RelayImpostor, RelayRefused, RelayUnreachable, network_words
from protocol import wire
from protocol.errors import DecodeError
from protocol.identity import IdentityKey
from protocol.link import (
    MAX_LINK_FRAME,
    Auth,
    Batch,
    BundleReply,
    Challenge,
    CrlFeed,
    Error,
    ErrorCode,
    FetchBundle,
    LinkFrame,
    Welcome,
    auth_signed_bytes,
    relay_name_of,
)

log = logging.getLogger("kmsnet.node.link")

T = TypeVar("T")

#: Seconds to wait for each step of connecting and authenticating.
CONNECT_TIMEOUT = 10.0
#: Backoff between reconnection attempts: first delay and cap (seconds).
BACKOFF_START = 0.1
BACKOFF_MAX = 10.0
#: Seconds to wait for a FETCH_BUNDLE answer.
REQUEST_TIMEOUT = 10.0
#: Frames queued for the writer beyond which `send` waits for it (a relay that does not read
#: must not make us buffer without bound).
MAX_QUEUED = 1024


#: How a connection normally fails; anything else is a bug, logged with its traceback (and survived).
_EXPECTED = (LinkError, OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed)


def check_url(url: str) -> str:
    """Refuse anything but ws:// and wss:// URLs with a host (a clear error, not a traceback later)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise LinkError(f"not a relay URL (ws://HOST:PORT or wss://HOST:PORT): {url!r}")
    try:
        _ = parts.port
    except ValueError as exc:
        raise LinkError(f"bad port in relay URL {url!r}") from exc
    return url


def split_urls(text: str) -> list[str]:
    """The relay URLs of a node, as stored (one per line) or given (separated by spaces or commas),
    unchecked (`RelayLink` refuses a bad one when it starts)."""
    return text.replace(",", " ").split()


def parse_urls(text: str) -> list[str]:
    """`split_urls`, each checked (LinkError for a bad one, or for none)."""
    urls = [check_url(url) for url in split_urls(text)]
    if not urls:
        raise LinkError("no relay URL")
    return urls


def tls_context(root_pem: bytes) -> ssl.SSLContext:
    """A client TLS context trusting only the pinned kmsnet CA root."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=root_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


class RelayLink:
    """One node's link to its relay: one connection at a time, to one of `urls` (the next one
    in the list after a failure)."""

    def __init__(
        self,
        urls: str | list[str],
        *,
        identity: IdentityKey,
        certificate: bytes,
        root_pem: bytes,
        on_frame: Callable[[LinkFrame], Awaitable[None]],
        on_connected: Callable[[Welcome], Awaitable[None]],
        reconnect: bool = True,
        check_relay_name: bool = True,
        epoch: Callable[[], bytes | None] | None = None,
    ) -> None:
        self.urls = [check_url(url) for url in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls:
            raise LinkError("no relay URL")
        self._current = 0
        self._identity = identity
        self._certificate = certificate
        self._tls = tls_context(root_pem) if any(url.startswith("wss://") for url in self.urls) else None
        self._on_frame = on_frame
        self._on_connected = on_connected
        self._reconnect = reconnect
        #: INSECURE when False (the relay-forwarding scenario's "before"): sign whichever relay name a
        #: CHALLENGE gives, so that a relay we dialled can pass an honest relay's CHALLENGE on.
        self._check_relay_name = check_relay_name
        #: Gives the signed rollback epoch for each AUTH (node/epochecho.py); the relay echoes it next time.
        self._epoch = epoch
        #: The one sent on the current connection (WELCOME's echo is compared with it).
        self.sent_epoch: bytes | None = None
        self._ws: ClientConnection | None = None
        self._closing = False
        self.connected = asyncio.Event()
        self._requests: dict[int, asyncio.Future[BundleReply]] = {}
        self._queued: list[bytes] = []
        self._wake_writer = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._ids = itertools.count(1)
        self.welcome: Welcome | None = None
        #: The last reason a connection attempt failed (for `status`).
        self.last_error: str | None = None

    @property
    def url(self) -> str:
        """The relay this link connects to now (or tries to)."""
        return self.urls[self._current]

    async def run(self, *, first_attempt: asyncio.Future[None] | None = None) -> None:
        """Keep the link up until `close()`. `first_attempt` learns how the first connection went
        (a failure once every relay was tried)."""
        delay = BACKOFF_START
        failures = 0
        while not self._closing:
            try:
                await self._session(first_attempt)
                delay = BACKOFF_START
                failures = 0
            except Exception as exc:  # whatever broke this connection, the link must come back
                if not isinstance(exc, _EXPECTED):
                    log.exception("relay_link_error", extra={"fields": {"url": self.url}})
                reason = _describe(exc)
                if reason != self.last_error:  # one line while it keeps failing alike, not one per retry
                    log.info("relay_link_down", extra={"fields": {"url": self.url, "reason": reason}})
                self.last_error = reason
                failures += 1
                if isinstance(exc, NodeRevoked):
                    # Revoked: no relay will take us again, and retrying would only hammer them.
                    self._closing = True
                    if first_attempt is not None and not first_attempt.done():
                        first_attempt.set_exception(exc)
                if first_attempt is not None and not first_attempt.done() and failures >= len(self.urls):
                    hint = f"is `kmsnet relay` running on {urlsplit(self.url).netloc}?"
                    unreachable = f"cannot reach the relay at {self.url} ({reason}): {hint}"
                    error = exc if isinstance(exc, LinkError) else RelayUnreachable(unreachable)
                    first_attempt.set_exception(error)
            finally:
                self._ws = None
                self.connected.clear()
                self._queued.clear()
                self._room.set()
                for fut in self._requests.values():
                    if not fut.done():
                        fut.set_exception(RelayUnreachable("connection to the relay lost"))
                self._requests.clear()
            if self._closing or not self._reconnect:
                return
            # The next relay of the list: when this one died, its nodes spread over the others (the
            # jitter spreads them in time too), and the mailbox waits in the store they share.
            self._current = (self._current + 1) % len(self.urls)
            await asyncio.sleep(random.uniform(0, delay))  # full jitter
            if failures >= len(self.urls) or len(self.urls) == 1:
                delay = min(BACKOFF_MAX, delay * 2)

    async def _session(self, first_attempt: asyncio.Future[None] | None) -> None:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            ws = await connect(
                self.url,
                ssl=self._tls if self.url.startswith("wss://") else None,
                compression=None,
                max_size=2 * MAX_LINK_FRAME,
                open_timeout=CONNECT_TIMEOUT,
                ping_interval=20,
                ping_timeout=20,
            )
        async with ws:
            welcome = await self._authenticate(ws)
            writer = asyncio.create_task(self._write(ws), name="relay-link-writer")
            try:
                self._ws = ws
                self.welcome = welcome
                self.last_error = None
                self.connected.set()
                await self._on_connected(welcome)
                if first_attempt is not None and not first_attempt.done():
                    first_attempt.set_result(None)
                async for raw in ws:
                    for frame in _decode(raw):
                        if isinstance(frame, BundleReply):
                            fut = self._requests.pop(frame.request, None)
                            if fut is not None and not fut.done():
                                fut.set_result(frame)
                            continue
                        await self._on_frame(frame)
                        if isinstance(frame, Error):
                            _raise_if_revoked(frame)  # the relay cuts a node a new CRL revokes
            finally:
                writer.cancel()
                # The writer ends with the connection (ConnectionClosed): that is this loop's to report.
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await writer

    async def _write(self, ws: ClientConnection) -> None:
        """Send whatever is queued, as few WebSocket messages as the BATCH limits allow."""
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            await self._flush(ws)

    async def _flush(self, ws: ClientConnection) -> None:
        frames, self._queued = self._queued, []
        self._room.set()
        for message in wire.pack_link_frames(frames):
            await ws.send(message)

    async def _authenticate(self, ws: ClientConnection) -> Welcome:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            challenge = _decode_one(await ws.recv())
            if not isinstance(challenge, Challenge):
                raise LinkError("relay did not start with a challenge")
            signature = self._identity.sign(self._answer(challenge))
            self.sent_epoch = self._epoch() if self._epoch is not None else None
            await ws.send(wire.encode_link(Auth(self._certificate, signature, self.sent_epoch)))
            answer = _decode_one(await ws.recv())
            if isinstance(answer, CrlFeed):
                # A relay refusing a revoked node first sends the CRL that revokes it: the node
                # verifies it itself, and so knows why (and for sure), not on the relay's word.
                await self._on_frame(answer)
                answer = _decode_one(await ws.recv())
        if isinstance(answer, Error):
            _raise_if_revoked(answer)
            raise RelayRefused(f"relay refused us: {answer.text}")
        if not isinstance(answer, Welcome):
            raise LinkError("relay answered AUTH with something else than WELCOME")
        return answer

    def _answer(self, challenge: Challenge) -> bytes:
        """What we sign for `challenge`: only a CHALLENGE from the relay we dialled (for wss://, the
        one whose certificate TLS verified for that host), bound to its name and our URL. A CHALLENGE
        naming another relay is one passed on by whoever we reached: signing it would let them log
        in there as us."""
        expected = relay_name_of(self.url)
        if challenge.relay != expected:
            if self._check_relay_name:
                raise RelayImpostor(
                    f"the relay at {self.url} answered as {challenge.relay!r}, not as {expected!r}: "
                    "refused (another relay may be passing its challenge on; if it was renamed, dial it by its name)"
                )
            return auth_signed_bytes(
                challenge.nonce, challenge.relay, f"{urlsplit(self.url).scheme}://{challenge.relay}"
            )
        return auth_signed_bytes(challenge.nonce, expected, self.url)

    def send_nowait(self, frame: LinkFrame) -> None:
        """Queue one frame for the writer; RelayUnreachable if the link is down."""
        if self._ws is None:
            raise RelayUnreachable("not connected to the relay")
        self._queued.append(wire.encode_link(frame))
        self._wake_writer.set()
        if len(self._queued) >= MAX_QUEUED:
            self._room.clear()

    async def send(self, frame: LinkFrame) -> None:
        """Queue one frame, waiting first while the queue is full; RelayUnreachable if the link is down."""
        await self._room.wait()
        self.send_nowait(frame)

    async def fetch_bundle(self, name: str) -> BundleReply:
        """Ask the relay for `name`'s prekey bundle."""
        request = next(self._ids)
        fut: asyncio.Future[BundleReply] = asyncio.get_running_loop().create_future()
        self._requests[request] = fut
        try:
            await self.send(FetchBundle(request, name))
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await fut
        except TimeoutError as exc:
            raise RelayUnreachable(f"relay did not answer a bundle request for {name!r}") from exc
        finally:
            self._requests.pop(request, None)

    async def switch_identity(self, identity: IdentityKey, certificate: bytes) -> None:
        """Authenticate with a new key or certificate from now on: drop the current connection, so
        that the link comes back with them (the relay ties a connection to the certificate it saw)."""
        self._identity = identity
        self._certificate = certificate
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.close(1000, "new certificate")

    async def close(self) -> None:
        """Stop reconnecting and close the connection (after sending what is queued)."""
        self._closing = True
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._flush(self._ws)
                await self._ws.close()


def _raise_if_revoked(error: Error) -> None:
    if error.code == ErrorCode.REVOKED:
        raise NodeRevoked(f"the relay refuses this node: its certificate is {error.text}")


def _parse(raw: object, decoder: Callable[[bytes], T]) -> T:
    # A malicious relay may send garbage: we refuse it and hang up (LinkError), never crash.
    if not isinstance(raw, bytes):
        raise LinkError("relay sent a text frame")
    try:
        return decoder(raw)
    except DecodeError as exc:
        raise LinkError(f"relay sent a malformed frame: {exc}") from exc


def _decode(raw: object) -> list[LinkFrame]:
    return _parse(raw, wire.decode_link_frames)


def _decode_one(raw: object) -> LinkFrame:
    """A frame of the authentication, which always stands alone (never in a BATCH)."""
    frame = _parse(raw, wire.decode_link)
    if isinstance(frame, Batch):
        raise LinkError("relay sent a BATCH during authentication")
    return frame


def _describe(exc: BaseException) -> str:
    """Why a connection failed, in words for people (never a class name or an errno)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return "the TLS handshake failed (is it a wss:// relay, with a certificate from this CA?)"
    if isinstance(exc, ConnectionClosed):
        return "the relay closed the connection"
    if isinstance(exc, InvalidHandshake):
        return "it did not answer as a WebSocket relay does (is it a kmsnet relay, and ws:// or wss:// as it should?)"
    return network_words(exc)
