"""The node: a thin asyncio shell around the protocol core and the encrypted keystore.

Everything a node knows lives in its keystore and is written *before* it acts on it:
a ratchet state covering a message (a reservation of message numbers, or a new session) is
fsynced before the ciphertext leaves the process (a crash can never make us reuse a message
key or a nonce), and a received message is committed to the inbox with the session's new
state before the application sees it and before the relay is told to forget it (nothing is
lost, and a redelivery is recognised by its id and acknowledged silently). An envelope the
relay has not accepted yet is kept in memory, and written to disk once `send` reports it
queued or the node stops (see `_queue_outbox`).

Keystore layout (namespace / name → sealed value):
    node/identity, node/certificate, node/root, node/relay, node/prekeys (the prekey account, its
    rotation schedule included), node/revocation, node/epoch, node/onetime_certificate (the
    certificate the relay's one-time prekeys are signed over), bundle/<spk id>, session/<peer> (the
    current session), archive/<peer> (the sessions it replaced, protocol/peer.py), peer/<peer>,
    outbox/<seq 20 digits>, inbox/<seq 20 digits>, seen/<peer>:<msg id hex>
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from node import crlfetch
from node.enrol import load_identity, renew_certificate, renewal_time
from node.epoch import EpochFile, epoch_path
from node.errors import NodeError, NodeRevoked, PeerUnavailable, RelayUnreachable, SelfSend, code_of
from node.eventbudget import MAX_STORED_EVENTS, QUARANTINE, EventBudget, RefusalBudget
from node.events import Delivered, Message, SecurityEvent
from node.history import Entry, History, State
from node.journal import Journal, Key
from node.keystore import Keystore
from node.layout import NS_ARCHIVE, NS_BUNDLE, NS_INBOX, NS_NODE, NS_OUTBOX, NS_PEER, NS_SEEN, NS_SESSION
from node.link import RelayLink, split_urls
from node.ocsp import OcspChecker
from node.pkcs11 import Pin, TokenIdentityKey
from node.selfrevoked import Revoked, own_revocation
from node.trust import Trust, certificate_key
from protocol import certs, handshake, wire
from protocol.body import TextBody
from protocol.body import decode as decode_body
from protocol.body import encode as encode_body
from protocol.errors import (
    CertificateRevoked,
    DecodeError,
    DuplicateMessage,
    ProtocolError,
    RevocationError,
    SessionClosed,
    UnknownPrekey,
)
from protocol.handshake import PrekeySecrets
from protocol.identity import KemKeyPair, X25519KeyPair
from protocol.link import Accepted, Ack, CrlFeed, Deliver, Error, ErrorCode, LinkFrame, PublishBundle, Send, Welcome
from protocol.messages import FrameType, InitMessage, PrekeyBundle, Suite
from protocol.peer import Conversation, revoked_serial
from protocol.revocation import RevocationState
from protocol.safety import safety_number
from protocol.session import Kind, Session

log = logging.getLogger("kmsnet.node")


#: One-time prekeys uploaded per batch, and the level below which the node tops up.
ONETIME_BATCH = 100
ONETIME_LOW = 25
#: Sending message numbers reserved per durable write (well under the peer's MAX_SKIP).
RESERVE_AHEAD = 64
#: Seconds between checks for a due signed-prekey rotation while connected.
MAINTENANCE_INTERVAL = 60.0
#: Received message ids remembered per peer to tell a redelivery from a replay.
MAX_SEEN_PER_PEER = 5000
#: Earlier certificate serials remembered per peer identity key (renewals overlap by a few).
MAX_SERIALS = 16


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class NodeOptions:
    """Policy knobs (the command line and the lab set them)."""

    #: Signed prekeys rotate this often; the old one is kept for `prekey_grace` so that INITs in flight open.
    prekey_rotation: timedelta = timedelta(days=7)
    prekey_grace: timedelta = timedelta(days=2)
    #: Handshake suite we initiate with and suites we accept.
    suite: Suite = Suite.HYBRID
    accept_suites: tuple[Suite, ...] = (Suite.HYBRID,)
    #: Publish an ML-KEM prekey (False only for the harvest-now scenario's classic variant).
    publish_kem: bool = True
    #: Seconds to wait for the relay to accept a sent envelope before `send` returns queued.
    send_timeout: float = 10.0
    #: Check peers by OCSP at this URL (the CA's responder) instead of the CRL feed.
    ocsp_url: str | None = None
    #: Keep what arrives in the keystore's inbox until `take_inbox` (the `receive` and `chat` commands
    #: read it). An application that reads only `events` turns it off, or the inbox only grows.
    inbox: bool = True
    #: The PIN of the PKCS#11 token holding a token-backed node's identity key (None: from the
    #: environment, `node.pkcs11.environment_pin`). Never stored.
    pin: Pin | None = field(default=None, repr=False)
    #: INSECURE when False (only for the relay-forwarding scenario's "before"): answer a CHALLENGE
    #: naming another relay than the one dialled (node/link.py).
    check_relay_name: bool = True
    #: Fetch the CRL from the CA directly when the newest one held is older than this (node/crlfetch.py).
    crl_max_age: timedelta = crlfetch.DEFAULT_MAX_AGE


@dataclass(slots=True)
class _Outgoing:
    """An envelope sent but not yet accepted by the relay (see `Node._queue_outbox`)."""

    name: str
    to: str
    payload: bytes
    on_disk: bool = False


@dataclass(frozen=True)
class PeerRecord:
    """What we know of a peer we have a session with."""

    name: str
    serial: int
    fingerprint: bytes
    identity: bytes
    state: str
    #: The peer's certificate (DER) the current session was made under: it ends at its notAfter,
    #: and an OCSP responder can be asked about it later.
    certificate: bytes
    #: Serials of the peer's earlier certificates for the same identity key (newest first): a CRL
    #: listing any of them ends the sessions too (PROTOCOL.md §10.5).
    serials: tuple[int, ...] = ()

    def pack(self) -> bytes:
        return msgpack.packb(
            [
                self.name,
                self.serial.to_bytes(20, "big"),
                self.fingerprint,
                self.identity,
                self.state,
                self.certificate,
                [s.to_bytes(20, "big") for s in self.serials],
            ]
        )

    @classmethod
    def unpack(cls, data: bytes) -> PeerRecord:
        name, serial, fp, identity, state, certificate, *rest = msgpack.unpackb(data)
        serials = tuple(int.from_bytes(s, "big") for s in rest[0]) if rest else ()  # none before the field existed
        return cls(name, int.from_bytes(serial, "big"), fp, identity, state, certificate, serials)

    @property
    def not_after(self) -> datetime:
        """When the certificate the current session was made under expires (and the session with it)."""
        return _not_after(self.certificate)


@functools.lru_cache(maxsize=256)
def _not_after(certificate: bytes) -> datetime:
    return x509.load_der_x509_certificate(certificate).not_valid_after_utc


class Node:
    """An enrolled node. `await node.start()`, then `send`, and read `events`; `await node.stop()`."""

    def __init__(
        self,
        keystore: Keystore,
        *,
        relay_url: str | None = None,
        options: NodeOptions | None = None,
        clock: Callable[[], datetime] = _utcnow,
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
        state = keystore.get(NS_NODE, "revocation")
        self.revocation = RevocationState.from_bytes(state, self.root, clock()) if state else RevocationState()
        self._ocsp = OcspChecker(self.options.ocsp_url, self.root) if self.options.ocsp_url else None
        packed = keystore.get(NS_NODE, "prekeys")
        self.prekeys = PrekeySecrets.from_bytes(packed) if packed else PrekeySecrets()
        self.events: asyncio.Queue[Delivered] = asyncio.Queue()
        #: Called with what each `take_inbox` took: other readers of this node (the control socket's
        #: `receive` requests) see what the application took.
        self.inbox_listeners: list[Callable[[list[dict[str, Any]]], None]] = []
        self._conversations: dict[str, Conversation] = {}
        # Peers a fresh handshake is being started with by itself (protocol/peer.py, reset_due).
        self._resetting: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        # Sends waiting for ACCEPTED: msg_id → (deadline on the loop's clock, future), oldest first.
        self._accepted: dict[bytes, tuple[float, asyncio.Future[None]]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self._link: RelayLink | None = None
        self._link_task: asyncio.Task[None] | None = None
        self._journal = Journal(keystore)
        self._maintenance: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Peers a heartbeat is being sent to (one at a time is enough).
        self._heartbeats: set[str] = set()
        # An early signed-prekey rotation is under way (one at a time).
        self._rotating = False
        self._seen: dict[str, dict[bytes, None]] = {}
        self._peers: dict[str, PeerRecord | None] = {}
        self._reservations: dict[str, asyncio.Future[None]] = {}
        self._inbox_seq = _last_seq(keystore.names(NS_INBOX))
        #: Every message sent and received, with its delivery state (node/history.py).
        self.history = History(keystore, clock)
        #: The peers' identity keys the user verified (node/trust.py).
        self.trust = Trust(keystore, lambda: self.identity.public_bytes)
        #: Security events coalesced per peer, and how many the stored inbox holds (issue #13).
        self.event_budget = EventBudget()
        self.refusal_budget = RefusalBudget()
        self._stored_events: int | None = None
        outbox = keystore.names(NS_OUTBOX)
        self._outbox_seq = _last_seq(outbox)
        # msg_id → envelope, in the order they were sent (records left on disk by an earlier run first).
        self._outbox: dict[bytes, _Outgoing] = {}
        for name in outbox:
            packed = keystore.get(NS_OUTBOX, name)
            if packed is not None:
                msg_id, to, payload = msgpack.unpackb(packed)
                self._outbox[msg_id] = _Outgoing(name, to, payload, on_disk=True)
        # Deliveries handled since the link came up, against what the relay said was waiting.
        self._handled = 0
        self._waiting = 0
        # The rollback detector (node/epoch.py): the keystore's counter against the file's.
        self._epoch_file = EpochFile(epoch_path(keystore.path))
        held = keystore.get(NS_NODE, "epoch")
        self._epoch = int(held.decode()) if held is not None else 0
        self._rolled_back = self._epoch < self._epoch_file.read()
        self._epoch = max(self._epoch, self._epoch_file.read())
        # Peers to start a new session with once connected (their sessions were dropped).
        self._rehandshake: list[str] = []

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
        )
        self._journal.start()
        if self._rolled_back:
            self._drop_sessions()
        # A copy of the keystore taken before this start is recognised as older from now on.
        await self._with_epoch({})
        self._maintenance = asyncio.create_task(self._maintain(), name=f"node-maintenance-{self.name}")
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
        if self._link is not None:
            await self._link.close()
        if self._link_task is not None:
            self._link_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._link_task
            self._link_task = None
        for _, fut in self._accepted.values():
            if not fut.done():
                fut.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._outbox:
            # Whatever the relay has not accepted is sent again on the next start.
            self._persist_outbox().add_done_callback(_log_failure)
        await self._journal.close()
        await self._epoch_file.close()
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
        await self._publish_prekeys(welcome.onetime)
        for peer in self._rehandshake:
            self._start_reset(peer, force=True)
        self._rehandshake.clear()
        # Resend what the relay has not accepted, in the order it was first sent.
        for msg_id, envelope in list(self._outbox.items()):
            await self._link_send(Send(msg_id, envelope.to, envelope.payload))

    def _rotate_early(self) -> None:
        """The replay cache of our newest signed prekey is filling, or no one-time prekey is left
        (protocol/prekeys.py): rotate and publish now, so that new initiators get a fresh prekey."""
        if not self.connected:
            return
        self._rotating = True

        async def rotate() -> None:
            try:
                await self._publish_prekeys(onetime_left=0, rotate=True)
            except (RelayUnreachable, ProtocolError, NodeError) as exc:
                log.info("early_rotation_failed", extra={"fields": {"node": self.name, "reason": str(exc)}})
            finally:
                self._rotating = False

        task = asyncio.create_task(rotate(), name=f"node-rotate-{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _maintain(self) -> None:
        """While running: rotate the signed prekey when it is due (not only at connect time, so that a
        node connected for weeks never publishes a bundle initiators refuse as too old)."""
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
            await self.renew_if_due()
            await self.refresh_crl()
            if self.connected and self._rotation_due(self.clock()):
                with contextlib.suppress(RelayUnreachable):
                    await self._publish_prekeys(onetime_left=ONETIME_LOW)
            if self._ocsp is not None:
                await self._recheck_by_ocsp()

    async def _recheck_by_ocsp(self) -> None:
        """In OCSP mode the feed may never tell: ask again about every peer with an open session."""
        assert self._ocsp is not None
        for name, conversation in list(self._conversations.items()):
            record = self.peer(name)
            session = conversation.current
            if session is None or session.closed or record is None:
                continue
            try:
                answer = await self._ocsp.refresh(record.certificate, self.clock())
            except ProtocolError as exc:
                log.info("ocsp_recheck_failed", extra={"fields": {"peer": name, "reason": str(exc)}})
                continue
            if answer.status == "revoked":
                self._close_revoked(name, record, answer.reason or "revoked")

    def _rotation_due(self, now: datetime) -> bool:
        """Due by the prekey account's schedule, or our newest bundle is signed over another
        certificate than ours (after a renewal or a re-key: it verifies for nobody)."""
        if self.prekeys.rotation_due(now.timestamp()) or not self.keystore.names(NS_BUNDLE):
            return True
        return self._current_bundle().certificate != self.certificate

    async def _publish_prekeys(self, onetime_left: int, *, rotate: bool = False) -> None:
        now = self.clock()
        rotated = self._rotate_signed_prekey(now, force=rotate)
        new_onetime = []
        # One-time prekeys are signed over our certificate: after a renewal or a re-key (online or
        # not, in this process or another) the relay's stock verifies for nobody, and is replaced.
        replace = self.keystore.get(NS_NODE, "onetime_certificate") != self.fingerprint
        if onetime_left < ONETIME_LOW or rotated or replace:
            start = self.prekeys.next_onetime_id
            for key_id in range(start, start + ONETIME_BATCH):
                key = X25519KeyPair.generate()
                self.prekeys.add_onetime(key_id, key)
                new_onetime.append(handshake.make_onetime(self.identity, self.certificate, key_id, key))
        current = self._current_bundle()
        with self.keystore.transaction():
            self.keystore.put(NS_NODE, "prekeys", self.prekeys.to_bytes())
        upload = [[o.key_id, o.public, o.signature] for o in new_onetime]
        assert self._link is not None
        await self._link.send(PublishBundle(wire.encode(current), upload, int(replace)))
        if replace:
            self._journal.commit({(NS_NODE, "onetime_certificate"): self.fingerprint}).add_done_callback(_log_failure)

    def _current_bundle(self) -> PrekeyBundle:
        ids = sorted(int(n) for n in self.keystore.names(NS_BUNDLE))
        packed = self.keystore.get(NS_BUNDLE, str(ids[-1]))
        assert packed is not None
        frame = wire.decode(packed)
        assert isinstance(frame, PrekeyBundle)
        return frame

    def _rotate_signed_prekey(self, now: datetime, *, force: bool = False) -> bool:
        """Make a new signed prekey when due (or `force`d); destroy ones past their grace period. True if rotated."""
        if not force and not self._rotation_due(now):
            return False
        ids = self.prekeys.signed_ids()
        spk_id = (ids[-1] + 1) if ids else 1
        spk = X25519KeyPair.generate()
        kem = KemKeyPair.generate() if self.options.publish_kem else None
        bundle = handshake.make_bundle(
            self.identity,
            self.certificate,
            created=int(now.timestamp()),
            spk_id=spk_id,
            spk=spk,
            kem_id=spk_id if kem else None,
            kem=kem,
        )
        self.prekeys.add_signed(spk_id, spk)
        if kem is not None:
            self.prekeys.add_kem(spk_id, kem)
        # The schedule lives in the prekey account (protocol/prekeys.py); old prekeys stay for the
        # grace period after the rotation that replaced them.
        destroyed = self.prekeys.rotated(
            spk_id,
            now.timestamp(),
            every=self.options.prekey_rotation.total_seconds(),
            grace=self.options.prekey_grace.total_seconds(),
        )
        with self.keystore.transaction():
            for old in destroyed:
                self.keystore.delete(NS_BUNDLE, str(old))
            # Records of the schedule kept outside the account by earlier versions.
            for name in ("next_prekey_rotation", *self.keystore.names(NS_NODE, "spk_expiry/")):
                self.keystore.delete(NS_NODE, name)
            self.keystore.put(NS_BUNDLE, str(spk_id), wire.encode(bundle))
            self.keystore.put(NS_NODE, "prekeys", self.prekeys.to_bytes())
        log.info("signed_prekey_rotated", extra={"fields": {"node": self.name, "spk_id": spk_id}})
        return True

    # --- sending --------------------------------------------------------------------------------------

    def _lock(self, peer: str) -> asyncio.Lock:
        lock = self._locks.get(peer)
        if lock is None:
            lock = self._locks[peer] = asyncio.Lock()
        return lock

    def _conversation(self, peer: str) -> Conversation:
        conversation = self._conversations.get(peer)
        if conversation is None:
            current = self.keystore.get(NS_SESSION, peer)
            archive = self.keystore.get(NS_ARCHIVE, peer)
            conversation = self._conversations[peer] = Conversation(
                Session.from_bytes(current) if current is not None else None,
                Conversation.archive_from_bytes(archive) if archive is not None else [],
            )
        return conversation

    def _session(self, peer: str) -> Session | None:
        return self._conversation(peer).current

    def peer(self, name: str) -> PeerRecord | None:
        """What we know of `name`, if we ever had a session."""
        if name not in self._peers:
            packed = self.keystore.get(NS_PEER, name)
            self._peers[name] = PeerRecord.unpack(packed) if packed else None
        return self._peers[name]

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
                session = self._session(peer)
                if session is None or session.closed:
                    if bundle is not None:
                        self.trust.check_send(peer, certificate_key(bundle.certificate))
                        payload, durable = self._initiate(peer, bundle, body)
                    # else: the session went away while we waited; fetch a bundle after all.
                else:
                    if (record := self.peer(peer)) is not None:
                        self.trust.check_send(peer, record.identity)
                    durable = self._reserve(peer, session)
                    payload = session.encrypt(body)
        history: dict[Key, bytes] = {}
        self.history.add(Entry(msg_id.hex(), peer, "out", text, self.clock().timestamp(), State.SENDING), history)
        recorded = self._journal.commit(history, sync=False)
        if durable is not None:
            # Outside the lock, so that other sends can join the same commit. The ciphertext leaves
            # only once a state that covers it is on disk (fsynced): a reservation or a new session.
            await durable
        await recorded
        accepted = self._await_accepted(msg_id)
        self._queue_outbox(msg_id, peer, payload)
        try:
            await self._link_send(Send(msg_id, peer, payload))
            await accepted
        except (TimeoutError, RelayUnreachable):
            # The user is told "queued": from now on the envelope must survive even a power loss.
            await self._persist_outbox()
            log.info("send_queued", extra={"fields": {"node": self.name, "to": peer}})
        finally:
            self._accepted.pop(msg_id, None)
        return msg_id.hex()

    def _await_accepted(self, msg_id: bytes) -> asyncio.Future[None]:
        """A future the relay's ACCEPTED for `msg_id` completes, or TimeoutError after `send_timeout`.

        One timer per node, armed for the oldest waiting send, instead of one per send: every send
        waits as long, so deadlines come in the order sends do.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        deadline = loop.time() + self.options.send_timeout
        self._accepted[msg_id] = (deadline, fut)
        if self._expiry is None:
            self._expiry = loop.call_at(deadline, self._expire_sends)
        return fut

    def _expire_sends(self) -> None:
        loop = asyncio.get_running_loop()
        self._expiry = None
        now = loop.time()
        expired = []
        for msg_id, (deadline, fut) in self._accepted.items():
            if deadline > now:
                self._expiry = loop.call_at(deadline, self._expire_sends)
                break
            expired.append(msg_id)
            if not fut.done():
                fut.set_exception(TimeoutError())
        for msg_id in expired:
            del self._accepted[msg_id]

    def _reserve(self, peer: str, session: Session) -> asyncio.Future[None] | None:
        """Reserve message numbers ahead on `session`; what the caller must await before sending.

        A new reservation is committed with fsync (see `Ratchet.reserve`), and no message inside
        it may leave before that commit is done — also not the ones encrypted by other sends while
        it is still running, which is why the pending commit is remembered per peer.
        """
        if session.reserve(RESERVE_AHEAD):
            durable = self._save_session(peer)
            self._reservations[peer] = durable
            return durable
        pending = self._reservations.get(peer)
        # A reservation whose commit failed covers nothing: those waiting on it fail with it.
        return pending if pending is not None and not _succeeded(pending) else None

    def _queue_outbox(self, msg_id: bytes, to: str, payload: bytes) -> None:
        """Keep an envelope until the relay accepts it, to resend it after a reconnect.

        In memory only, at first: while the relay answers within moments (nearly always), writing
        it and deleting it again would cost two disk writes per message for nothing. It is written
        once somebody is told it is queued (`send` timing out, or the relay down) and when the node
        stops. A crash before that loses only envelopes whose `send` had not returned yet.
        """
        self._outbox_seq += 1
        self._outbox[msg_id] = _Outgoing(f"{self._outbox_seq:020d}", to, payload)

    def _persist_outbox(self) -> asyncio.Future[None]:
        """Write every envelope still waiting for the relay to disk, fsynced (sends them on a restart)."""
        puts: dict[Key, bytes] = {}
        for msg_id, envelope in self._outbox.items():
            if not envelope.on_disk:
                puts[(NS_OUTBOX, envelope.name)] = msgpack.packb([msg_id, envelope.to, envelope.payload])
                envelope.on_disk = True
        return self._journal.commit(puts, sync=True)

    def _needs_session(self, peer: str) -> bool:
        session = self._expire(peer).current
        return session is None or session.closed is not None

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
        self, peer: str, frame: PrekeyBundle, body: bytes, kind: Kind = Kind.DATA
    ) -> tuple[bytes, asyncio.Future[None]]:
        try:
            self._refuse_revoked_identity(peer, frame.certificate)
            started = handshake.initiate(
                identity=self.identity,
                certificate=self.certificate,
                bundle=frame,
                root=self.root,
                revocation=self.revocation_check,
                now=self.clock(),
                expected_name=peer,
                first_message=body,
                first_kind=kind,
                suite=self.options.suite,
            )
        except ProtocolError as exc:
            self._emit(SecurityEvent("session_refused", peer, str(exc), code_of(exc)))
            raise
        puts: dict[Key, bytes] = {}
        previous = self.peer(peer)
        self._note_peer(started.peer, "initiated", puts)
        self._conversation(peer).adopt(started.session)
        self._stage_conversation(peer, puts)
        durable = self._unless_durable(peer, self._with_epoch(puts))
        self._established(peer, previous, started.peer, f"initiated ({Suite(started.session.suite).name})")
        return started.frame, durable

    def _established(
        self, peer: str, previous: PeerRecord | None, verified: certs.VerifiedCertificate, how: str
    ) -> None:
        """Tell the application of a new session, and first of a new identity key (either side started it)."""
        new_identity = verified.public_key.public_bytes_raw()
        number = safety_number(self.identity.public_bytes, new_identity)
        if previous is not None and previous.identity != new_identity:
            changed = f"new identity key; new safety number {number}"
            self._emit(SecurityEvent("identity_changed", peer, changed, safety_number=number))
        self._emit(SecurityEvent("session_established", peer, f"{how}; safety number {number}", safety_number=number))

    def _stage_conversation(self, peer: str, puts: dict[Key, bytes]) -> None:
        """Add the state of every session held with `peer` to a commit being prepared."""
        conversation = self._conversation(peer)
        if conversation.current is not None:
            puts[(NS_SESSION, peer)] = conversation.current.to_bytes()
        puts[(NS_ARCHIVE, peer)] = conversation.archive_bytes()

    def _save_session(self, peer: str) -> asyncio.Future[None]:
        """Commit the sessions held with `peer`, fsynced (with the next rollback epoch)."""
        puts: dict[Key, bytes] = {}
        self._stage_conversation(peer, puts)
        return self._unless_durable(peer, self._with_epoch(puts))

    def _with_epoch(self, puts: dict[Key, bytes], deletes: list[Key] | None = None) -> asyncio.Future[None]:
        """Commit `puts` fsynced together with the next rollback epoch, which the epoch file then follows."""
        self._epoch += 1
        value = self._epoch
        puts[(NS_NODE, "epoch")] = str(value).encode()
        durable = self._journal.commit(puts, deletes or [], sync=True)
        durable.add_done_callback(lambda fut: self._epoch_file.advance(value) if _succeeded(fut) else None)
        return durable

    def _drop_sessions(self) -> None:
        """The keystore is older than its epoch (restored from a backup): no session in it may encrypt
        again. Drop them all, tell the application, and start new ones once connected."""
        peers = sorted(set(self.keystore.names(NS_SESSION)) | set(self.keystore.names(NS_ARCHIVE)))
        with self.keystore.transaction():
            for peer in peers:
                self.keystore.delete(NS_SESSION, peer)
                self.keystore.delete(NS_ARCHIVE, peer)
        self._conversations.clear()
        self._rehandshake = peers
        self._emit(
            SecurityEvent(
                "state_rollback",
                None,
                f"this node's keystore is older than its last durable state (restored from a backup?): "
                f"{len(peers)} session(s) dropped, new handshakes started",
            )
        )

    def _unless_durable(self, peer: str, durable: asyncio.Future[None]) -> asyncio.Future[None]:
        """Forget the sessions held with `peer` in memory if the commit of their state fails: the next
        use reloads the last durable state. Encrypting on from a state that never reached the disk would,
        after a restart, send other plaintexts under message numbers that already left: the same (key, nonce)."""
        conversation = self._conversations.get(peer)

        def check(fut: asyncio.Future[None]) -> None:
            if not _succeeded(fut) and self._conversations.get(peer) is conversation:
                del self._conversations[peer]
                log.error("session_not_saved", extra={"fields": {"node": self.name, "peer": peer}})

        durable.add_done_callback(check)
        return durable

    def _link_send_nowait(self, frame: LinkFrame) -> None:
        if self._link is None:
            raise RelayUnreachable("node not started")
        self._link.send_nowait(frame)

    async def _link_send(self, frame: LinkFrame) -> None:
        if self._link is None:
            raise RelayUnreachable("node not started")
        await self._link.send(frame)

    def _forget_outbox(self, msg_id: bytes) -> None:
        envelope = self._outbox.pop(msg_id, None)
        if envelope is not None and envelope.on_disk:
            # No need to wait: were the delete lost in a crash, the resend is deduplicated by the relay.
            self._journal.commit({}, [(NS_OUTBOX, envelope.name)], sync=False).add_done_callback(_log_failure)

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
            self._forget_outbox(frame.msg_id)
            stored: dict[Key, bytes] = {}
            if self.history.mark(frame.msg_id.hex(), State.STORED, stored):
                self._journal.commit(stored, sync=False).add_done_callback(_log_failure)
            waiting = self._accepted.pop(frame.msg_id, None)
            if waiting is not None and not waiting[1].done():
                waiting[1].set_result(None)
        elif isinstance(frame, CrlFeed):
            self._on_crl(frame.crl)
        elif isinstance(frame, Error):
            log.info("relay_error", extra={"fields": {"node": self.name, "code": frame.code, "text": frame.text}})
            if frame.msg_id is not None:
                self._emit(SecurityEvent("send_refused", None, f"relay: {frame.text}"))
                if frame.code == ErrorCode.UNKNOWN_RECIPIENT:
                    # Final: resending it on every reconnect would change nothing.
                    self._forget_outbox(frame.msg_id)
        # Other frame types from a relay are ignored: it cannot make us do anything with them.

    @property
    def revocation_check(self) -> handshake.RevocationCheck:
        """What vouches for peers at handshake time: OCSP answers if so configured, else the CRL feed."""
        return self._ocsp if self._ocsp is not None else self.revocation

    async def _on_deliver(self, deliver: Deliver) -> None:
        if self._ocsp is not None:
            # Ask the responder about the sender of an INIT before handling it (never under the lock).
            with contextlib.suppress(ProtocolError):
                if wire.frame_type(deliver.payload) is FrameType.INIT:
                    await self._ocsp.ensure(handshake.decode_init(deliver.payload).certificate, self.clock())
        async with self._lock(deliver.sender):
            durable, message = self._receive(deliver)
        # The link goes on reading while this one commits: the next deliveries join the batch. A
        # callback, not a task: the journal completes commits in order and their callbacks run in
        # that order, so the application sees events and messages in the order they happened.
        durable.add_done_callback(lambda fut: self._after_commit(deliver, message, fut))

    def _after_commit(self, deliver: Deliver, message: Message | None, durable: asyncio.Future[None]) -> None:
        if durable.cancelled():
            return
        if (error := durable.exception()) is not None:
            # The disk failed: say so, and neither show nor ACK it (the relay keeps it).
            log.error("commit_failed", extra={"fields": {"node": self.name, "error": str(error)}})
            return
        if message is not None:
            self.events.put_nowait(message)
        if self.prekeys.rotation_wanted() and not self._rotating:
            self._rotate_early()
        self._handled += 1
        # Processed and on disk (or refused for good): the relay may forget it.
        with contextlib.suppress(RelayUnreachable):
            self._link_send_nowait(Ack(deliver.msg_id))
        session = self._session(deliver.sender)
        if session is not None and session.heartbeat_due and deliver.sender not in self._heartbeats:
            self._heartbeats.add(deliver.sender)
            task = asyncio.create_task(self._heartbeat(deliver.sender, session))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _seen_ids(self, peer: str) -> dict[bytes, None]:
        seen = self._seen.get(peer)
        if seen is None:
            names = self.keystore.names(NS_SEEN, f"{peer}:")
            seen = self._seen[peer] = {bytes.fromhex(n.rsplit(":", 1)[1]): None for n in names}
        return seen

    def _receive(self, deliver: Deliver) -> tuple[asyncio.Future[None], Message | None]:
        """Decrypt a delivery (state changes in memory) and queue its commit; nothing blocks."""
        peer = deliver.sender
        if self.refusal_budget.drops(peer, self.clock()):  # a flooding peer (issue #13): not even decoded
            return self._journal.commit({}, sync=False), None
        seen = self._seen_ids(peer)
        if deliver.msg_id in seen:
            # A redelivery of something already processed: acknowledge, say nothing.
            return self._journal.commit({}, sync=False), None
        puts: dict[Key, bytes] = {}
        try:
            kind = wire.frame_type(deliver.payload)
            if kind is FrameType.INIT:
                received = self._respond(peer, deliver.payload, puts)
            elif kind is FrameType.MESSAGE:
                conversation = self._expire(peer)
                received, session = conversation.decrypt(wire.decode_message(deliver.payload))
                record = self.peer(peer)
                if record is not None and record.state == "initiated" and session is conversation.current:
                    # The first reply: both sides hold the session now.
                    self._stage_peer(replace(record, state="established"), puts)
            else:
                raise DecodeError(f"a {kind.name} frame is not a message")
        except ProtocolError as exc:
            if self._conversation(peer).reset_due:
                self._start_reset(peer)
            if self.refusal_budget.refused(peer, self.clock()):
                minutes = int(QUARANTINE.total_seconds() // 60)
                flood = f"too many refused frames: {peer}'s frames are dropped unread for {minutes} min"
                self._emit(SecurityEvent("peer_flooding", peer, flood, code_of(exc)))
            return self._emit(SecurityEvent(_event_name(exc), peer, str(exc), code_of(exc))), None
        message: Message | None = None
        if received.kind is Kind.DATA:
            try:
                content = decode_body(received.data)
            except DecodeError:
                self._emit(SecurityEvent("malformed_message", peer, "authentic but unreadable message body"))
            else:
                if isinstance(content, TextBody) and not self.history.has_received(peer, content.msg_id.hex()):
                    message = Message(content.msg_id.hex(), peer, content.text, content.sent_at / 1000)
                    entry = Entry(message.id, peer, "in", message.text, message.sent_at, State.RECEIVED)
                    self.history.add(entry, puts)
        self._stage_conversation(peer, puts)
        puts[(NS_SEEN, f"{peer}:{deliver.msg_id.hex()}")] = b""
        seen[deliver.msg_id] = None
        if message is not None:
            self._to_inbox(message.to_json(), puts)
        # Not fsynced: after a power loss the last few received messages may be shown again, but no
        # key is ever reused, because every send is fsynced, and an fsync makes all of this durable too.
        # An accepted INIT is fsynced: it consumed a one-time prekey (or entered the replay cache),
        # and a power loss that forgot that would accept the same INIT again once the relay re-sends it.
        if kind is FrameType.INIT:
            committed = self._with_epoch(puts, self._prune_seen(peer))
        else:
            committed = self._journal.commit(puts, self._prune_seen(peer), sync=False)
        return self._unless_durable(peer, committed), message

    def _respond(self, peer: str, payload: bytes, puts: dict[Key, bytes]) -> Any:
        init = handshake.decode_init(payload)
        bundle = self._bundle_for(init)
        previous = self.peer(peer)
        self._refuse_revoked_identity(peer, init.certificate)
        conversation = self._conversation(peer)
        # A held or delayed INIT is refused before it consumes a prekey; a crossing one is accepted
        # (protocol/peer.py decides which session stays current, the same way on both sides).
        confirmed = previous is not None and previous.state == "established"
        conversation.check_init(init.created, hashlib.sha256(init.certificate).digest(), confirmed=confirmed)
        result = handshake.respond(
            init,
            identity=self.identity,
            certificate_fingerprint=self.fingerprint,
            bundle=bundle,
            prekeys=self.prekeys,
            root=self.root,
            revocation=self.revocation_check,
            now=self.clock(),
            allowed_suites=self.options.accept_suites,
            expected_name=peer,
        )
        # The consumed one-time prekey goes to disk with the session it made, in one commit.
        puts[(NS_NODE, "prekeys")] = self.prekeys.to_bytes()
        if not conversation.adopt(result.session):
            # A crossing INIT that our own outranks: its message is delivered, our session stays.
            log.info("crossing_init_archived", extra={"fields": {"node": self.name, "peer": peer}})
            return result.first
        self._note_peer(result.peer, "established", puts)
        self._established(peer, previous, result.peer, f"accepted ({Suite(result.session.suite).name})")
        return result.first

    def _bundle_for(self, init: InitMessage) -> PrekeyBundle:
        packed = self.keystore.get(NS_BUNDLE, str(init.spk_id))
        if packed is None:
            raise UnknownPrekey(f"signed prekey {init.spk_id} is not ours (rotated out?)")
        frame = wire.decode(packed)
        assert isinstance(frame, PrekeyBundle)
        return frame

    def _note_peer(self, cert: certs.VerifiedCertificate, state: str, puts: dict[Key, bytes]) -> None:
        identity = cert.public_key.public_bytes_raw()
        previous = self.peer(cert.name)
        serials: tuple[int, ...] = ()
        if previous is not None and previous.identity == identity:
            # A renewal: the earlier certificates of this key still count for revocation.
            serials = tuple(s for s in dict.fromkeys((previous.serial, *previous.serials)) if s != cert.serial)
        record = PeerRecord(cert.name, cert.serial, cert.fingerprint, identity, state, cert.der, serials[:MAX_SERIALS])
        self._stage_peer(record, puts)

    def _refuse_revoked_identity(self, peer: str, certificate: bytes) -> None:
        """Refuse a peer certificate whose identity key an earlier, revoked certificate of the peer
        had: a renewal does not escape a revocation (PROTOCOL.md §10.5)."""
        record = self.peer(peer)
        crl = self.revocation.current
        if record is None or crl is None:
            return
        try:
            key = x509.load_der_x509_certificate(certificate).public_key()
            identity = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        except (ValueError, TypeError):
            return  # not a usable certificate: the handshake's own checks refuse it
        serial = revoked_serial((record.serial, *record.serials), crl.revoked) if identity == record.identity else None
        if serial is not None:
            raise CertificateRevoked(serial, "an earlier certificate of the same identity key")

    def _expire(self, peer: str) -> Conversation:
        """The conversation with `peer`, its sessions ended if the certificate they were made under expired."""
        conversation = self._conversation(peer)
        record = self.peer(peer)
        if record is not None and conversation.expire(self.clock(), record.not_after):
            log.info("session_expired", extra={"fields": {"node": self.name, "peer": peer}})
        return conversation

    def _stage_peer(self, record: PeerRecord, puts: dict[Key, bytes]) -> None:
        puts[(NS_PEER, record.name)] = record.pack()
        self._peers[record.name] = record

    def _prune_seen(self, peer: str) -> list[Key]:
        """Forget the oldest remembered ids past twice the bound (an old id that comes back is refused
        by the ratchet anyway: it only tells a redelivery from a replay)."""
        seen = self._seen_ids(peer)
        if len(seen) <= MAX_SEEN_PER_PEER * 2:
            return []
        drop = list(seen)[: len(seen) - MAX_SEEN_PER_PEER]
        for msg_id in drop:
            del seen[msg_id]
        return [(NS_SEEN, f"{peer}:{m.hex()}") for m in drop]

    async def _heartbeat(self, peer: str, session: Session) -> None:
        msg_id = os.urandom(16)
        try:
            async with self._lock(peer):
                if not session.heartbeat_due or session.closed:
                    return
                durable = self._reserve(peer, session)
                payload = session.encrypt(b"", kind=Kind.HEARTBEAT)
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
        task = asyncio.create_task(self._reset(peer, force), name=f"node-reset-{peer}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reset(self, peer: str, force: bool = False) -> None:
        """A new handshake whose message 0 is a HEARTBEAT (nothing for the peer's user to read); its
        INIT outranks every session either side holds, so both land on it (PROTOCOL.md §8)."""
        try:
            if not force:
                why = "messages from this peer stopped authenticating: new handshake"
                self._emit(SecurityEvent("session_reset", peer, why))
            bundle = await self._fetch_bundle(peer)
            async with self._lock(peer):
                if not force and not self._conversation(peer).reset_due:
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
        ca_url = self.keystore.get(NS_NODE, "ca_url")
        if ca_url is None or not crlfetch.due(self.revocation.current, self.clock(), self.options.crl_max_age):
            return False
        before = self.revocation.highest_number
        try:
            self._on_crl(await crlfetch.fetch(ca_url.decode()))
        except crlfetch.CrlFetchFailed as exc:
            log.info("crl_fetch_failed", extra={"fields": {"node": self.name, "reason": str(exc)}})
            return False
        return self.revocation.highest_number != before

    @property
    def revoked(self) -> Revoked | None:
        """Whether our own certificate is revoked, by the newest CRL we verified (issue #13)."""
        serial = x509.load_der_x509_certificate(self.certificate).serial_number
        return own_revocation(self.revocation.current, serial)

    def _on_crl(self, der: bytes) -> None:
        now = self.clock()
        previous = self.revocation.current
        try:
            before = self.revocation.highest_number
            crl = self.revocation.accept(der, self.root, now)
        except RevocationError as exc:
            self._emit(SecurityEvent(_event_name(exc), None, f"CRL refused: {exc}", code_of(exc)))
            return
        except ProtocolError as exc:
            self._emit(SecurityEvent("crl_refused", None, f"CRL refused: {exc}", code_of(exc)))
            return
        if crl.number == before:
            return
        self._journal.commit({(NS_NODE, "revocation"): self.revocation.to_bytes()}).add_done_callback(_log_failure)
        log.info("crl_accepted", extra={"fields": {"node": self.name, "number": crl.number}})
        own = self.revoked
        if own is not None and (previous is None or own.serial not in previous.revoked):
            self._emit(SecurityEvent("revoked", None, f"this node's certificate is {own.words()}", "node_revoked"))
        for name in self.keystore.names(NS_PEER):
            record = self.peer(name)
            serial = revoked_serial((record.serial, *record.serials), crl.revoked) if record is not None else None
            if record is None or serial is None:
                continue
            if previous is not None and serial in previous.revoked:
                continue  # told once, on the CRL that revoked it (issue #13), not on each later one
            reason = crl.entries[serial].reason if serial in crl.entries else "revoked"
            self._close_revoked(name, record, reason)

    def _close_revoked(self, name: str, record: PeerRecord, reason: str) -> None:
        """Tear down every session with a revoked peer: every later frame is refused, and the user is told."""
        conversation = self._conversation(name)
        if conversation.current is not None and not conversation.current.closed:
            conversation.close(f"peer revoked ({reason})")
            self._save_session(name).add_done_callback(_log_failure)
        self._emit(SecurityEvent("peer_revoked", name, f"certificate {record.serial:x} revoked ({reason})"))

    # --- events and inbox -----------------------------------------------------------------------------

    def _to_inbox(self, item: dict[str, Any], puts: dict[Key, bytes]) -> None:
        if self.options.inbox:
            self._inbox_seq += 1
            puts[(NS_INBOX, f"{self._inbox_seq:020d}")] = msgpack.packb(item)

    def _emit(self, event: SecurityEvent) -> asyncio.Future[None]:
        """Record a security event in the inbox; the application sees it once it is on disk."""
        log.info("security_event", extra={"fields": event.to_json()})
        record: dict[Key, bytes] = {}
        admitted = self.event_budget.admit(event, self.clock())
        if admitted is None or self._inbox_full():
            return self._journal.commit(record, sync=False)  # logged only; still in commit order
        event = admitted
        self._to_inbox(event.to_json(), record)
        durable = self._journal.commit(record, sync=False)

        def show(fut: asyncio.Future[None]) -> None:  # a callback, in commit order (see _on_deliver)
            if not fut.cancelled() and fut.exception() is None:
                self.events.put_nowait(event)
            else:
                _log_failure(fut)

        durable.add_done_callback(show)
        return durable

    def _inbox_full(self) -> bool:
        """Whether the stored inbox holds MAX_STORED_EVENTS security events (counted once, then kept)."""
        if self._stored_events is None:
            self._stored_events = len(self.keystore.names(NS_INBOX))
        self._stored_events += 1
        return self._stored_events > MAX_STORED_EVENTS

    def take_inbox(self) -> list[dict[str, Any]]:
        """Every message and event received and not yet taken, oldest first; they are removed."""
        out = []
        with self.keystore.transaction():
            for name in self.keystore.names(NS_INBOX):
                packed = self.keystore.get(NS_INBOX, name)
                if packed is not None:
                    out.append(msgpack.unpackb(packed))
                self.keystore.delete(NS_INBOX, name)
        self._stored_events = 0
        if out:
            for listener in list(self.inbox_listeners):
                listener(out)
        return out

    # --- status ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Identity, certificate, feed freshness, sessions and safety numbers (`kmsnet status --json`)."""
        now = self.clock()
        cert = x509.load_der_x509_certificate(self.certificate)
        feed: dict[str, Any]
        try:
            fresh = self.revocation.freshness(now)
            feed = {
                "crl_number": fresh.number,
                "next_update": fresh.next_update.isoformat(),
                "stale": fresh.stale,
                "seconds_left": fresh.seconds_left,
            }
        except RevocationError:
            feed = {"crl_number": None, "stale": True, "reason": "no CRL received yet"}
        sessions = []
        for name in self.keystore.names(NS_PEER):
            record = self.peer(name)
            if record is None:
                continue
            session = self._session(name)
            sessions.append(
                {
                    "peer": name,
                    "state": "closed" if session is not None and session.closed else record.state,
                    "closed_reason": session.closed if session is not None else None,
                    "safety_number": safety_number(self.identity.public_bytes, record.identity),
                }
            )
        return {
            "name": self.name,
            "fingerprint": self.fingerprint.hex(),
            "certificate": {
                "serial": format(cert.serial_number, "x"),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "expires_in_seconds": int((cert.not_valid_after_utc - now).total_seconds()),
            },
            "relay": self.relay_url,
            "connected": self.connected,
            "revoked": self.revoked.to_json() if self.revoked is not None else None,
            "feed": feed,
            "outbox": self.outbox_size(),
            "sessions": sessions,
        }


def _succeeded(fut: asyncio.Future[None]) -> bool:
    return fut.done() and not fut.cancelled() and fut.exception() is None


def _log_failure(fut: asyncio.Future[None]) -> None:
    """For commits nobody waits on: a failure must still be seen."""
    if not fut.cancelled() and fut.exception() is not None:
        log.error("commit_failed", extra={"fields": {"error": str(fut.exception())}})


def _event_name(exc: ProtocolError) -> str:
    if isinstance(exc, CertificateRevoked):
        return "peer_revoked"
    if isinstance(exc, DuplicateMessage):
        return "replay_refused"
    if isinstance(exc, SessionClosed):
        return "frame_refused"
    return code_of(exc)


def _last_seq(names: list[str]) -> int:
    return int(names[-1]) if names else 0
