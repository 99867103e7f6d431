"""The relay: an asyncio WebSocket server that authenticates nodes and routes opaque envelopes.

Per connection: CHALLENGE → AUTH (certificate under the pinned CA root + a signature over the
challenge) → WELCOME, the CRL feed, then stored envelopes; afterwards frames from the node
are dispatched one at a time. Everything else the relay says to a node (its mail, the answers
to its frames, the CRL feed) is queued for it and written by one writer task per node, so a
slow node never stalls anyone else. A malformed, oversized or unknown frame gets an ERROR
frame and a close; everyone else is served on. A DELIVER the node has not acknowledged within
`resend_after` seconds while it acknowledges later ones (or none at all), or at once when it has
acknowledged RESEND_GAP sent after it, is sent again on the same connection (the node handles
deliveries in order, so a gap is a loss; the node recognises a duplicate by its msg_id).

The relay is untrusted by design: it sees names, sizes and timing, never a key or a plaintext.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from cryptography import x509
from prometheus_client import generate_latest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from protocol import certs, wire
from protocol.errors import DecodeError, ProtocolError
from protocol.identity import verify_signature
from protocol.link import (
    CHALLENGE_LEN,
    MAX_LINK_FRAME,
    Ack,
    Auth,
    BundleReply,
    Challenge,
    CrlFeed,
    Deliver,
    Error,
    ErrorCode,
    FetchBundle,
    LinkFrame,
    PublishBundle,
    PublishCrl,
    Send,
    Welcome,
    auth_signed_bytes,
    relay_name_of,
)
from protocol.revocation import RevocationState
from relay.backends import make_store
from relay.cluster import Bus, make_bus
from relay.errors import LinkRefused, QuotaExceeded, StoreUnavailable, StoreWriteRefused
from relay.interceptor import Interceptor
from relay.metrics import Metrics
from relay.ratelimit import TokenBucket

# MAX_QUEUED: frames queued for one node (with its writes awaiting a commit) beyond which the
# relay holds back: its own requests wait to be read, and its mail waits in the store.
from relay.router import CLOSE_POLICY, MAX_QUEUED, RESEND_AFTER, Link, Router
from relay.store import Envelope, Limits, Store

log = logging.getLogger("kmsnet.relay")

#: Envelopes pushed to a node per store read.
DELIVERY_BATCH = 256
#: Close code (RFC 6455): try again later (the store is unreachable).
CLOSE_TRY_AGAIN = 1013
#: Seconds between purges of expired envelopes.
PURGE_INTERVAL = 60.0
#: Seconds a closing connection's writer is given to send what is queued.
STOP_GRACE = 5.0
#: Seconds between heartbeats: the store is asked whether it answers (/healthz), and the relay
#: announces itself to the cluster.
HEARTBEAT_INTERVAL = 5.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RelayConfig:
    """Everything a relay needs to run (built by the command line or a test)."""

    ca_root: x509.Certificate
    host: str = "127.0.0.1"
    port: int = 8765
    #: A SQLite file (':memory:' keeps nothing) or a Redis URL, redis://HOST:PORT/DB or rediss://…
    store_path: str = ":memory:"
    #: The relay's name, `host:port` as nodes dial it (PROTOCOL.md §16.3); None: `public_host` (or
    #: `host`) and the port bound. Each relay of a cluster has its own.
    name: str | None = None
    #: The host nodes reach this relay at, when it is not `host` (a wildcard address, or the DNS or
    #: IP name of the TLS certificate).
    public_host: str | None = None
    tls: ssl.SSLContext | None = None
    rate: float = 1000.0
    burst: float = 2000.0
    #: The budget of ACKs and feed frames (PUBLISH_CRL), apart from `rate`: a node draining its
    #: mailbox acknowledges as fast as it is delivered to, and must never be cut off for it.
    ack_rate: float = 10_000.0
    ack_burst: float = 20_000.0
    #: Seconds a DELIVER waits for its ACK before it is sent again on the live connection (a DELIVER
    #: lost on the way must not wait for the next connection: by then the receiver's ratchet may
    #: have moved too far past it).
    resend_after: float = RESEND_AFTER
    auth_timeout: float = 10.0
    limits: Limits = field(default_factory=Limits)
    #: The node name allowed to publish CRLs (the CA node).
    crl_publisher: str = "ca"
    ping_interval: float | None = 20.0
    clock: Callable[[], datetime] = _utcnow


def check_name(name: str) -> str:
    """`name` if it is a relay name, `host:port` in the form nodes compare (host in lower case,
    IPv6 in brackets); ValueError otherwise."""
    try:
        canonical = relay_name_of(f"ws://{name}")
    except ValueError:
        canonical = ""
    if canonical != name or not name.rsplit(":", 1)[-1].isdigit():
        raise ValueError(f"a relay name is HOST:PORT as nodes dial it (host in lower case), not {name!r}")
    return name


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class _AuthRefused(Exception):
    """The node did not prove who it is."""


class _Revoked(Exception):
    """The node proved who it is, and the CRL revokes it."""


class _Stopping(Exception):
    """close() was called: raised in the relay's TaskGroup, it cancels the tasks still running."""


