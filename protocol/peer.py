"""The per-peer engine (PROTOCOL.md §8): one conversation with one peer, sans-I/O.

`Peer` is restored from the records a node keeps (`Peer.restore`); `receive(frame, now, local)`
parses the frame once, consults `TRANSITIONS` on every frame, and returns an `Outcome`: the records
that must be durable before the application sees anything (`puts`, `deletes`, fsynced when
`sync`), the events, and the decrypted content. `start` makes an INIT, `encrypt` a MESSAGE, `close`
ends every session (revocation). The node around it commits, locks, and talks to the relay; every
per-peer decision is taken here: the state table, redelivery and replay, the tie-break between
sessions, which session is current, stale INITs, revocation by serial and by identity key, the end
of a session with its certificate, and when a fresh handshake is due.

Two sessions with one peer exist whenever both sides start one at once (crossed INITs), or an
INIT arrives late. Every session is ranked by its INIT's signed freshness (`created`, the
initiator's clock in milliseconds) and, for equal freshness, by the initiator's certificate
fingerprint (lower wins). Both sides hold the same two INITs, so both compute the same order,
before and after any restart (the rank is part of the persisted session): no time window.

* The **current** session is the highest-ranked one; we encrypt with it.
* A session it outranks is **archived** (at most `MAX_ARCHIVED`, the lowest-ranked dropped
  first): a message the peer sent on it before it learned of the current one still decrypts
  (current first, then the archive, newest first), exactly once.
* An INIT that the current session outranks is **stale** and refused before it consumes any
  prekey, once the current session is confirmed (state ESTABLISHED: we received on it, or we
  answered its INIT). While it is not, the peer may not have seen our INIT yet: its INIT is a
  crossing one, and joins the archive so that what it carries is delivered.
* After `MAX_AUTH_FAILURES` messages in a row that no held session authenticates (the peer is on
  a session we do not have: its state or ours was lost or rolled back), a fresh handshake is due
  (`reset_due`), whose INIT outranks every earlier one.
* Every session ends with the peer certificate it was made under (`expire`): a new handshake,
  which checks the renewed certificate against the current CRL, must come before more traffic; and
  a CRL listing any certificate seen for the peer's identity key ends them (`revoked_serial`,
  PROTOCOL.md §10.5).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol import certs, handshake, wire
from protocol.certs import CLOCK_SKEW
from protocol.errors import (
    AuthenticationFailed,
    CertificateRevoked,
    DecodeError,
    DuplicateMessage,
    ProtocolError,
    RatchetError,
    SessionClosed,
    StaleInit,
    UnexpectedFrame,
    code_of,
)
from protocol.handshake import RevocationCheck
from protocol.identity import IdentityKey
from protocol.messages import FrameType, InitMessage, PrekeyBundle, RatchetMessage, Suite
from protocol.prekeys import PrekeySecrets
from protocol.safety import safety_number
from protocol.session import Kind, Received, Session

#: Sessions kept per peer besides the current one (Signal keeps 40 previous states; crossed INITs
#: need one, a crossing during a re-handshake two).
MAX_ARCHIVED = 4
#: Messages in a row that authenticate under no held session before a fresh handshake starts.
MAX_AUTH_FAILURES = 3


def outranks(a: Session, b: Session) -> bool:
    """True if `a` is preferred over `b`: its INIT is fresher, or as fresh and from the lower fingerprint."""
    return (a.created, b.initiator) > (b.created, a.initiator)


class Conversation:
    """The sessions held with one peer and the per-peer decisions over them."""

    __slots__ = ("archive", "current", "failures", "renew")

    def __init__(self, current: Session | None = None, archive: list[Session] | None = None) -> None:
        self.current = current
        #: Replaced sessions, highest-ranked first.
        self.archive: list[Session] = list(archive or [])
        #: Messages in a row that no held session authenticated.
        self.failures = 0
        #: The sessions ended with the peer certificate they were made under: a new handshake (which
        #: checks the peer's current certificate against the current CRL) must come before traffic.
        self.renew = False

    def check_init(self, created: int, initiator: bytes, *, confirmed: bool) -> None:
        """Before a received INIT consumes anything: refuse it if it is stale (see the module doc)."""
        current = self.current
        if current is None or not confirmed or current.closed is not None:
            return
        if (created, current.initiator) < (current.created, initiator):
            raise StaleInit("initial message older than the live session (a delayed or replayed INIT): refused")

    def adopt(self, session: Session) -> bool:
        """Hold a new session (ours or the peer's); True if it became the current one."""
        current = self.current
        if current is None or current.closed is not None or outranks(session, current):
            if current is not None and current.closed is None:
                self._archive(current)
            self.current = session
            self.failures = 0
            self.renew = False
            return True
        self._archive(session)
        return False

    def _archive(self, session: Session) -> None:
        self.archive.append(session)
        self.archive.sort(key=functools.cmp_to_key(_by_rank))
        del self.archive[MAX_ARCHIVED:]

    def decrypt(self, message: RatchetMessage) -> tuple[Received, Session]:
        """Decrypt with the current session, then the archived ones; the session that took it is returned.

        A message no session authenticates raises the current session's error (or SessionClosed when
        there is none) and counts towards `reset_due`; a refusal changes no session.
        """
        current = self.current
        if current is None:
            self.failures += 1
            raise SessionClosed("no session with this peer")
        if current.closed is not None:
            raise SessionClosed(current.closed)
        refusal: RatchetError
        try:
            received = current.decrypt_message(message)
        except RatchetError as exc:
            refusal = exc
        else:
            self.failures = 0
            return received, current
        for session in self.archive:
            try:
                received = session.decrypt_message(message)
            except DuplicateMessage as duplicate:
                refusal = duplicate  # a replay on an archived session says so, and does not count
                continue
            except RatchetError:
                continue
            self.failures = 0
            return received, session
        if isinstance(refusal, AuthenticationFailed):
            # The peer is on a session we do not hold (a replay of one we do says DuplicateMessage).
            self.failures += 1
        raise refusal

    @property
    def reset_due(self) -> bool:
        """True once `MAX_AUTH_FAILURES` messages in a row authenticated under no held session, or when
        the sessions ended with the peer's certificate (`expire`): a new handshake should start."""
        if self.renew:
            return True
        return self.failures >= MAX_AUTH_FAILURES and (self.current is None or self.current.closed is None)

    def expire(self, now: datetime, not_after: datetime) -> bool:
        """End every session once the peer certificate they were made under is past its notAfter
        (plus the allowed skew): a renewed certificate must be checked (CRL included) by a new
        handshake before traffic continues (PROTOCOL.md §10.5). True if this call ended them."""
        current = self.current
        if current is None or current.closed is not None or now <= not_after + CLOCK_SKEW:
            return False
        self.close(f"the peer's certificate expired at {not_after.isoformat()}: a new handshake is needed")
        self.renew = True
        return True

    def close(self, reason: str) -> None:
        """End every session with this peer (revoked): later frames are refused with SessionClosed."""
        if self.current is not None:
            self.current.close(reason)
        self.archive.clear()

    def archive_bytes(self) -> bytes:
        """The archived sessions, for the keystore (secret: seal it)."""
        return msgpack.packb([s.to_bytes() for s in self.archive])

    @staticmethod
    def archive_from_bytes(data: bytes) -> list[Session]:
        """Restore what `archive_bytes` wrote. Raises DecodeError on anything malformed."""
        try:
            items = msgpack.unpackb(data, raw=False, max_map_len=0)
            if type(items) is not list or len(items) > MAX_ARCHIVED:
                raise DecodeError("malformed session archive")
            return [Session.from_bytes(item) for item in items]
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise DecodeError("malformed session archive") from exc


def _by_rank(a: Session, b: Session) -> int:
    """Highest-ranked first."""
    return -1 if outranks(a, b) else 1 if outranks(b, a) else 0


def revoked_serial(serials: Iterable[int], revoked: Collection[int]) -> int | None:
    """The first of a peer's certificate serials (every one seen for its current identity key) that
    `revoked` lists: revocation of any certificate of that key ends its sessions (PROTOCOL.md §10.5)."""
    return next((serial for serial in serials if serial in revoked), None)


# --- the state table ------------------------------------------------------------------------------


class PeerState(Enum):
    """Where a node stands with one peer (PROTOCOL.md §8.1)."""

    #: No open session: none yet, dropped (rollback), or ended with the peer's certificate.
    IDLE = "idle"
    #: Our INIT made the current session; nothing received on it yet.
    INITIATED = "initiated"
    #: The current session is confirmed: we received on it, or we answered its INIT.
    ESTABLISHED = "established"
    #: Every session was ended because the peer was revoked: terminal for its identity key.
    CLOSED = "closed"


#: (state, frame) → the state once the frame is taken by the current session. A BUNDLE "arrives"
#: when the node fetched one to start a handshake (`Peer.start`). A frame taken by an archived
#: session (a crossing INIT that ours outranks, a late message) leaves the state as it is. Absent
#: pairs are refused (`Peer.refusal`): a MESSAGE with no open session, anything in CLOSED.
TRANSITIONS: dict[tuple[PeerState, FrameType], PeerState] = {
    (PeerState.IDLE, FrameType.BUNDLE): PeerState.INITIATED,
    (PeerState.IDLE, FrameType.INIT): PeerState.ESTABLISHED,
    # A fresh handshake before the peer answered ours (a reset, or the first INIT was lost).
    (PeerState.INITIATED, FrameType.BUNDLE): PeerState.INITIATED,
    # Crossed INITs: the higher-ranked session becomes current on both sides (see `outranks`).
    (PeerState.INITIATED, FrameType.INIT): PeerState.ESTABLISHED,
    (PeerState.INITIATED, FrameType.MESSAGE): PeerState.ESTABLISHED,
    # A fresh handshake started by this side (reset_due, or the certificate changed).
    (PeerState.ESTABLISHED, FrameType.BUNDLE): PeerState.INITIATED,
    # The peer started afresh (restart, re-key, reset): a fresher verified INIT replaces the session;
    # an older one is stale and refused.
    (PeerState.ESTABLISHED, FrameType.INIT): PeerState.ESTABLISHED,
    (PeerState.ESTABLISHED, FrameType.MESSAGE): PeerState.ESTABLISHED,
}


# --- records, events, outcomes --------------------------------------------------------------------

#: The record namespaces a peer's state lives in (the node's keystore keeps them under these names).
NS_SESSION = "session"
NS_ARCHIVE = "archive"
NS_PEER = "peer"
NS_SEEN = "seen"
Record = tuple[str, str]

#: Received message ids remembered per peer to tell a redelivery from a replay.
MAX_SEEN_PER_PEER = 5000
#: Earlier certificate serials remembered per peer identity key (renewals overlap by a few).
MAX_SERIALS = 16


@dataclass(frozen=True)
class PeerRecord:
    """What we know of a peer we have a session with (record `peer/<name>`)."""

    name: str
    serial: int
    fingerprint: bytes
    identity: bytes
    #: A PeerState value: "initiated", "established" or "closed" (revoked).
    state: str
    #: The peer's certificate (DER) the current session was made under: it ends at its notAfter,
    #: and an OCSP responder can be asked about it later.
    certificate: bytes
    #: Serials of the peer's earlier certificates for the same identity key (newest first): a CRL
    #: listing any of them ends the sessions too (PROTOCOL.md §10.5).
    serials: tuple[int, ...] = ()

    def pack(self) -> bytes:
        """The record's bytes (not secret, but sealed with the rest of the keystore)."""
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
        """Restore what `pack` wrote (a record from before `serials` existed has none)."""
        name, serial, fp, identity, state, certificate, *rest = msgpack.unpackb(data)
        serials = tuple(int.from_bytes(s, "big") for s in rest[0]) if rest else ()
        return cls(name, int.from_bytes(serial, "big"), fp, identity, state, certificate, serials)

    @property
    def not_after(self) -> datetime:
        """When the certificate the current session was made under expires (and the session with it)."""
        return _not_after(self.certificate)


@functools.lru_cache(maxsize=256)
def _not_after(certificate: bytes) -> datetime:
    return x509.load_der_x509_certificate(certificate).not_valid_after_utc


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """Something the application is told about this peer (an event name of PROTOCOL.md §15.1)."""

    event: str
    reason: str
    error: str | None = None
    safety_number: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one call on the engine returns. Commit `puts` and `deletes` (fsynced when `sync`) before
    the application sees `events` or `received`, and before `frame` leaves."""

    puts: Mapping[Record, bytes] = field(default_factory=dict)
    deletes: Sequence[Record] = ()
    #: The commit must survive a power loss: a new session, a consumed prekey, a reservation.
    sync: bool = False
    events: Sequence[PeerEvent] = ()
    #: What the frame carried, once authenticated.
    received: Received | None = None
    #: The frame to send (`start`, `encrypt`).
    frame: bytes | None = None
    #: The frame was refused (`events` says why).
    refused: bool = False
    #: The prekey account changed (a prekey consumed, the replay cache grew): commit it too.
    prekeys: bool = False


@dataclass(frozen=True, slots=True)
class Local:
    """This node, as a peer engine needs it for one call: who we are and what vouches for peers."""

    identity: IdentityKey
    certificate: bytes
    fingerprint: bytes
    root: x509.Certificate
    #: Vouches for a peer certificate at handshake time (the CRL feed, or OCSP answers).
    revocation: RevocationCheck
    #: The serials the newest CRL held lists (for the identity-key rule of §10.5).
    revoked: Collection[int]
    prekeys: PrekeySecrets
    #: Our signed bundle by signed-prekey id (UnknownPrekey when it is not one we hold).
    bundle: Callable[[int], PrekeyBundle]
    suite: Suite = Suite.HYBRID
    accept_suites: tuple[Suite, ...] = (Suite.HYBRID,)


def event_name(exc: ProtocolError) -> str:
    """The event (PROTOCOL.md §15.1) a refused frame is reported as."""
    if isinstance(exc, CertificateRevoked):
        return "peer_revoked"
    if isinstance(exc, DuplicateMessage):
        return "replay_refused"
    if isinstance(exc, SessionClosed):
        return "frame_refused"
    return code_of(exc)


def refusal(exc: ProtocolError, event: str | None = None) -> PeerEvent:
    """The event telling of `exc` (as `event`, or by `event_name`)."""
    return PeerEvent(event or event_name(exc), str(exc), code_of(exc))


# --- the engine -----------------------------------------------------------------------------------


class Peer:
    """One peer's conversation engine: the sessions, what we know of the peer, the ids received."""

    __slots__ = ("conversation", "name", "record", "seen")

    def __init__(
        self,
        name: str,
        conversation: Conversation | None = None,
        record: PeerRecord | None = None,
        seen: Iterable[bytes] = (),
    ) -> None:
        self.name = name
        self.conversation = conversation or Conversation()
        self.record = record
        #: Ids of the deliveries taken from this peer, oldest first (a redelivery is acknowledged silently).
        self.seen: dict[bytes, None] = dict.fromkeys(seen)

    @classmethod
    def restore(
        cls,
        name: str,
        *,
        session: bytes | None,
        archive: bytes | None,
        record: bytes | None,
        seen: Iterable[bytes] = (),
    ) -> Peer:
        """The engine as the records `session/`, `archive/`, `peer/` and `seen/` hold it."""
        conversation = Conversation(
            Session.from_bytes(session) if session is not None else None,
            Conversation.archive_from_bytes(archive) if archive is not None else [],
        )
        return cls(name, conversation, PeerRecord.unpack(record) if record is not None else None, seen)

    # --- state ------------------------------------------------------------------------------------

    @property
    def state(self) -> PeerState:
        """Where we stand with this peer (derived from the sessions and the record, so it persists)."""
        current = self.conversation.current
        if self.record is not None and self.record.state == PeerState.CLOSED.value:
            return PeerState.CLOSED
        if current is None or current.closed is not None or self.record is None:
            return PeerState.IDLE
        return PeerState(self.record.state)

    @property
    def current(self) -> Session | None:
        """The session we encrypt with, if it is open."""
        current = self.conversation.current
        return current if current is not None and current.closed is None else None

    @property
    def reset_due(self) -> bool:
        """A fresh handshake should start by itself (see `Conversation.reset_due`)."""
        return self.state is not PeerState.CLOSED and self.conversation.reset_due

    @property
    def heartbeat_due(self) -> bool:
        """The current session wants a heartbeat sent (a forced DH step, PROTOCOL.md §7.3)."""
        current = self.current
        return current is not None and current.heartbeat_due

    def expire(self, now: datetime) -> bool:
        """End the sessions once the certificate they were made under expired; True if this call did."""
        return self.record is not None and self.conversation.expire(now, self.record.not_after)

    def records(self) -> dict[Record, bytes]:
        """The records of every session held (for a commit)."""
        puts: dict[Record, bytes] = {}
        current = self.conversation.current
        if current is not None:
            puts[(NS_SESSION, self.name)] = current.to_bytes()
        puts[(NS_ARCHIVE, self.name)] = self.conversation.archive_bytes()
        return puts

    # --- receiving --------------------------------------------------------------------------------

    def receive(self, frame: bytes, now: datetime, local: Local, *, msg_id: bytes | None = None) -> Outcome:
        """Take one frame from this peer: decode it once, check it against the state table, decrypt or
        answer it. Never raises for what the peer sent: a refusal is an Outcome with `refused` set.

        `msg_id` is the relay's id for the delivery: one taken before is a redelivery, acknowledged
        with nothing to commit and nothing to tell.
        """
        if msg_id is not None and msg_id in self.seen:
            return Outcome()
        puts: dict[Record, bytes] = {}
        events: list[PeerEvent] = []
        try:
            decoded = wire.decode(frame)
            kind = decoded.TYPE
            if isinstance(decoded, InitMessage):
                received, sync = self._answer(decoded, now, local, puts, events), True
            elif isinstance(decoded, RatchetMessage):
                received, sync = self._decrypt(decoded, now, puts), False
            else:
                # A BUNDLE is fetched from the relay (`start`), never delivered by a peer: refused in every state.
                raise UnexpectedFrame(f"a {kind.name} frame is fetched from the relay, never delivered by a peer")
        except ProtocolError as exc:
            return Outcome(events=(*events, refusal(exc)), refused=True)
        puts.update(self.records())
        deletes: list[Record] = []
        if msg_id is not None:
            puts[(NS_SEEN, f"{self.name}:{msg_id.hex()}")] = b""
            self.seen[msg_id] = None
            deletes = self._prune_seen()
        return Outcome(puts, deletes, sync, events, received, prekeys=kind is FrameType.INIT)

    def _decrypt(self, message: RatchetMessage, now: datetime, puts: dict[Record, bytes]) -> Received:
        self.expire(now)
        nxt = self._next(FrameType.MESSAGE)
        received, session = self.conversation.decrypt(message)
        record = self.record
        assert record is not None  # a state the table lets a MESSAGE through has a peer record
        if session is self.conversation.current and record.state != nxt.value:
            # The first reply on our INIT's session: both sides hold it now.
            self.record = replace(record, state=nxt.value)
            puts[(NS_PEER, self.name)] = self.record.pack()
        return received

    def _next(self, frame: FrameType) -> PeerState:
        """The state table's answer for `frame` now, or its precise refusal: SessionClosed in CLOSED,
        and for a MESSAGE with no open session (which counts towards `reset_due` when we hold no
        session at all: the peer is on one we lost)."""
        state = self.state
        nxt = TRANSITIONS.get((state, frame))
        if nxt is not None:
            return nxt
        current = self.conversation.current
        if current is None and state is PeerState.IDLE:
            self.conversation.failures += 1
            raise SessionClosed("no session with this peer")
        raise SessionClosed(current.closed if current is not None and current.closed else "this peer was revoked")

    def _answer(
        self, init: InitMessage, now: datetime, local: Local, puts: dict[Record, bytes], events: list[PeerEvent]
    ) -> Received:
        """Answer an INIT: every check before any prekey is consumed (PROTOCOL.md §5.4, §8)."""
        self._admit(init.certificate, local)
        nxt = self._next(FrameType.INIT)
        bundle = local.bundle(init.spk_id)
        self.conversation.check_init(
            init.created, hashlib.sha256(init.certificate).digest(), confirmed=self.state is PeerState.ESTABLISHED
        )
        result = handshake.respond(
            init,
            identity=local.identity,
            certificate_fingerprint=local.fingerprint,
            bundle=bundle,
            prekeys=local.prekeys,
            root=local.root,
            revocation=local.revocation,
            now=now,
            allowed_suites=local.accept_suites,
            expected_name=self.name,
        )
        previous = self.record
        if self.conversation.adopt(result.session):
            self._note(result.peer, nxt, puts)
            how = f"accepted ({Suite(result.session.suite).name})"
            events.extend(self._established(local, previous, result.peer, how))
        # else: a crossing INIT that our own outranks: its message is delivered, our session stays.
        return result.first

    # --- starting and sending ---------------------------------------------------------------------

    def start(
        self,
        bundle: PrekeyBundle,
        now: datetime,
        local: Local,
        *,
        first: bytes = b"",
        kind: Kind = Kind.DATA,
    ) -> Outcome:
        """Start a session from the peer's `bundle`: the INIT (carrying `first`) is `frame`, to send
        once the records (fsynced) are durable. Raises the ProtocolError that refused the bundle
        (`refusal(exc, "session_refused")` words it)."""
        self._admit(bundle.certificate, local)
        nxt = self._next(FrameType.BUNDLE)
        started = handshake.initiate(
            identity=local.identity,
            certificate=local.certificate,
            bundle=bundle,
            root=local.root,
            revocation=local.revocation,
            now=now,
            expected_name=self.name,
            first_message=first,
            first_kind=kind,
            suite=local.suite,
        )
        puts: dict[Record, bytes] = {}
        previous = self.record
        self._note(started.peer, nxt, puts)
        self.conversation.adopt(started.session)
        puts.update(self.records())
        events = self._established(local, previous, started.peer, f"initiated ({Suite(started.session.suite).name})")
        return Outcome(puts, sync=True, events=events, frame=started.frame)

    def encrypt(self, data: bytes, *, kind: Kind = Kind.DATA, reserve: int) -> Outcome:
        """A MESSAGE frame on the current session. When it starts a new reservation of `reserve`
        message numbers, the session's records come with it, fsynced: nothing may leave under
        message numbers no durable state covers (PROTOCOL.md §7.4)."""
        current = self.current
        if current is None:
            closed = self.conversation.current
            raise SessionClosed(closed.closed if closed is not None and closed.closed else "no session with this peer")
        puts = self.records() if current.reserve(reserve) else {}
        return Outcome(puts, sync=bool(puts), frame=current.encrypt(data, kind=kind))

    # --- ending -----------------------------------------------------------------------------------

    def close(self, reason: str) -> Outcome:
        """End every session with this peer for good (it was revoked, `reason` says how): CLOSED, every
        later frame refused, and `peer_revoked` told."""
        self.conversation.close(reason)
        puts = self.records()
        if self.record is not None:
            self.record = replace(self.record, state=PeerState.CLOSED.value)
            puts[(NS_PEER, self.name)] = self.record.pack()
        return Outcome(puts, sync=True, events=(PeerEvent("peer_revoked", f"{reason}"),))

    def revoked_by(self, revoked: Collection[int], before: Collection[int]) -> int | None:
        """The serial a new CRL revokes among this peer's certificates (any seen for its identity key),
        or None; a serial the previous CRL (`before`) already listed was told of then."""
        record = self.record
        serial = revoked_serial((record.serial, *record.serials), revoked) if record is not None else None
        return None if serial is None or serial in before else serial

    # --- helpers ----------------------------------------------------------------------------------

    def _admit(self, certificate: bytes, local: Local) -> None:
        """Before a handshake with `certificate`: refuse an identity key an earlier, revoked certificate
        of the peer had (a renewal does not escape a revocation, PROTOCOL.md §10.5); a different identity
        key after CLOSED is a new peer identity, which starts from IDLE."""
        record = self.record
        if record is None:
            return
        try:
            key = x509.load_der_x509_certificate(certificate).public_key()
            identity = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        except (ValueError, TypeError):
            return  # not a usable certificate: the handshake's own checks refuse it
        if identity != record.identity:
            if self.state is PeerState.CLOSED:
                self.conversation = Conversation()
                self.record = replace(record, state=PeerState.IDLE.value)
            return
        serial = revoked_serial((record.serial, *record.serials), local.revoked)
        if serial is not None:
            raise CertificateRevoked(serial, "an earlier certificate of the same identity key")
        if self.state is PeerState.CLOSED:
            # Revoked by an OCSP answer (or a CRL since replaced): the key stays refused.
            raise CertificateRevoked(record.serial, "this identity key's sessions were ended by a revocation")

    def _note(self, cert: certs.VerifiedCertificate, state: PeerState, puts: dict[Record, bytes]) -> None:
        """Record the certificate a new session was made under (earlier serials of the same key kept)."""
        identity = cert.public_key.public_bytes_raw()
        previous = self.record
        serials: tuple[int, ...] = ()
        if previous is not None and previous.identity == identity:
            # A renewal: the earlier certificates of this key still count for revocation.
            serials = tuple(s for s in dict.fromkeys((previous.serial, *previous.serials)) if s != cert.serial)
        self.record = PeerRecord(
            cert.name, cert.serial, cert.fingerprint, identity, state.value, cert.der, serials[:MAX_SERIALS]
        )
        puts[(NS_PEER, self.name)] = self.record.pack()

    @staticmethod
    def _established(
        local: Local, previous: PeerRecord | None, verified: certs.VerifiedCertificate, how: str
    ) -> tuple[PeerEvent, ...]:
        """A new session, and first a new identity key (either side started it)."""
        new_identity = verified.public_key.public_bytes_raw()
        number = safety_number(local.identity.public_bytes, new_identity)
        established = PeerEvent("session_established", f"{how}; safety number {number}", safety_number=number)
        if previous is not None and previous.identity != new_identity:
            changed = f"new identity key; new safety number {number}"
            return (PeerEvent("identity_changed", changed, safety_number=number), established)
        return (established,)

    def _prune_seen(self) -> list[Record]:
        """Forget the oldest remembered ids past twice the bound (an old id that comes back is refused
        by the ratchet anyway: it only tells a redelivery from a replay); the records to delete."""
        if len(self.seen) <= MAX_SEEN_PER_PEER * 2:
            return []
        drop = list(self.seen)[: len(self.seen) - MAX_SEEN_PER_PEER]
        for msg_id in drop:
            del self.seen[msg_id]
        return [(NS_SEEN, f"{self.name}:{m.hex()}") for m in drop]
