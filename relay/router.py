"""The relay's decisions, without I/O: who may log in and publish, where an envelope goes, what a
frame costs, which connections a new CRL ends, and which DELIVERs look lost.

The WebSocket shell (`relay.server`) reads frames, asks the store and writes to sockets; the
router is handed the parsed frames and those facts (the time, the store's answers) and says what
to do. Its two outputs: the frames to send to a connection, appended in order to that
connection's `Link.outbox` (and the connection woken, `Link.wake`), and the store operations to
run, returned as values (a bundle to store, the DELIVERs to look up again, the connections to
close). Every method is synchronous and takes `now` when time matters, so the relay's rules are
tested without a socket or a clock (tests/relay/test_router.py).
"""

from __future__ import annotations

import collections
import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from cryptography import x509

from protocol import wire
from protocol.errors import CertificateRevoked, DecodeError, ProtocolError, UnknownFrameType
from protocol.link import (
    MAX_LINK_FRAME,
    Accepted,
    Ack,
    Error,
    ErrorCode,
    FetchBundle,
    LinkFrame,
    PublishBundle,
    PublishCrl,
    Send,
)
from protocol.messages import OneTimePrekey, PrekeyBundle
from protocol.revocation import RevocationState, VerifiedCrl
from relay.errors import LinkRefused, QuotaExceeded, StoreUnavailable, StoreWriteRefused
from relay.metrics import Metrics
from relay.ratelimit import TokenBucket
from relay.store import Envelope, TakenBundle

log = logging.getLogger("kmsnet.relay")

#: Rate-limit refusals in a row after which the connection is closed.
MAX_STRIKES = 50
#: Close codes (RFC 6455): policy violation, message too big.
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
#: Frames queued for one node beyond which its new mail is left in the store (read from there once
#: it has caught up) rather than pushed from memory.
MAX_QUEUED = 1024
#: Seconds a DELIVER waits for its ACK before it is sent again on the live connection (by default).
RESEND_AFTER = 3.0
#: A DELIVER sent again waits twice as long each time, up to this many times `resend_after`.
RESEND_BACKOFF_MAX = 8
#: DELIVERs sent again in one go (the rest on the writer's next turn).
RESEND_BATCH = 256
#: A DELIVER is sent again at once when this many sent after it were acknowledged: the receiver's
#: ratchet keeps the keys of a gap only a few chains long (protocol/ratchet.py MAX_OLD_CHAINS), so
#: a loss is mended within a few messages, not seconds.
RESEND_GAP = 8


@dataclass(slots=True)
class InFlight:
    """A DELIVER sent and not yet acknowledged."""

    seq: int
    #: Its place among everything sent on this connection (a later one acknowledged first means
    #: this one was probably lost).
    push: int
    #: How many times it was sent.
    sends: int = 1


@dataclass(eq=False, kw_only=True)
class Link:
    """What the router knows of one authenticated connection (the shell adds its socket)."""

    name: str
    certificate: bytes
    #: Its certificate's serial: a CRL that lists it ends the connection.
    serial: int
    #: Its identity key (raw public bytes): another one than last time drops its one-time prekeys.
    identity: bytes
    #: The signed rollback epoch its AUTH carried (opaque), kept to be echoed at its next login.
    epoch: bytes | None
    #: Its frame budget, and the separate one of its ACKs and feed frames.
    bucket: TokenBucket
    acks: TokenBucket
    #: What to send, in order of arrival: encoded frames, and envelopes stored (or being stored)
    #: for this node, pushed from memory.
    outbox: collections.deque[bytes | Envelope] = field(default_factory=collections.deque)
    #: The store may hold envelopes for this node that are neither sent nor in `outbox` (when it
    #: connects, and when its outbox was full): they are read from the store.
    behind: bool = True
    #: The newest CRL is to be pushed (when it connects, and when a new one is held).
    crl_due: bool = True
    #: Highest sequence number pushed; everything at or below it was sent.
    cursor: int = 0
    #: Rate-limit refusals in a row.
    strikes: int = 0
    #: A CRL the router holds revokes it: nothing more is read from it, and it is closed.
    revoked: bool = False
    #: DELIVERs sent and not acknowledged, by msg_id, in the order they were sent.
    inflight: dict[bytes, InFlight] = field(default_factory=dict)
    #: Some DELIVER is RESEND_GAP behind the latest acknowledged: it is to be sent again now.
    gap: bool = False
    #: When each is due to be sent again: (time, push, msg_id); stale entries are skipped.
    resends: list[tuple[float, int, bytes]] = field(default_factory=list)
    #: DELIVERs sent on this connection so far, and the place of the latest one acknowledged.
    pushes: int = 0
    acked_push: int = 0
    #: When the node last acknowledged something (its connection time before that).
    last_ack: float = 0.0

    def wake(self) -> None:
        """Something is due to this connection (queued, flagged or failed); the shell sends it."""