@dataclass(eq=False, kw_only=True)
class _Peer(Link):
    """An authenticated connection: what the router knows of it, and its socket and tasks."""

    ws: ServerConnection
    #: Set when there is something for the writer: a queued item, a CRL due, a failure.
    woken: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when the writer sent a batch or a commit settled: the reader may go on.
    room: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.Task[None] | None = None
    #: Its connection number in the cluster (0 until claimed): a higher one anywhere replaces it.
    generation: int = 0
    #: Store writes awaiting their commit (the envelopes of a SEND, the delete of an ACK).
    commits: set[asyncio.Future[Any]] = field(default_factory=set)
    #: The connection is going away: the writer sends what is queued, then stops (or it stopped).
    closing: bool = False
    #: An unexpected error in an answer's commit: the writer raises it, which ends the connection.
    failure: BaseException | None = None

    def wake(self) -> None:
        self.woken.set()


class Relay:
    """One relay process. Use `async with Relay(config) as relay:` or start()/close().

    The shell around `relay.router.Router`: it accepts connections, reads frames and hands them to
    the router with the store's answers, runs the store operations the router asks for, and writes
    what the router queued for each node (one writer task per node)."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        store: Store | None = None,
        interceptor: Interceptor | None = None,
        bus: Bus | None = None,
    ):
        certs.check_root(config.ca_root)
        self.config = config
        self.store = store or make_store(config.store_path, config.limits)
        #: The other relays sharing the store (none for SQLite).
        self.bus = bus or make_bus(self.store)
        if config.name is not None:
            check_name(config.name)
        self._healthy = True
        #: The relay's own tasks (heartbeat, purge, evictions, CRL reloads) run in one TaskGroup, in
        #: a task of its own from start() until close() sets `_stopping`.
        self._group: asyncio.TaskGroup | None = None
        self._life: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.interceptor = interceptor or Interceptor()
        self.metrics = Metrics()
        #: Every decision about what nodes send and are sent (the interceptor may keep a revoked
        #: node in: scenarios replace it after the relay is made, so it is asked each time).
        self.router: Router[_Peer] = Router(
            config.ca_root,
            self.metrics,
            crl_publisher=config.crl_publisher,
            resend_after=config.resend_after,
            queue_limit=MAX_QUEUED,
            admits_revoked=lambda name: self.interceptor.admits_revoked(name),
        )
        self._server: Server | None = None
        #: A CRL taken into the feed (and pushed) that the store refused: written again each heartbeat.
        self._unsaved_crl: tuple[int, bytes] | None = None

    @property
    def _peers(self) -> dict[str, _Peer]:
        """The connections held, by node name."""
        return self.router.links

    @property
    def _feed(self) -> RevocationState:
        """The feed as the relay verified it (to refuse revoked nodes, never to regress)."""
        return self.router.feed

    @property
    def _crl(self) -> bytes | None:
        """The CRL held and pushed to every node (DER), if any."""
        return self.router.crl

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and start listening."""
        await self.store.open()
        try:
            await self.bus.start(self)
        except BaseException:
            await self.store.close()
            raise
        held = await self.store.get_crl()
        if held is not None:
            self._adopt_crl(held[1])
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            ssl=self.config.tls,
            compression=None,  # payloads are ciphertext: compression gains nothing and leaks lengths
            max_size=2 * MAX_LINK_FRAME,  # up to here we answer with an ERROR frame; beyond, close 1009
            max_queue=16,
            ping_interval=self.config.ping_interval,
            ping_timeout=self.config.ping_interval,
            process_request=self._http,
            server_header="kmsnet-relay",
        )
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stopping.clear()
        self._life = asyncio.create_task(self._run(started), name="relay")
        await started
        log.info("relay_started", extra={"fields": {"url": self.url}})

    async def _run(self, started: asyncio.Future[None]) -> None:
        """The relay's own tasks, from start() until close(): then they are cancelled together (a
        failure of one also ends the others, and close() raises it)."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self._purge_loop(), name="relay-purge")
                group.create_task(self._heartbeat_loop(), name="relay-heartbeat")
                started.set_result(None)
                await self._stopping.wait()
                raise _Stopping
        except* _Stopping:
            pass
        finally:
            self._group = None

    async def close(self) -> None:
        """Stop the relay's own tasks, stop accepting, close every connection (each finishing its
        queued writes), close the store."""
        life, self._life = self._life, None
        if life is not None:
            self._stopping.set()
            await life
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
            self._server = None
        await self.bus.close()
        await self.store.close()
        log.info("relay_stopped", extra={"fields": {}})

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None, "relay not started"
        sock = next(iter(self._server.sockets))
        port: int = sock.getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """ws:// or wss:// URL of this relay."""
        return f"{self._scheme}://{self.config.host}:{self.port}"

    @property
    def _scheme(self) -> str:
        return "wss" if self.config.tls else "ws"

    @property
    def name(self) -> str:
        """This relay's name, `host:port` as nodes dial it: what its CHALLENGE carries."""
        if self.config.name is not None:
            return self.config.name
        return relay_name_of(f"{self._scheme}://{_bracketed(self.config.public_host or self.config.host)}:{self.port}")

    def connected(self) -> list[str]:
        """Names of the nodes connected now."""
        return sorted(self._peers)

    # --- HTTP: /healthz and /metrics share the port ---------------------------------------------------

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            if not self._healthy:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "store unreachable\n")
            return connection.respond(HTTPStatus.OK, "ok\n")
        if request.path == "/metrics":
            body = generate_latest(self.metrics.registry)
            headers = Headers([("Content-Type", "text/plain; version=0.0.4"), ("Content-Length", str(len(body)))])
            return Response(HTTPStatus.OK, "OK", headers, body)
        if "upgrade" not in request.headers.get("Connection", "").lower():
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        return None

    # --- a connection ---------------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        try:
            peer = await self._authenticate(ws)
        except _Revoked as exc:
            self.metrics.refused.labels("revoked").inc()
            log.info("revoked_refused", extra={"fields": {"remote": str(ws.remote_address), "reason": str(exc)}})
            await self._refuse_revoked(ws, str(exc))
            return
        except _AuthRefused as exc:
            self.metrics.refused.labels("auth").inc()
            log.info("auth_refused", extra={"fields": {"remote": str(ws.remote_address), "reason": str(exc)}})
            await self._fatal(ws, ErrorCode.AUTH_FAILED, str(exc), CLOSE_POLICY)
            return
        except (ConnectionClosed, TimeoutError):
            return
        old = self._peers.get(peer.name)
        if old is not None:
            # A node reconnecting before its old socket timed out: the newest connection wins.
            await self._stop_peer(old)
            await old.ws.close(1000, "replaced by a newer connection")
        self.router.attach(peer)
        log.info("node_connected", extra={"fields": {"node": peer.name}})
        try:
            # Its writer runs beside the reader, in a group of their own: neither outlives the other.
            async with asyncio.TaskGroup() as tasks:
                await self._serve(peer, tasks)
        finally:
            self.router.detach(peer)
            log.info("node_disconnected", extra={"fields": {"node": peer.name}})

    async def _serve(self, peer: _Peer, tasks: asyncio.TaskGroup) -> None:
        """Welcome the node, start its writer in `tasks`, and read its frames until it goes; then
        stop the writer (it sends what is queued first, within STOP_GRACE)."""
        joined = False
        try:
            try:
                # Listening for its news before its mailbox is read: nothing stored meanwhile is missed.
                peer.generation = await self.bus.join(peer.name)
                joined = True
            except StoreUnavailable as exc:
                raise LinkRefused(ErrorCode.UNAVAILABLE, f"relay cannot serve now: {exc}", CLOSE_TRY_AGAIN) from exc
            if self.bus.newest(peer.name) > peer.generation:
                return  # a newer connection of this node came up elsewhere meanwhile
            await self._note_identity(peer)
            welcome = Welcome(
                peer.name,
                await self.store.waiting(peer.name),
                await self.store.onetime_left(peer.name),
                await self._swap_epoch(peer),
            )
            await peer.ws.send(wire.encode_link(welcome))
            peer.writer = tasks.create_task(self._writer(peer), name=f"relay-writer-{peer.name}")
            async for raw in peer.ws:
                if len(peer.outbox) + len(peer.commits) >= MAX_QUEUED:
                    await self._room(peer)
                if peer.closing or peer.revoked:
                    break  # replaced by a newer connection, revoked, or its writer is gone
                await self._receive(peer, raw)
        except LinkRefused as exc:
            self.metrics.refused.labels(exc.code.name.lower()).inc()
            log.info("frame_refused", extra={"fields": {"node": peer.name, "code": exc.code.name, "reason": str(exc)}})
            await self._fatal(peer.ws, exc.code, str(exc), exc.close)
        except ConnectionClosed:
            pass
        except StoreUnavailable as exc:
            # Redis went away under us: the node comes back later (or at another relay).
            log.warning("store_unavailable", extra={"fields": {"node": peer.name, "reason": str(exc)}})
            await self._fatal(peer.ws, ErrorCode.UNAVAILABLE, "the relay's store is unreachable", CLOSE_TRY_AGAIN)
        except Exception:
            # A bug of ours, not the node's: say so with the traceback; websockets closes with 1011.
            log.exception("relay_handler_failed", extra={"fields": {"node": peer.name}})
            raise
        finally:
            await self._stop_peer(peer)
            if joined:
                with contextlib.suppress(StoreUnavailable):
                    await self.bus.leave(peer.name)

    async def _note_identity(self, peer: _Peer) -> None:
        """A node back with another identity key (re-keyed, or renewed offline) has one-time prekeys
        stored under the old one: they are dropped, and WELCOME says none are left (it uploads anew)."""
        try:
            dropped = await self.store.note_identity(peer.name, peer.identity)
        except StoreWriteRefused as exc:
            self.router.write_refused("identity", exc)
            return
        if dropped:
            log.info("onetime_dropped", extra={"fields": {"node": peer.name, "reason": "identity key changed"}})

    async def _swap_epoch(self, peer: _Peer) -> bytes | None:
        """The signed epoch the node gave at its previous login (for WELCOME), this login's kept instead.
        The relay only keeps and echoes it: the node verifies its own signature (PROTOCOL.md §16.3)."""
        try:
            return await self.store.swap_epoch(peer.name, peer.epoch)
        except StoreWriteRefused as exc:
            self.router.write_refused("epoch", exc)
            return None

    async def _room(self, peer: _Peer) -> None:
        """Wait until the node has read enough of what is queued for it: a node that does not read
        is not read either, and its answers never pile up."""
        while len(peer.outbox) + len(peer.commits) >= MAX_QUEUED and not peer.closing:
            peer.room.clear()
            await peer.room.wait()

    async def _authenticate(self, ws: ServerConnection) -> _Peer:
        nonce = os.urandom(CHALLENGE_LEN)
        name = self.name
        await ws.send(wire.encode_link(Challenge(nonce, name)))
        raw = await asyncio.wait_for(ws.recv(), self.config.auth_timeout)
        if not isinstance(raw, bytes):
            raise _AuthRefused("expected a binary AUTH frame")
        try:
            frame = wire.decode_link(raw)
        except DecodeError as exc:
            raise _AuthRefused(f"malformed AUTH frame: {exc}") from exc
        if not isinstance(frame, Auth):
            raise _AuthRefused("the first frame must be AUTH")
        now = self.config.clock()
        try:
            cert = certs.verify(frame.certificate, self.config.ca_root, now)
            # Signed for this relay's name and URL: an answer to our CHALLENGE relayed through
            # another relay the node dialled names that one, and does not verify here.
            signed = auth_signed_bytes(nonce, name, f"{self._scheme}://{name}")
            verify_signature(cert.public_key, frame.signature, signed)
        except ProtocolError as exc:
            raise _AuthRefused(str(exc)) from exc
        words = self.router.refusal(cert.name, cert.serial, now)
        if words is not None:
            raise _Revoked(words)
        return _Peer(
            name=cert.name,
            certificate=frame.certificate,
            serial=cert.serial,
            identity=cert.public_key.public_bytes_raw(),
            epoch=frame.epoch,
            ws=ws,
            bucket=TokenBucket(self.config.rate, self.config.burst),
            acks=TokenBucket(self.config.ack_rate, self.config.ack_burst),
            last_ack=asyncio.get_running_loop().time(),
        )

    async def _refuse_revoked(self, ws: ServerConnection, words: str) -> None:
        """At login: the CRL that revokes the node (so that it verifies why itself), then REVOKED."""
        if self._crl is not None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(wire.encode_link(CrlFeed(self._crl)))
        await self._fatal(ws, ErrorCode.REVOKED, words, CLOSE_POLICY)

    def _evict_all(self, revoked: list[_Peer]) -> None:
        """Close the connections a new CRL revokes (the router queued their REVOKED error)."""
        for peer in revoked:
            self._spawn(self._evict(peer), f"relay-evict-{peer.name}")

    async def _evict(self, peer: _Peer) -> None:
        await self._stop_peer(peer)  # its writer sends the CRL and the REVOKED error first
        with contextlib.suppress(ConnectionClosed):
            await peer.ws.close(CLOSE_POLICY, "revoked")

    async def _receive(self, peer: _Peer, raw: Any) -> None:
        for frame in self.router.decode(raw):
            if peer.revoked:
                return  # a CRL revoked it while this BATCH was being handled: the rest is not read
            if self.router.admit(peer, frame):
                await self._handle_frame(peer, frame)

    async def _handle_frame(self, peer: _Peer, frame: LinkFrame) -> None:
        if isinstance(frame, Send):
            await self._on_send(peer, frame)
        elif isinstance(frame, Ack):
            self._on_ack(peer, frame)
        elif isinstance(frame, FetchBundle):
            await self._on_fetch(peer, frame)
        elif isinstance(frame, PublishBundle):
            await self._on_publish(peer, frame)
        elif isinstance(frame, PublishCrl):
            await self._on_crl(peer, frame)
        else:
            raise LinkRefused(
                ErrorCode.UNKNOWN_TYPE, f"a {frame.TYPE.name} frame is not one a node sends", CLOSE_POLICY
            )

    async def _on_send(self, peer: _Peer, send: Send) -> None:
        if not self.router.recipient_known(peer, send, await self.store.known(send.to)):
            return
        now_ms = int(self.config.clock().timestamp() * 1000)
        writes = []
        for item in await self.interceptor.on_send(peer.name, send):
            try:
                envelope, durable = self.store.put_nowait(item.msg_id, peer.name, item.to, item.payload, now_ms)
            except QuotaExceeded as exc:
                self.router.over_quota(peer, item.msg_id, exc)
                return
            writes.append(durable)
            if envelope is not None:
                self.router.route(envelope)
        # The answer waits for the commit, but the connection does not: the next frames are read
        # meanwhile, and their envelopes join the same commit.
        if not writes:
            self.router.settled(peer, send.msg_id, 0, None)
            return
        waiting = len(writes)

        def committed(write: asyncio.Future[None]) -> None:
            nonlocal waiting
            peer.commits.discard(write)
            waiting -= 1
            if waiting == 0:
                failed = next((f.exception() for f in writes if f.exception() is not None), None)
                self._fail(peer, self.router.settled(peer, send.msg_id, len(writes), failed))

        for write in writes:
            peer.commits.add(write)
            write.add_done_callback(committed)

    def _on_ack(self, peer: _Peer, ack: Ack) -> None:
        self.router.acknowledged(peer, ack.msg_id, asyncio.get_running_loop().time())
        deleted = self.store.delete_nowait(peer.name, ack.msg_id)
        peer.commits.add(deleted)
        deleted.add_done_callback(functools.partial(self._deleted, peer))

    def _deleted(self, peer: _Peer, deleted: asyncio.Future[bool]) -> None:
        peer.commits.discard(deleted)
        peer.room.set()
        self._fail(peer, self.router.deleted(deleted.exception() or deleted.result()))

    def _fail(self, peer: _Peer, failure: BaseException | None) -> None:
        """End the connection over a failed commit that is a bug of ours (the writer raises it)."""
        if failure is not None:
            peer.failure = failure
            peer.wake()

    async def _on_fetch(self, peer: _Peer, fetch: FetchBundle) -> None:
        try:
            found = await self.store.take_bundle(fetch.name)
        except StoreWriteRefused as exc:
            self.router.bundle_not_taken(peer, fetch, exc)
            return
        bundle, left = self.router.bundle_of(found)
        bundle = await self.interceptor.on_bundle(peer.name, fetch.name, bundle)
        self.router.queue(peer, BundleReply(fetch.request, bundle, left))

    async def _on_publish(self, peer: _Peer, publish: PublishBundle) -> None:
        to_store = self.router.bundle_to_store(peer, publish)
        if to_store is None:
            return
        signed, onetime = to_store
        try:
            await self.store.put_bundle(peer.name, signed, onetime, bool(publish.replace))
        except StoreWriteRefused as exc:
            self.router.bundle_not_stored(peer, exc)
            return
        self.router.bundle_stored(peer, len(onetime))

    async def _on_crl(self, peer: _Peer, publish: PublishCrl) -> None:
        crl = self.router.take_crl(peer, publish, self.config.clock())
        if crl is None:
            return
        try:
            stored = await self.store.put_crl(crl.number, publish.crl)
        except StoreUnavailable as exc:
            # A revocation is never lost to the store: the feed takes it in memory and pushes it now,
            # and the heartbeat writes it once the store takes writes again. The CA hears of it.
            self.router.crl_unsaved(peer, crl.number, exc)
            self._unsaved_crl = (crl.number, publish.crl)
            stored = True
        if not stored:
            # Another relay of the cluster holds a newer one: the feed never goes back, here either.
            held = await self.store.get_crl()
            if held is not None:
                self._adopt_crl(held[1])
            self.router.crl_outdated(peer)
            return
        self._evict_all(self.router.hold_crl(publish.crl, crl))

    def _adopt_crl(self, der: bytes) -> None:
        """Take a CRL from the store (held at start, or stored by another relay) into the feed."""
        self._evict_all(self.router.adopt_crl(der, self.config.clock()))

    # --- the writer: everything the relay sends to a node, once it is welcomed ----------------------

    async def _writer(self, peer: _Peer) -> None:
        """Send what is queued for the node, batch by batch, until its connection closes; an
        unexpected error in its answers ends the connection."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if peer.failure is not None:
                    raise peer.failure
                if peer.behind and not peer.closing:
                    await self._catch_up(peer)
                elif peer.outbox or peer.crl_due:
                    await self._send_queued(peer)
                elif peer.closing:
                    return
                elif peer.gap or self.router.resend_wait(peer, loop.time()) == 0:
                    await self._resend(peer)
                else:
                    peer.woken.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.router.resend_wait(peer, loop.time())):
                            await peer.woken.wait()
        except ConnectionClosed:
            pass
        except StoreUnavailable as exc:
            log.warning("store_unavailable", extra={"fields": {"node": peer.name, "reason": str(exc)}})
            await peer.ws.close(CLOSE_TRY_AGAIN, "store unreachable")
        except Exception:
            log.exception("relay_writer_failed", extra={"fields": {"node": peer.name}})
            await peer.ws.close(1011, "internal error")
        finally:
            # Nobody sends to it any more: a reader waiting for room must not wait for ever.
            peer.closing = True
            peer.room.set()

    async def _catch_up(self, peer: _Peer) -> None:
        """Push the node's mail from the store, oldest first, each store read as one batch with the
        frames queued meanwhile; the envelopes queued meanwhile wait their turn (in `outbox`)."""
        peer.behind = False
        # Everything stored for it so far is committed first, so that the reads see it; what comes
        # later is in `outbox` (or `behind` is set again).
        await self.store.flush()
        while True:
            envelopes = await self.store.pending(peer.name, peer.cursor, DELIVERY_BATCH)
            frames = await self._crl_frames(peer) if peer.crl_due else []
            queued, peer.outbox = peer.outbox, collections.deque()
            for item in queued:
                if isinstance(item, bytes):
                    frames.append(item)
                else:
                    peer.outbox.append(item)
            delivered = 0
            for envelope in envelopes:
                delivered += await self._deliver(peer, envelope, frames)
            if frames:
                await self._flush(peer, frames)
                self.metrics.delivered.inc(delivered)
            peer.room.set()
            if len(envelopes) < DELIVERY_BATCH or peer.closing:
                return

    async def _send_queued(self, peer: _Peer) -> None:
        """Send everything queued for the node now, in order of arrival, as one batch."""
        frames = await self._crl_frames(peer) if peer.crl_due else []
        outbox = peer.outbox
        delivered = 0
        for _ in range(len(outbox)):
            item = outbox.popleft()
            if isinstance(item, bytes):
                frames.append(item)
            else:
                delivered += await self._deliver(peer, item, frames)
        if frames:
            await self._flush(peer, frames)
            self.metrics.delivered.inc(delivered)
        peer.room.set()

    async def _crl_frames(self, peer: _Peer) -> list[bytes]:
        """The CRL feed frame now due to the node (the interceptor may withhold it)."""
        crl = self.router.crl_for(peer)
        if crl is None:
            return []
        pushed = await self.interceptor.on_crl(peer.name, crl)
        return [] if pushed is None else [wire.encode_link(CrlFeed(pushed))]

    async def _deliver(self, peer: _Peer, envelope: Envelope, frames: list[bytes]) -> int:
        """Add the DELIVER frames of `envelope` to `frames` unless it was pushed already; how many."""
        if not self.router.due(peer, envelope):
            return 0
        return await self._push(peer, envelope, frames, 1)

    async def _push(self, peer: _Peer, envelope: Envelope, frames: list[bytes], sends: int) -> int:
        """Add the DELIVER frames of `envelope` to `frames` (its `sends`-th push), and expect its ACK."""
        frame = Deliver(envelope.msg_id, envelope.sender, envelope.payload, envelope.stored_at)
        items = await self.interceptor.on_deliver(peer.name, frame)
        frames.extend(wire.encode_link(item) for item in items)
        self.router.pushed(peer, envelope, sends, asyncio.get_running_loop().time())
        return len(items)

    async def _resend(self, peer: _Peer) -> None:
        """Send again the DELIVERs the router finds lost, each read again from the store."""
        lost = self.router.lost(peer, asyncio.get_running_loop().time())
        frames: list[bytes] = []
        resent = 0
        if lost:
            # An envelope pushed from memory may still be on its way into the store: committed
            # first, so that one missing from the store below was really acknowledged (or expired).
            await self.store.flush()
        for msg_id, sent in lost:
            found = await self.store.pending(peer.name, sent.seq - 1, 1)
            if not found or found[0].seq != sent.seq:
                self.router.gone(peer, msg_id)
                continue
            resent += await self._push(peer, found[0], frames, sent.sends + 1)
        if frames:
            await self._flush(peer, frames)
            self.metrics.resent.inc(resent)
            log.info("envelopes_resent", extra={"fields": {"node": peer.name, "count": resent}})

    async def _flush(self, peer: _Peer, frames: list[bytes]) -> None:
        """Write `frames` to the node, in order, as few WebSocket messages as the BATCH limits allow:
        the one place where the writer touches the socket."""
        for message in wire.pack_link_frames(frames):
            await peer.ws.send(message)

    async def _stop_peer(self, peer: _Peer) -> None:
        if peer.commits:
            # Let pending commits finish (their callbacks queue the answers): an ACK's delete must not
            # be lost with the connection. asyncio.wait, not gather: these futures are the store's,
            # shared with other connections, and must not be cancelled with us.
            await asyncio.wait(set(peer.commits))
        peer.closing = True
        peer.wake()
        peer.room.set()
        writer, peer.writer = peer.writer, None
        if writer is not None:
            # The writer sends what is queued (an ACCEPTED spares a retransmission), within reason;
            # past that it is cancelled, and the connection's TaskGroup reaps it.
            await asyncio.wait({writer}, timeout=STOP_GRACE)
            writer.cancel()

    async def _fatal(self, ws: ServerConnection, code: ErrorCode, text: str, close: int) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(wire.encode_link(Error(code, text[:200])))
            await ws.close(close, code.name.lower())

    async def _save_crl(self) -> None:
        """Write a CRL the store refused before (each heartbeat, until it takes it)."""
        if self._unsaved_crl is None:
            return
        number, der = self._unsaved_crl
        try:
            stored = await self.store.put_crl(number, der)
        except StoreUnavailable:
            return
        self._unsaved_crl = None
        self.metrics.writable.set(1)
        log.info("crl_stored", extra={"fields": {"number": number, "late": True}})
        if not stored:
            await self._reload_crl()  # another relay of the cluster stored a newer one meanwhile

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._save_crl()
            healthy = await self.store.healthy()
            if healthy:
                try:
                    await self.bus.heartbeat(self.name, self.url, len(self._peers))
                except StoreUnavailable:
                    healthy = False
            if healthy != self._healthy:
                log.warning("store_health", extra={"fields": {"healthy": healthy}})
            self._healthy = healthy
            self.metrics.store_up.set(int(healthy))
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    # --- news from the other relays (the cluster bus) -------------------------------------------------

    def on_envelope(self, envelope: Envelope) -> None:
        """An envelope was stored (by any relay) for a node connected here: push it."""
        self.router.route(envelope)

    def on_replaced(self, name: str, generation: int) -> None:
        """`name` connected somewhere with a newer connection number: close its connection here."""
        peer = self._peers.get(name)
        if peer is not None and 0 < peer.generation < generation:
            self.metrics.replaced.inc()
            log.info("node_replaced", extra={"fields": {"node": name}})
            self._spawn(self._replace(peer), f"relay-replace-{name}")

    async def _replace(self, peer: _Peer) -> None:
        await self._stop_peer(peer)
        await peer.ws.close(1000, "replaced by a newer connection")

    def on_crl(self) -> None:
        """Another relay stored a newer CRL: take it into the feed here too."""
        self._spawn(self._reload_crl(), "relay-reload-crl")

    async def _reload_crl(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            held = await self.store.get_crl()
            if held is not None:
                self._adopt_crl(held[1])

    def on_resync(self) -> None:
        """Announcements may have been lost: every node's mail is read from the store again."""
        self.router.resync()
        self.on_crl()

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` in the relay's TaskGroup (dropped once the relay is closing). A failure is
        logged and ends only that work: one connection's eviction must not stop the heartbeat."""
        if self._group is None or self._stopping.is_set():
            work.close()
            return
        self._group.create_task(self._logged(work, name), name=name)

    @staticmethod
    async def _logged(work: Coroutine[Any, Any, None], name: str) -> None:
        try:
            await work
        except Exception:
            log.exception("relay_task_failed", extra={"fields": {"task": name}})

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL)
            with contextlib.suppress(StoreUnavailable):
                dropped = await self.store.purge_expired(int(self.config.clock().timestamp() * 1000))
                if dropped:
                    log.info("envelopes_expired", extra={"fields": {"count": dropped}})
