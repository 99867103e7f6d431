"""The node: a thin asyncio shell around the protocol core and the encrypted keystore.

Everything a node knows lives in its keystore and is written *before* it acts on it:
a ratchet state covering a message (a reservation of message numbers, or a new session) is
fsynced before the ciphertext leaves the process (a crash can never make us reuse a message
key or a nonce), and a received message is committed to the inbox with the session's new
state before the application sees it and before the relay is told to forget it (nothing is
lost, and a redelivery is recognised by its id and acknowledged silently). An envelope the
relay has not accepted yet is kept in memory, and written to disk once `send` reports it
queued or the node stops (node/outbox.py).

The shell's parts, each with the keystore records it holds:
    node/sessions.py   session/<peer>, archive/<peer>, peer/<peer>, seen/<peer>:<msg id hex>, node/epoch
    node/bundles.py    node/prekeys, replay/<spk id>:<EK hex>, bundle/<spk id>, node/onetime_certificate
    node/outbox.py     outbox/<seq 20 digits>
    node/inbox.py      inbox/<seq 20 digits>
    node/history.py    history/<peer>:<seq>:<in|out>:<msg id hex>, node/history_retention
    node/trust.py      trust/<peer>
    node/receipts.py   node/owed_receipts (receipts a stopped node still owed)
    node/revocations.py  node/revocation
    this module        node/identity, node/certificate, node/root, node/relay
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from node.bundles import ONETIME_LOW, Bundles
from node.clock import utcnow
from node.enrol import load_identity, renew_certificate, renewal_time
from node.epochecho import rollback_seen, sign_epoch
from node.errors import NodeError, NodeRevoked, PeerUnavailable, RelayUnreachable, SelfSend, code_of
from node.eventbudget import QUARANTINE, RefusalBudget
from node.events import Delivered, Message, SecurityEvent
from node.history import Entry, History, State
from node.home import NS_NODE
from node.inbox import Inbox
from node.journal import Journal, Key, log_failure, succeeded
from node.keystore import Keystore
from node.link import RelayLink, split_urls
from node.ocsp import OcspGate
from node.options import NodeOptions
from node.outbox import Outbox
from node.pkcs11 import TokenIdentityKey
from node.receipts import Delivery
from node.revocations import Revocations
from node.selfrevoked import Revoked
from node.sessions import Sessions
from node.status import status
from node.trust import Trust, TrustState, certificate_key
from protocol import certs, handshake, wire
from protocol.body import Body, TextBody
from protocol.body import decode as decode_body
from protocol.body import encode as encode_body
from protocol.errors import (
    CertificateRevoked,
    DecodeError,
    DuplicateMessage,
    ProtocolError,
    ReplayedInitialMessage,
    StaleInit,
)
from protocol.link import Accepted, Ack, CrlFeed, Deliver, Error, ErrorCode, LinkFrame, Send, Welcome
from protocol.messages import PrekeyBundle
from protocol.peer import Local, Outcome, Peer, PeerEvent, PeerRecord, refusal
from protocol.revocation import RevocationState
from protocol.session import Kind, Session

__all__ = ["Node", "NodeOptions", "PeerRecord"]

log = logging.getLogger("kmsnet.node")

#: Sending message numbers reserved per durable write (well under the peer's MAX_SKIP).
RESERVE_AHEAD = 64
#: Seconds between checks for a due signed-prekey rotation while connected.
MAINTENANCE_INTERVAL = 60.0


class Node:
    """An enrolled node. `await node.start()`, then `send`, and read `events`; `await node.stop()`."""

    def __init__(
        self,
        keystore: Keystore,
        *,
        relay_url: str | None = None,
        options: NodeOptions | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.keystore = keystore
        self.options = options or NodeOptions()
        self.clock = clock
        root_pem = self.keystore.get(NS_NODE, "root")
        stored_url = keystore.get(NS_NODE, "relay")
        if root_pem is None:
            raise NodeError("this home holds no enrolled node (run `kmsnet node init` first)")
        self.root_pem = root_pem
        self.root = certs.load_certificate(root_pem)
        self._load_identity()
        #: The relays this node may use (several for a cluster: it fails over from one to the next).
        self.relay_urls = split_urls(relay_url or (stored_url.decode() if stored_url else ""))
        if not self.relay_urls:
            raise NodeError("no relay URL: give --relay")
        self._journal = Journal(keystore)
        #: Every peer's sessions and record (node/sessions.py).
        self.sessions = Sessions(keystore, journal=self._journal)
        #: The CRL feed (and OCSP answers), our own revocation, closing revoked peers (node/revocations.py).
        self.revocations = Revocations(
            keystore,
            self._journal,
            self.sessions,
            self.options,
            self.root,
            clock,
            node=self.name,
            emit=lambda event: self._emit(event),
            close=lambda peer, reason: self._close(peer, reason),
        )
        self._ocsp = self.revocations.ocsp
        self._bundles = Bundles(keystore, self._journal, self.options, node=self.name)
        #: The responder's prekey account (protocol/prekeys.py).
        self.prekeys = self._bundles.account
        self._inbox = Inbox(keystore, self._journal, stored=self.options.inbox)
        self.events = self._inbox.events
        #: Called with what each `take_inbox` took (see node/inbox.py).
        self.inbox_listeners = self._inbox.listeners
        #: Security events coalesced per peer, and refused frames budgeted per peer (issue #13).
        self.event_budget = self._inbox.budget
        self.refusal_budget = RefusalBudget()
        self._outbox = Outbox(keystore, self._journal)
        # Peers a fresh handshake is being started with by itself (protocol/peer.py, reset_due).
        self._resetting: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._link: RelayLink | None = None
        self._link_task: asyncio.Task[None] | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ocsp_gate = OcspGate(self._ocsp, self._handle_deliver, clock, self._tasks) if self._ocsp else None
        # Peers a heartbeat is being sent to (one at a time is enough).
        self._heartbeats: set[str] = set()
        self._reservations: dict[str, asyncio.Future[None]] = {}
        #: Every message sent and received, with its delivery state (node/history.py).
        self.history = History(keystore, clock)
        #: The peers' identity keys the user verified (node/trust.py).
        self.trust = Trust(keystore, lambda: self.identity.public_bytes)
        #: Receipts, retry requests and re-sends of our unreceipted messages (node/receipts.py).
        self.delivery = Delivery(
            self.history,
            send_body=self._send_body,
            commit=lambda puts: self._journal.commit(puts, sync=False),
            clock=clock,
            connected=lambda: self.connected,
        )
        # Deliveries handled since the link came up, against what the relay said was waiting.
        self._handled = 0
        self._waiting = 0
        # Peers to start a new session with once connected (their sessions were dropped).
        self._rehandshake: list[str] = []

    @property
    def _rolled_back(self) -> bool:
        return self.sessions.rolled_back

    def _load_identity(self) -> None:
        """(Re)read our identity key and certificate: at start, and after a renewal or a re-key."""
        identity = load_identity(self.keystore, self.options.pin)
        certificate = self.keystore.get(NS_NODE, "certificate")
        if identity is None or certificate is None:
            raise NodeError("this home holds no enrolled node (run `kmsnet node init` first)")
        previous = getattr(self, "identity", None)
        self.identity = identity
        if isinstance(previous, TokenIdentityKey):
            previous.close()  # the token stays open through the new key's session: the link may still use it
        self.certificate = certificate
        self.fingerprint = hashlib.sha256(certificate).digest()
        # Our own certificate is read, not judged: an expired one must still let `status` say so;
        # the relay and our peers are the ones who refuse it.
        subject = x509.load_der_x509_certificate(certificate).subject
        self.name = str(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    async def renew_if_due(self) -> bool:
        """Renew our certificate at 2/3 of its validity (a request signed by our current key), then
        reconnect with it and publish prekeys signed over it. True if it was renewed."""
        if self.clock() < renewal_time(self.certificate):
            return False
        try:
            await asyncio.to_thread(renew_certificate, self.keystore, clock=self.clock, pin=self.options.pin)
        except NodeError as exc:
            self._emit(SecurityEvent("renewal_failed", None, str(exc), code_of(exc)))
            return False
        self._load_identity()
        if self._link is not None:
            await self._link.switch_identity(self.identity, self.certificate)
        log.info("certificate_renewed", extra={"fields": {"node": self.name}})
        return True

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self, *, wait: bool = True, reconnect: bool = True) -> None:
        """Connect to the relay (and keep reconnecting). With `wait`, raise RelayUnreachable if the
        first attempt fails."""
        if self.revoked is not None:  # (issue #13) a revoked node is told, not sent to the relay
            raise NodeRevoked(f"this node's certificate is {self.revoked.words()}")
        self._link = RelayLink(
            self.relay_urls,
            identity=self.identity,
            certificate=self.certificate,
            root_pem=self.root_pem,
            on_frame=self._on_frame,
            on_connected=self._on_connected,
            reconnect=reconnect,
            check_relay_name=self.options.check_relay_name,
            epoch=lambda: sign_epoch(self.identity, self.name, self.sessions.epoch),
        )
        self._journal.start()
        if self.sessions.rolled_back:
            self._drop_sessions()
        # A copy of the keystore taken before this start is recognised as older from now on.
        await self.sessions.commit({})
        self._maintenance = asyncio.create_task(self._maintain(), name=f"node-maintenance-{self.name}")
        self.delivery.start()
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._link_task = asyncio.create_task(self._link.run(first_attempt=first), name=f"node-link-{self.name}")
        if wait:
            try:
                await first
            except BaseException as exc:
                await self.stop()
                if isinstance(exc, NodeRevoked) and self.revoked is not None:  # the CRL it verified says why
                    raise NodeRevoked(f"this node's certificate is {self.revoked.words()}") from exc
                raise
        else:
            first.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)

    async def stop(self) -> None:
        """Close the link; state is already on disk."""
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        await self.delivery.stop()  # the receipts owed go out first, while the link is up
        if self._link is not None:
            await self._link.close()
        if self._link_task is not None:
            self._link_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._link_task
            self._link_task = None
        self._outbox.cancel_waiting()
        if len(self._outbox):
            # Whatever the relay has not accepted is sent again on the next start.
            self._outbox.persist().add_done_callback(log_failure)
        await self._journal.close()
        await self.sessions.epoch_file.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def relay_url(self) -> str:
        """The relay this node is connected to (or tries to be)."""
        return self._link.url if self._link is not None else self.relay_urls[0]

    @relay_url.setter
    def relay_url(self, url: str) -> None:
        """Use this one relay from the next start on."""
        self.relay_urls = [url]

    @property
    def connected(self) -> bool:
        """True while the relay link is up."""
        return self._link is not None and self._link.connected.is_set()

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the relay link is up."""
        assert self._link is not None, "node not started"
        async with asyncio.timeout(timeout):
            await self._link.connected.wait()

    # --- on connect: prekeys up to date, outbox flushed ---------------------------------------------------

    def idle(self) -> bool:
        """Connected, and every envelope that was waiting when we connected has been handled."""
        return self.connected and self._handled >= self._waiting

    async def _on_connected(self, welcome: Welcome) -> None:
        log.info("node_connected", extra={"fields": {"node": self.name, "pending": welcome.pending}})
        self._handled, self._waiting = 0, welcome.pending
        assert self._link is not None
        if echoed := rollback_seen(welcome.epoch, self._link.sent_epoch, self.identity, self.name):
            # The relay's copy of the epoch is newer than the keystore: restored with its epoch file.
            self.sessions.catch_up(echoed)
            self._drop_sessions()
            self.sessions.commit({}).add_done_callback(log_failure)
        await self._publish_prekeys(welcome.onetime)
        for peer in self._rehandshake:
            self._start_reset(peer, force=True)
        self._rehandshake.clear()
        # Resend what the relay has not accepted, in the order it was first sent.
        for msg_id, envelope in self._outbox.items():
            await self._link_send(Send(msg_id, envelope.to, envelope.payload))

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` beside the node (cancelled by `stop`)."""
        task = asyncio.create_task(work, name=f"node-{name}-{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _maintain(self) -> None:
        """While running: rotate the signed prekey when it is due (not only at connect time, so that a
        node connected for weeks never publishes a bundle initiators refuse as too old)."""
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            await self.renew_if_due()
            await self.refresh_crl()
            if self.connected and self._bundles.rotation_due(self.clock(), self.certificate):
                with contextlib.suppress(RelayUnreachable):
                    await self._publish_prekeys(onetime_left=ONETIME_LOW)
            await self.revocations.recheck_by_ocsp()

    async def _publish_prekeys(self, onetime_left: int, *, rotate: bool = False) -> None:
        await self._bundles.publish(
            self._link_send,
            identity=self.identity,
            certificate=self.certificate,
            fingerprint=self.fingerprint,
            now=self.clock(),
            onetime_left=onetime_left,
            rotate=rotate,
        )

    def _current_bundle(self) -> PrekeyBundle:
        """Our newest signed bundle (the scenarios and tests compare it with what the relay hands out)."""
        return self._bundles.current()

    # --- sending --------------------------------------------------------------------------------------

    def _lock(self, peer: str) -> asyncio.Lock:
        lock = self._locks.get(peer)
        if lock is None:
            lock = self._locks[peer] = asyncio.Lock()
        return lock

    def _session(self, peer: str) -> Session | None:
        """The current session with `peer`, open or closed (the scenarios look at it)."""
        return self.sessions.session(peer)

    def peer(self, name: str) -> PeerRecord | None:
        """What we know of `name`, if we ever had a session."""
        return self.sessions.get(name).record

    def _local(self) -> Local:
        """This node as a peer engine needs it, now (identity and certificate change on renewal)."""
        crl = self.revocation.current
        return Local(
            identity=self.identity,
            certificate=self.certificate,
            fingerprint=self.fingerprint,
            root=self.root,
            revocation=self.revocation_check,
            revoked=crl.revoked if crl is not None else (),
            prekeys=self.prekeys,
            bundle=self._bundles.by_id,
            suite=self.options.suite,
            accept_suites=self.options.accept_suites,
        )

    def _commit(self, peer: str, outcome: Outcome, extra: dict[Key, bytes] | None = None) -> asyncio.Future[None]:
        """Commit what an engine call says must be durable (fsynced with the next epoch when it says
        so); if that fails the engine is reloaded from the last durable state (node/sessions.py)."""
        puts, deletes = {**outcome.puts, **(extra or {})}, list(outcome.deletes)
        if outcome.prekeys:
            self._bundles.stage(puts, deletes)
        if outcome.sync:
            committed = self.sessions.commit(puts, deletes)
        else:
            committed = self._journal.commit(puts, deletes, sync=False)
        return self.sessions.guard(peer, committed)

    def _tell(self, peer: str, events: Sequence[PeerEvent]) -> asyncio.Future[None] | None:
        """Record what an engine call says the application must be told (after its commit, in order)."""
        last = None
        for event in events:
            last = self._emit(SecurityEvent(event.event, peer, event.reason, event.error, event.safety_number))
        return last

    async def send(self, peer: str, text: str) -> str:
        """Encrypt `text` for `peer` and hand it to the relay; return the message id (hex).

        Returns once the relay has stored it durably, or once it is safely in our outbox if the
        relay does not answer within `options.send_timeout` (it is sent on reconnect).
        """
        if self._link is None:
            raise NodeError("node not started")
        if peer == self.name:
            raise SelfSend(f"{peer!r} is this node: a message goes to another node")
        msg_id = os.urandom(16)
        body = encode_body(TextBody(msg_id, int(self.clock().timestamp() * 1000), text))
        durable: asyncio.Future[None] | None = None
        payload: bytes | None = None
        while payload is None:
            # The network (bundle, OCSP) is asked outside the lock: a delivery from this peer needs
            # the lock, and the link that would bring our answer may be busy delivering it.
            bundle = await self._fetch_bundle(peer) if self._needs_session(peer) else None
            async with self._lock(peer):
                engine = self.sessions.get(peer)
                if engine.current is None:
                    if bundle is not None:
                        self.trust.check_send(peer, certificate_key(bundle.certificate))
                        payload, durable = self._initiate(peer, bundle, body)
                    # else: the session went away while we waited; fetch a bundle after all.
                else:
                    if (record := self.peer(peer)) is not None:
                        self.trust.check_send(peer, record.identity)
                    payload, durable = self._encrypt(peer, engine, body)
        history: dict[Key, bytes] = {}
        self.history.add(Entry(msg_id.hex(), peer, "out", text, self.clock().timestamp(), State.SENDING), history)
        # Not awaited: the fsynced commit the message waits for below (or the next one) makes it durable.
        self._journal.commit(history, sync=False).add_done_callback(log_failure)
        try:
            if durable is not None:
                # Outside the lock, so that other sends can join the same commit. The ciphertext leaves
                # only once a state that covers it is on disk (fsynced): a reservation or a new session.
                await durable
        except NodeError as exc:
            # Nothing left: the history says so.
            failed: dict[Key, bytes] = {}
            self.history.mark(msg_id.hex(), State.FAILED, failed, reason=f"not sent: {exc}")
            self._journal.commit(failed, sync=False).add_done_callback(log_failure)
            raise
        accepted = self._outbox.await_accepted(msg_id, self.options.send_timeout)
        self._outbox.queue(msg_id, peer, payload)
        self.delivery.sent(peer, msg_id)
        try:
            await self._link_send(Send(msg_id, peer, payload))
            await accepted
        except (TimeoutError, RelayUnreachable):
            # The user is told "queued": from now on the envelope must survive even a power loss.
            await self._outbox.persist()
            log.info("send_queued", extra={"fields": {"node": self.name, "to": peer}})
        finally:
            self._outbox.stop_waiting(msg_id)
        return msg_id.hex()

    def _encrypt(
        self, peer: str, engine: Peer, body: bytes, kind: Kind = Kind.DATA
    ) -> tuple[bytes, asyncio.Future[None] | None]:
        """A MESSAGE frame, and what must be awaited before it may leave (see `_reserve`)."""
        outcome = engine.encrypt(body, kind=kind, reserve=RESERVE_AHEAD)
        assert outcome.frame is not None
        return outcome.frame, self._reserve(peer, outcome)

    def _reserve(self, peer: str, outcome: Outcome) -> asyncio.Future[None] | None:
        """What the caller must await before sending what `outcome` encrypted.

        A new reservation is committed with fsync (see `Ratchet.reserve`), and no message inside
        it may leave before that commit is done — also not the ones encrypted by other sends while
        it is still running, which is why the pending commit is remembered per peer.
        """
        if outcome.puts:
            durable = self._reservations[peer] = self._commit(peer, outcome)
            return durable
        pending = self._reservations.get(peer)
        # A reservation whose commit failed covers nothing: those waiting on it fail with it.
        return pending if pending is not None and not succeeded(pending) else None

    def _queue_outbox(self, msg_id: bytes, to: str, payload: bytes) -> None:
        self._outbox.queue(msg_id, to, payload)

    def _needs_session(self, peer: str) -> bool:
        """A send must start a handshake first: no open session, or it just ended with the peer's certificate."""
        engine = self.sessions.get(peer)
        if engine.expire(self.clock()):
            log.info("session_expired", extra={"fields": {"node": self.name, "peer": peer}})
        return engine.current is None

    async def _fetch_bundle(self, peer: str) -> PrekeyBundle:
        """`peer`'s prekey bundle from the relay (and, in OCSP mode, a fresh answer about its certificate)."""
        assert self._link is not None
        reply = await self._link.fetch_bundle(peer)
        if reply.bundle is None:
            raise PeerUnavailable(f"no node named {peer!r} has enrolled with this CA, or it has never connected")
        try:
            frame = wire.decode(reply.bundle)
            if not isinstance(frame, PrekeyBundle):
                raise DecodeError("relay answered with something else than a bundle")
        except ProtocolError as exc:
            self._emit(SecurityEvent("session_refused", peer, str(exc), code_of(exc)))
            raise
        if self._ocsp is not None:
            await self._ocsp.ensure(frame.certificate, self.clock())
        return frame

    def _initiate(
        self, peer: str, bundle: PrekeyBundle, body: bytes, kind: Kind = Kind.DATA
    ) -> tuple[bytes, asyncio.Future[None]]:
        """Start a session from `peer`'s bundle: the INIT, and the commit to await before it leaves."""
        try:
            outcome = self.sessions.get(peer).start(bundle, self.clock(), self._local(), first=body, kind=kind)
        except ProtocolError as exc:
            self._tell(peer, [refusal(exc, "session_refused")])
            raise
        durable = self._commit(peer, outcome)
        self._tell(peer, outcome.events)
        assert outcome.frame is not None
        return outcome.frame, durable

    def _drop_sessions(self) -> None:
        """The keystore is older than its epoch (restored from a backup): no session in it may encrypt
        again. Drop them all, tell the application, and start new ones once connected."""
        peers = self.sessions.drop_all()
        self._rehandshake = peers
        self._emit(
            SecurityEvent(
                "state_rollback",
                None,
                f"this node's keystore is older than its last durable state (restored from a backup?): "
                f"{len(peers)} session(s) dropped, new handshakes started",
            )
        )

    def _link_send_nowait(self, frame: LinkFrame) -> None:
        if self._link is None:
            raise RelayUnreachable("node not started")
        self._link.send_nowait(frame)

    async def _link_send(self, frame: LinkFrame) -> None:
        if self._link is None:
            raise RelayUnreachable("node not started")
        await self._link.send(frame)

    def is_queued(self, msg_id: str) -> bool:
        """True while the relay has not accepted message `msg_id` (hex, as `send` returned it)."""
        return bytes.fromhex(msg_id) in self._outbox

    def outbox_size(self) -> int:
        """Envelopes the relay has not yet accepted."""
        return len(self._outbox)

    async def flush(self, timeout: float) -> bool:
        """Wait until the relay has accepted everything in the outbox; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.outbox_size():
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # --- receiving ------------------------------------------------------------------------------------

    async def _on_frame(self, frame: LinkFrame) -> None:
        if isinstance(frame, Deliver):
            await self._on_deliver(frame)
        elif isinstance(frame, Accepted):
            self._outbox.accepted(frame.msg_id)
            self.delivery.accepted(frame.msg_id)
        elif isinstance(frame, CrlFeed):
            self.revocations.on_crl(frame.crl, self.certificate)
        elif isinstance(frame, Error):
            log.info("relay_error", extra={"fields": {"node": self.name, "code": frame.code, "text": frame.text}})
            if frame.msg_id is not None:
                self._emit(SecurityEvent("send_refused", None, f"relay: {frame.text}"))
                if frame.code == ErrorCode.UNKNOWN_RECIPIENT:
                    # Final: resending it on every reconnect would change nothing.
                    self._outbox.forget(frame.msg_id)
        # Other frame types from a relay are ignored: it cannot make us do anything with them.

    @property
    def revocation(self) -> RevocationState:
        """The CRLs verified so far (node/revocations.py)."""
        return self.revocations.state

    @property
    def revocation_check(self) -> handshake.RevocationCheck:
        """What vouches for peers at handshake time: OCSP answers if so configured, else the CRL feed."""
        return self.revocations.check

    async def _on_deliver(self, deliver: Deliver) -> None:
        if self._ocsp_gate is not None and self._ocsp_gate.holds(deliver):
            return  # handled once the responder has answered about its sender, off this loop (node/ocsp.py)
        await self._handle_deliver(deliver)

    async def _handle_deliver(self, deliver: Deliver) -> None:
        async with self._lock(deliver.sender):
            durable, shown = self._receive(deliver)
        # The link goes on reading while this one commits: the next deliveries join the batch. A
        # callback, not a task: the journal completes commits in order and their callbacks run in
        # that order, so the application sees events and messages in the order they happened.
        durable.add_done_callback(lambda fut: self._after_commit(deliver, shown, fut))

    def _after_commit(self, deliver: Deliver, shown: list[Delivered], durable: asyncio.Future[None]) -> None:
        if durable.cancelled():
            return
        if (error := durable.exception()) is not None:
            # The disk failed: say so, and neither show nor ACK it (the relay keeps it).
            log.error("commit_failed", extra={"fields": {"node": self.name, "error": str(error)}})
            return
        for item in shown:
            self._inbox.show(item)
        if self.connected and self._bundles.early_rotation_wanted():
            # The replay cache is filling or no one-time prekey is left: new initiators get a fresh prekey now.
            self._spawn(self._bundles.rotate_early(lambda: self._publish_prekeys(0, rotate=True)), "rotate")
        self._handled += 1
        # Processed and on disk (or refused for good): the relay may forget it.
        with contextlib.suppress(RelayUnreachable):
            self._link_send_nowait(Ack(deliver.msg_id))
        if self.sessions.get(deliver.sender).heartbeat_due and deliver.sender not in self._heartbeats:
            self._heartbeats.add(deliver.sender)
            self._spawn(self._heartbeat(deliver.sender), f"heartbeat-{deliver.sender}")

    def _receive(self, deliver: Deliver) -> tuple[asyncio.Future[None], list[Delivered]]:
        """Hand a delivery to its peer's engine (state changes in memory) and queue the commit of
        what it says must be durable, with what it says and carried; nothing blocks. Returns the
        commit and what the application is shown once it is done (events first, then the message)."""
        peer = deliver.sender
        now = self.clock()
        if self.refusal_budget.drops(peer, now):  # a flooding peer (issue #13): not even decoded
            return self._journal.commit({}, sync=False), []
        engine = self.sessions.get(peer)
        outcome = engine.receive(deliver.payload, now, self._local(), msg_id=deliver.msg_id)
        if outcome.refused:
            if engine.reset_due:
                self._start_reset(peer)
            told = self._tell(peer, outcome.events)
            if self.refusal_budget.refused(peer, now):
                minutes = int(QUARANTINE.total_seconds() // 60)
                flood = f"too many refused frames: {peer}'s frames are dropped unread for {minutes} min"
                told = self._tell(peer, [PeerEvent("peer_flooding", flood, outcome.events[-1].error)])
            if outcome.events[-1].error not in _NOT_ASKED_AGAIN:
                self.delivery.refused(peer, deliver.msg_id)  # (issue #14) nothing lost silently
            assert told is not None
            return told, []
        inbox: dict[Key, bytes] = {}
        events = [SecurityEvent(e.event, peer, e.reason, e.error, e.safety_number) for e in outcome.events]
        message: Message | None = None
        content: Body | None = None
        received = outcome.received
        if received is not None and received.kind is Kind.DATA:
            try:
                content = decode_body(received.data)
            except DecodeError:
                events.append(SecurityEvent("malformed_message", peer, "authentic but unreadable message body"))
            else:
                if isinstance(content, TextBody) and not self.history.has_received(peer, content.msg_id.hex()):
                    message = Message(content.msg_id.hex(), peer, content.text, content.sent_at / 1000)
                    entry = Entry(message.id, peer, "in", message.text, message.sent_at, State.RECEIVED)
                    self.history.add(entry, inbox)
        # What the application is told goes to disk in the same commit as the state that made it.
        shown: list[Delivered] = []
        for event in events:
            admitted = self._inbox.stage_event(event, now, inbox)
            if admitted is not None:
                shown.append(admitted)
        if message is not None:
            self._inbox.stage(message.to_json(), inbox)
            shown.append(message)
        # Not fsynced unless the engine says so (an accepted INIT: it consumed a one-time prekey or
        # entered the replay cache, and a power loss that forgot that would accept the same INIT again
        # once the relay re-sends it). After a power loss the last few received messages may be shown
        # again, but no key is ever reused: every send is fsynced, and an fsync makes all of this durable too.
        committed = self._commit(peer, outcome, inbox)
        if content is not None:
            self.delivery.received(peer, content, committed)  # receipts owed and taken, retry requests
        elif received is not None:
            self.delivery.heard(peer)
        return committed, shown

    async def _send_body(self, peer: str, data: bytes) -> bytes | None:
        """DATA `data` on the open session with `peer`, to the relay through the outbox (a receipt, a
        retry request, a re-sent message: node/receipts.py); its envelope id, or None if no session
        is open or sending to `peer` is held (node/trust.py)."""
        envelope = os.urandom(16)
        async with self._lock(peer):
            engine, record = self.sessions.get(peer), self.peer(peer)
            if self._needs_session(peer) or record is None:
                return None
            if self.trust.state(peer, record.identity) is TrustState.CHANGED:
                return None
            payload, durable = self._encrypt(peer, engine, data)
        if durable is not None:
            await durable
        self._queue_outbox(envelope, peer, payload)
        with contextlib.suppress(RelayUnreachable):
            await self._link_send(Send(envelope, peer, payload))
        return envelope

    async def _heartbeat(self, peer: str) -> None:
        msg_id = os.urandom(16)
        try:
            async with self._lock(peer):
                engine = self.sessions.get(peer)
                if not engine.heartbeat_due:
                    return
                payload, durable = self._encrypt(peer, engine, b"", Kind.HEARTBEAT)
        finally:
            self._heartbeats.discard(peer)
        if durable is not None:
            await durable
        self._queue_outbox(msg_id, peer, payload)
        with contextlib.suppress(RelayUnreachable):
            await self._link_send(Send(msg_id, peer, payload))

    def _start_reset(self, peer: str, *, force: bool = False) -> None:
        """The peer keeps sending on a session we do not hold (or ours were dropped): start a fresh one."""
        if peer in self._resetting or self._link is None:
            return
        self._resetting.add(peer)
        self._spawn(self._reset(peer, force), f"reset-{peer}")

    async def _reset(self, peer: str, force: bool = False) -> None:
        """A new handshake whose message 0 is a HEARTBEAT (nothing for the peer's user to read); its
        INIT outranks every session either side holds, so both land on it (PROTOCOL.md §8)."""
        try:
            if not force:
                why = "messages from this peer stopped authenticating: new handshake"
                self._emit(SecurityEvent("session_reset", peer, why))
            bundle = await self._fetch_bundle(peer)
            async with self._lock(peer):
                if not force and not self.sessions.get(peer).reset_due:
                    return  # something authenticated meanwhile (or a session came from the peer)
                payload, durable = self._initiate(peer, bundle, b"", Kind.HEARTBEAT)
            await durable
            msg_id = os.urandom(16)
            self._queue_outbox(msg_id, peer, payload)
            await self._link_send(Send(msg_id, peer, payload))
        except (ProtocolError, NodeError) as exc:
            log.info("session_reset_failed", extra={"fields": {"node": self.name, "peer": peer, "reason": str(exc)}})
        finally:
            self._resetting.discard(peer)

    # --- revocation -----------------------------------------------------------------------------------

    async def refresh_crl(self) -> bool:
        """Fetch the CA's /crl directly if the newest CRL held is older than `options.crl_max_age`
        (a relay may withhold the feed: issue #13); True if a newer CRL was accepted."""
        return await self.revocations.refresh(self.certificate)

    @property
    def revoked(self) -> Revoked | None:
        """Whether our own certificate is revoked, by the newest CRL we verified (issue #13)."""
        return self.revocations.own(self.certificate)

    def _close(self, name: str, reason: str) -> None:
        """End every session with a revoked peer: every later frame is refused, and the user is told."""
        outcome = self.sessions.get(name).close(reason)
        self._commit(name, outcome).add_done_callback(log_failure)
        self._tell(name, outcome.events)

    # --- events and inbox -----------------------------------------------------------------------------

    def _emit(self, event: SecurityEvent) -> asyncio.Future[None]:
        """Record a security event in the inbox; the application sees it once it is on disk."""
        return self._inbox.emit(event, self.clock())

    def deliveries(self) -> AsyncIterator[dict[str, Any]]:
        """The application's one delivery channel: `async for item in node.deliveries()` yields every
        stored message and security event, then each new one once it is on disk, in commit order
        (node/inbox.py); each is taken as it is yielded."""
        return self._inbox.deliveries()

    def take_inbox(self) -> list[dict[str, Any]]:
        """Every message and event received and not yet taken, oldest first; they are removed."""
        return self._inbox.take()

    def status(self) -> dict[str, Any]:
        """Identity, certificate, feed freshness, sessions and safety numbers (`kmsnet status --json`)."""
        return status(self)


#: Refusals that no re-send can cure, by error code: a copy of what arrived already, a replayed or
#: stale session start, a revoked peer (issue #14).
_NOT_ASKED_AGAIN = {e.code for e in (DuplicateMessage, ReplayedInitialMessage, StaleInit, CertificateRevoked)}