L = TypeVar("L", bound=Link)


class Router(Generic[L]):
    """The rules of one relay over the connections it holds (`links`, by node name)."""

    def __init__(
        self,
        ca_root: x509.Certificate,
        metrics: Metrics,
        *,
        crl_publisher: str,
        resend_after: float = RESEND_AFTER,
        queue_limit: int = MAX_QUEUED,
        admits_revoked: Callable[[str], bool] = lambda name: False,
    ) -> None:
        self.ca_root = ca_root
        self.metrics = metrics
        self.crl_publisher = crl_publisher
        self.resend_after = resend_after
        self.queue_limit = queue_limit
        #: The interceptor's say on whether a revoked node may stay (a colluding relay's).
        self.admits_revoked = admits_revoked
        self.links: dict[str, L] = {}
        # The relay verifies the feed too, only to refuse revoked nodes at the door and never to
        # regress its own feed; nodes verify every CRL themselves.
        self.feed = RevocationState()
        #: The CRL held and pushed to every node (DER), if any.
        self.crl: bytes | None = None

    # --- connections ----------------------------------------------------------------------------

    def refusal(self, name: str, serial: int, now: datetime) -> str | None:
        """Why a node that proved who it is may not log in (the words of REVOKED), or None."""
        try:
            self.feed.check(serial, now)
        except CertificateRevoked:
            words = self.revoked_words(serial)
            if words is not None and not self.admits_revoked(name):
                return words
        except ProtocolError:
            pass  # no CRL, or a stale one: the nodes decide, not the relay
        return None

    def revoked_words(self, serial: int) -> str | None:
        """ "revoked (CRL #n, reason, time)" if our CRL lists `serial` (what the REVOKED error says)."""
        crl = self.feed.current
        if crl is None or serial not in crl.revoked:
            return None
        entry = crl.entries.get(serial)
        reason, at = (entry.reason, entry.revoked_at) if entry is not None else ("unspecified", crl.this_update)
        return f"revoked (CRL #{crl.number}, {reason}, {at:%Y-%m-%d %H:%M} UTC)"

    def attach(self, link: L) -> L | None:
        """Hold `link` as its node's connection; the one it replaces (to be closed), if any."""
        old = self.links.get(link.name)
        self.links[link.name] = link
        self.metrics.connected.set(len(self.links))
        return old

    def detach(self, link: L) -> None:
        """`link` is closed: forget it, unless a newer connection of its node replaced it."""
        if self.links.get(link.name) is link:
            del self.links[link.name]
        self.metrics.connected.set(len(self.links))

    # --- frames from a node -----------------------------------------------------------------------

    @staticmethod
    def decode(raw: Any) -> list[LinkFrame]:
        """The frames of one WebSocket message (a BATCH holds several); LinkRefused if it is not one."""
        if not isinstance(raw, bytes):
            raise LinkRefused(ErrorCode.MALFORMED, "text frames are not part of the protocol", CLOSE_POLICY)
        if len(raw) > MAX_LINK_FRAME:
            raise LinkRefused(ErrorCode.TOO_LARGE, f"frame of {len(raw)} bytes exceeds {MAX_LINK_FRAME}", CLOSE_TOO_BIG)
        try:
            return wire.decode_link_frames(raw)
        except UnknownFrameType as exc:
            raise LinkRefused(ErrorCode.UNKNOWN_TYPE, str(exc), CLOSE_POLICY) from exc
        except DecodeError as exc:
            raise LinkRefused(ErrorCode.MALFORMED, str(exc), CLOSE_POLICY) from exc

    def admit(self, link: L, frame: LinkFrame) -> bool:
        """Whether `frame` is within the node's budget (each frame of a BATCH counts as if it came
        alone; ACKs and the feed against their own). A refused one is answered RATE_LIMITED, and
        MAX_STRIKES refusals in a row end the connection (LinkRefused)."""
        bucket = link.acks if isinstance(frame, Ack | PublishCrl) else link.bucket
        if bucket.take():
            link.strikes = 0
            self.metrics.received(frame)
            return True
        link.strikes += 1
        self.metrics.refused.labels("rate_limited").inc()
        if link.strikes > MAX_STRIKES:
            raise LinkRefused(ErrorCode.RATE_LIMITED, "rate limit exceeded persistently", CLOSE_POLICY)
        self.queue(link, Error(ErrorCode.RATE_LIMITED, "slow down", frame.msg_id if isinstance(frame, Send) else None))
        return False

    def queue(self, link: L, frame: LinkFrame) -> None:
        """Send `frame` to `link`, after everything queued for it before."""
        link.outbox.append(wire.encode_link(frame))
        link.wake()

    # --- SEND: routing and quotas ------------------------------------------------------------------

    def recipient_known(self, link: L, send: Send, known: bool) -> bool:
        """Whether to store `send`, given whether the store knows its recipient (UNKNOWN_RECIPIENT if not)."""
        if not known:
            self.queue(link, Error(ErrorCode.UNKNOWN_RECIPIENT, f"no node {send.to!r} here", send.msg_id))
        return known

    def over_quota(self, link: L, msg_id: bytes, exc: QuotaExceeded) -> None:
        """The store refused an envelope at once: the recipient's mailbox, or the sender's share of it, is full."""
        self.queue(link, Error(ErrorCode.QUOTA_EXCEEDED, str(exc), msg_id))

    def route(self, envelope: Envelope) -> None:
        """Push a new envelope to its recipient from memory, if it is connected and keeping up."""
        recipient = self.links.get(envelope.recipient)
        if recipient is None:
            return  # it reads the envelope from the store when it connects
        if recipient.behind or len(recipient.outbox) >= self.queue_limit:
            # It is not keeping up: it is read from the store once the node has caught up.
            recipient.behind = True
        else:
            # Pushed while it is being written: the recipient acknowledges only after its own
            # commit, and a retransmission after a relay crash is recognised by its msg_id.
            recipient.outbox.append(envelope)
        recipient.wake()

    def settled(self, link: L, msg_id: bytes, stored: int, failed: BaseException | None) -> BaseException | None:
        """The `stored` writes of a SEND are settled (`failed`: the first failure): the answer is
        queued (ACCEPTED once durable, or the error). A failure that is a bug of ours is returned:
        it ends the connection."""
        if isinstance(failed, QuotaExceeded):
            self.over_quota(link, msg_id, failed)
        elif isinstance(failed, StoreUnavailable):
            if isinstance(failed, StoreWriteRefused):
                self.write_refused("envelope", failed)
            self.queue(link, Error(ErrorCode.UNAVAILABLE, str(failed), msg_id))
        elif failed is not None:
            return failed
        else:
            if stored:
                self.metrics.stored.inc(stored)
                self.metrics.writable.set(1)
            # Durable (or a retransmission of something durable): tell the sender it may forget it.
            self.queue(link, Accepted(msg_id))
        return None

    def write_refused(self, what: str, error: StoreWriteRefused) -> None:
        """Count and log a write the store refused (full, read-only): the relay goes on without it."""
        self.metrics.write_refused.labels(what).inc()
        self.metrics.writable.set(0)
        log.warning("store_write_refused", extra={"fields": {"what": what, "reason": str(error)}})

    # --- ACK and the re-send bookkeeping --------------------------------------------------------------

    def acknowledged(self, link: L, msg_id: bytes, now: float) -> None:
        """The node acknowledged `msg_id` at `now` (the shell deletes it from the store). Acknowledged
        RESEND_GAP past the oldest unacknowledged one: that one is due again at once (`gap`)."""
        sent = link.inflight.pop(msg_id, None)
        if sent is not None:
            link.acked_push = max(link.acked_push, sent.push)
            oldest = next(iter(link.inflight.values()), None)
            if oldest is not None and oldest.push + RESEND_GAP <= link.acked_push and not link.gap:
                link.gap = True
                link.wake()
        link.last_ack = now

    def deleted(self, outcome: bool | BaseException) -> BaseException | None:
        """An acknowledged envelope's delete settled (True: there was one); a failure that is a bug
        of ours is returned (it ends the connection). Not deleted for want of a store: the envelope
        is delivered again, and the node knows it by its msg_id."""
        if outcome is True:
            self.metrics.acked.inc()
        elif isinstance(outcome, BaseException) and not isinstance(outcome, StoreUnavailable):
            return outcome
        return None

    def due(self, link: L, envelope: Envelope) -> bool:
        """Whether `envelope` is still to be pushed to `link` (read from the store and pushed from
        memory, it is pushed once)."""
        if envelope.seq <= link.cursor:
            return False
        link.cursor = envelope.seq
        return True

    def pushed(self, link: L, envelope: Envelope, sends: int, now: float) -> None:
        """`envelope` was pushed (for the `sends`-th time) at `now`: its ACK is expected within
        `resend_after`, doubled for each send before, up to RESEND_BACKOFF_MAX times."""
        link.pushes += 1
        link.inflight.pop(envelope.msg_id, None)  # sent again: it goes last
        link.inflight[envelope.msg_id] = InFlight(envelope.seq, link.pushes, sends)
        wait = self.resend_after * min(2 ** (sends - 1), RESEND_BACKOFF_MAX)
        heapq.heappush(link.resends, (now + wait, link.pushes, envelope.msg_id))

    def resend_wait(self, link: L, now: float) -> float | None:
        """Seconds from `now` until a DELIVER may be due again (0: now), None if none is awaited."""
        while link.resends:
            due, push, msg_id = link.resends[0]
            sent = link.inflight.get(msg_id)
            if sent is None or sent.push != push:
                heapq.heappop(link.resends)  # acknowledged, or sent again since
                continue
            return max(0.0, due - now)
        return None

    def lost(self, link: L, now: float) -> list[tuple[bytes, InFlight]]:
        """The DELIVERs that look lost at `now`, oldest first: RESEND_GAP sent after them were
        acknowledged, or they are due and the node acknowledged something sent after them, or
        nothing at all for `resend_after` (a node busy with older ones is left to catch up). The
        shell reads each from the store again (`gone` if it is not there any more) and pushes it."""
        link.gap = False
        silent = now - link.last_ack >= self.resend_after
        lost: dict[bytes, InFlight] = {}
        for msg_id, oldest in link.inflight.items():  # oldest first: the gap is at the front
            if oldest.push + RESEND_GAP > link.acked_push or len(lost) == RESEND_BATCH:
                link.gap = len(lost) == RESEND_BATCH  # more of the gap on the next turn
                break
            lost[msg_id] = oldest
        while link.resends and link.resends[0][0] <= now and len(lost) < RESEND_BATCH:
            _, push, msg_id = heapq.heappop(link.resends)
            sent = link.inflight.get(msg_id)
            if sent is None or sent.push != push:
                continue  # acknowledged, or sent again since
            if not silent and link.acked_push < push:
                # Nothing sent after it was acknowledged yet: not a sign of loss. Looked at again later.
                heapq.heappush(link.resends, (now + self.resend_after, push, msg_id))
                continue
            lost[msg_id] = sent
        return list(lost.items())

    def gone(self, link: L, msg_id: bytes) -> None:
        """A DELIVER that looked lost is not in the store any more (acknowledged meanwhile, or expired)."""
        del link.inflight[msg_id]

    # --- prekey bundles: who may publish ------------------------------------------------------------

    def bundle_to_store(self, link: L, publish: PublishBundle) -> tuple[bytes, list[OneTimePrekey]] | None:
        """The signed bundle (without a one-time prekey) and the one-time prekeys to store for
        `link`; None if it may not publish this one (NOT_ALLOWED queued). LinkRefused if it is not a
        bundle at all."""
        try:
            frame = wire.decode(publish.bundle)
        except DecodeError as exc:
            raise LinkRefused(ErrorCode.MALFORMED, f"bundle: {exc}", CLOSE_POLICY) from exc
        if not isinstance(frame, PrekeyBundle):
            raise LinkRefused(ErrorCode.MALFORMED, "PUBLISH_BUNDLE must carry a BUNDLE frame", CLOSE_POLICY)
        if frame.certificate != link.certificate:
            # Nobody publishes a bundle for another node: it must carry the certificate it authenticated with.
            self.metrics.refused.labels("not_allowed").inc()
            self.queue(link, Error(ErrorCode.NOT_ALLOWED, "bundle certificate is not yours"))
            return None
        return wire.encode(frame.with_onetime(None)), [_onetime(item) for item in publish.onetime]

    def bundle_stored(self, link: L, onetime: int) -> None:
        """A published bundle is stored, with `onetime` one-time prekeys."""
        self.metrics.writable.set(1)
        log.info("bundle_published", extra={"fields": {"node": link.name, "onetime": onetime}})

    def bundle_not_stored(self, link: L, exc: StoreWriteRefused) -> None:
        """The store refused a published bundle: the node hears of it, and the connection goes on."""
        self.write_refused("bundle", exc)
        self.queue(link, Error(ErrorCode.UNAVAILABLE, f"bundle not stored: {exc}"))

    @staticmethod
    def bundle_of(found: TakenBundle | None) -> tuple[bytes | None, int]:
        """The bundle to hand out (with its one-time prekey, if one was left) from what the store
        took (`Store.take_bundle`), and how many one-time prekeys are left."""
        if found is None:
            return None, 0
        signed, onetime, left = found
        frame = wire.decode(signed)
        assert isinstance(frame, PrekeyBundle)  # only decoded bundles are ever stored
        return wire.encode(frame.with_onetime(onetime)), left

    def bundle_not_taken(self, link: L, fetch: FetchBundle, exc: StoreWriteRefused) -> None:
        """Handing out a one-time prekey is a write: refused, said, and the connection goes on."""
        self.write_refused("onetime", exc)
        self.queue(link, Error(ErrorCode.UNAVAILABLE, f"cannot hand out {fetch.name}'s bundle now: {exc}"))

    # --- the CRL feed ---------------------------------------------------------------------------------

    def take_crl(self, link: L, publish: PublishCrl, now: datetime) -> VerifiedCrl | None:
        """A CRL `link` published, taken into the feed: the one to store, or None (only the CA node
        publishes, a CRL must verify and be no older than ours; an error is queued if it was
        refused, nothing if it was the one held)."""
        if link.name != self.crl_publisher:
            self.metrics.refused.labels("not_allowed").inc()
            self.queue(link, Error(ErrorCode.NOT_ALLOWED, "only the CA node publishes CRLs"))
            return None
        before = self.feed.highest_number
        try:
            crl = self.feed.accept(publish.crl, self.ca_root, now)
        except ProtocolError as exc:
            self.queue(link, Error(ErrorCode.MALFORMED, f"CRL refused: {exc}"))
            return None
        return None if crl.number == before else crl

    def crl_unsaved(self, link: L, number: int, exc: StoreUnavailable) -> None:
        """The store could not take a CRL the feed took: it is pushed all the same (a revocation is
        never lost to the store), and the CA hears that it is not stored yet."""
        if isinstance(exc, StoreWriteRefused):
            self.write_refused("crl", exc)
        self.queue(link, Error(ErrorCode.UNAVAILABLE, f"CRL #{number} is pushed but not stored yet: {exc}"))

    def crl_outdated(self, link: L) -> None:
        """Another relay of the cluster holds a newer CRL than the one `link` published."""
        self.queue(link, Error(ErrorCode.MALFORMED, "CRL refused: a CRL with a higher number is held"))

    def hold_crl(self, der: bytes, crl: VerifiedCrl) -> list[L]:
        """Hold and push `der` (taken into the feed as `crl`); the connections it revokes (to close)."""
        self.crl = der
        log.info("crl_published", extra={"fields": {"number": crl.number, "revoked": len(crl.revoked)}})
        self.push_crl()
        return self.cut_revoked()

    def adopt_crl(self, der: bytes, now: datetime) -> list[L]:
        """Take a CRL from the store (held at start, or stored by another relay) into the feed, and
        push it if it is newer than ours; the connections it revokes (to close)."""
        before = self.feed.highest_number
        try:
            crl = self.feed.accept(der, self.ca_root, now)
        except ProtocolError:
            return []  # older than ours, or not valid now: the feed stays as it is
        self.crl = der
        if crl.number == before:
            return []
        self.push_crl()
        return self.cut_revoked()

    def push_crl(self) -> None:
        """The CRL held is due to every connection."""
        for link in self.links.values():
            # A flag, not a queued frame: a node that does not read holds one CRL at most, the newest.
            link.crl_due = True
            link.wake()

    def crl_for(self, link: L) -> bytes | None:
        """The CRL now due to `link` (None: none held); it is then no longer due."""
        link.crl_due = False
        return self.crl

    def cut_revoked(self) -> list[L]:
        """The connections of the nodes the CRL held revokes, to be closed: each is sent the CRL
        (pushed as to everyone) and then a REVOKED error, and nothing more it sends is read."""
        cut = []
        for link in list(self.links.values()):
            words = self.revoked_words(link.serial)
            if words is None or link.revoked or self.admits_revoked(link.name):
                continue
            link.revoked = True
            self.metrics.refused.labels("revoked").inc()
            log.info("node_revoked", extra={"fields": {"node": link.name, "reason": words}})
            self.queue(link, Error(ErrorCode.REVOKED, words))
            cut.append(link)
        return cut

    def resync(self) -> None:
        """Announcements may have been lost: every node's mail is read from the store again."""
        for link in self.links.values():
            link.behind = True
            link.wake()


def _onetime(item: list[object]) -> OneTimePrekey:
    """A PUBLISH_BUNDLE item as the value the store keeps (the link schema checked its fields)."""
    key_id, public, signature = item
    assert isinstance(key_id, int) and isinstance(public, bytes) and isinstance(signature, bytes)
    return OneTimePrekey(key_id, public, signature)
