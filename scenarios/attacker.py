"""The attacker toolkit: a malicious relay, a passive recorder, key theft and a rogue CA.

The relay is the network attacker of PROTOCOL.md §12: `MaliciousRelay` is an `Interceptor` (the
seam `relay.server.Relay` calls on everything it routes) that records every envelope (the passive
recorder) and runs a chain of `Tactic`s over it: read, drop, hold and release later (delay,
reorder), duplicate, replay, flip bits, rewrite headers, substitute bundles, withhold or roll back
the CRL feed. `Mitm` is the full man in the middle: it poses as each side to the other with
whatever credentials it has (a real certificate with a key it does not hold, a rogue CA's
certificate, a stolen identity key) and re-encrypts both ways when the handshake lets it.

Key theft reads a node's unlocked keystore or its memory, as malware on the device would: its
identity key, a live session, its X25519 private keys. `StateReader` then reads recorded traffic
with a stolen (or rebuilt)
session, in both directions, exactly as far as the keys reach. Nothing here weakens a node: every
refusal a scenario shows is the real node refusing.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, cast

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

from node.errors import words_of
from node.layout import NS_NODE, NS_SESSION
from protocol import handshake, wire
from protocol.body import TextBody
from protocol.body import decode as decode_body
from protocol.body import encode as encode_body
from protocol.errors import DecodeError, ProtocolError
from protocol.identity import IdentityKey, KemKeyPair, X25519KeyPair
from protocol.keyschedule import kdf_ck, message_nonce, root_key
from protocol.link import Deliver, Send
from protocol.messages import InitMessage, OneTimePrekey, PrekeyBundle, RatchetMessage, Suite
from protocol.ratchet import Ratchet, header_bytes
from protocol.session import Kind as ContentKind
from protocol.session import Session
from relay.interceptor import Interceptor
from relay.server import Relay
from scenarios.lab import Enrolled, LabClock, LabNode
from scenarios.timeline import ATTACKER, RELAY, Kind, Timeline

# --- what the relay sees ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Captured:
    """One envelope as it reached the relay: who sent it to whom, and the opaque payload."""

    seq: int
    sender: str
    to: str
    msg_id: bytes
    payload: bytes
    at: datetime

    @property
    def init(self) -> InitMessage | None:
        """The INIT frame, if this is one."""
        try:
            frame = wire.decode(self.payload)
        except DecodeError:
            return None
        return frame if isinstance(frame, InitMessage) else None

    @property
    def message(self) -> RatchetMessage | None:
        """The MESSAGE frame, or message 0 of an INIT (headers travel in clear)."""
        try:
            frame = wire.decode(self.payload)
            if isinstance(frame, InitMessage):
                return wire.decode_message(frame.message)
        except DecodeError:
            return None
        return frame if isinstance(frame, RatchetMessage) else None

    def describe(self) -> str:
        """What the relay can tell about the envelope without any key."""
        return describe(self.payload)


def describe(payload: bytes) -> str:
    """A frame as a relay sees it: its type and its clear header (PROTOCOL.md §13: no padding)."""
    try:
        frame = wire.decode(payload)
    except DecodeError as exc:
        return f"undecodable ({exc})"
    if isinstance(frame, InitMessage):
        try:
            suite = Suite(frame.suite).name
        except ValueError:
            suite = str(frame.suite)
        return f"INIT suite={suite}"
    if isinstance(frame, RatchetMessage):
        return f"MESSAGE dh={frame.dh.hex()[:8]} pn={frame.pn} n={frame.n} ({len(frame.ciphertext)} B)"
    return str(frame.TYPE.name)


# --- tactics ----------------------------------------------------------------------------------------------------


class Tactic:
    """One thing a malicious relay does. Each hook gets what the previous tactic left and returns
    what the next one (and finally the relay) gets; the defaults pass everything through."""

    def send(self, relay: MaliciousRelay, envelope: Captured, payloads: list[bytes]) -> list[bytes]:
        """Payloads to store for `envelope` (the first keeps its msg_id, the others get fresh ones;
        an empty list drops it, though the sender is still told it was accepted)."""
        return payloads

    def bundle(self, relay: MaliciousRelay, requester: str, name: str, bundle: bytes | None) -> bytes | None:
        """The bundle of `name` handed to `requester`."""
        return bundle

    def crl(self, relay: MaliciousRelay, recipient: str, crl: bytes | None) -> bytes | None:
        """The CRL pushed to `recipient` (None: withheld)."""
        return crl


Select = Callable[[Captured], bool]


def messages(sender: str, to: str) -> Select:
    """Select the MESSAGE envelopes from `sender` to `to`."""

    def select(envelope: Captured) -> bool:
        return (
            envelope.sender == sender and envelope.to == to and envelope.init is None and envelope.message is not None
        )

    return select


@dataclass
class FlipBit(Tactic):
    """Flip one bit of the ciphertext of the selected envelopes (the header stays readable)."""

    select: Select

    def send(self, relay: MaliciousRelay, envelope: Captured, payloads: list[bytes]) -> list[bytes]:
        msg = envelope.message
        if msg is None or not self.select(envelope):
            return payloads
        flipped = bytearray(msg.ciphertext)
        flipped[len(flipped) // 2] ^= 0x01
        relay.act(f"flipped a bit in {envelope.sender}→{envelope.to} {envelope.describe()}", peer=envelope.to)
        return [wire.encode(replace(msg, ciphertext=bytes(flipped)))]


@dataclass
class Rewrite(Tactic):
    """Replace each selected envelope by the payloads `forge` makes of it (keep the genuine one by
    returning it too: forgeries then follow it). `label` says what was done, for the timeline."""

    select: Select
    forge: Callable[[Captured], list[bytes]]
    label: str

    def send(self, relay: MaliciousRelay, envelope: Captured, payloads: list[bytes]) -> list[bytes]:
        if not self.select(envelope):
            return payloads
        relay.act(f"{self.label} ({envelope.sender}→{envelope.to} {envelope.describe()})", peer=envelope.to)
        return self.forge(envelope)


@dataclass
class Shuffle(Tactic):
    """Drop some of the selected envelopes and hold others back: `hold[i] = j` releases the i-th
    selected envelope right after the j-th (1-based, in arrival order)."""

    select: Select
    drop: frozenset[int] = frozenset()
    hold: dict[int, int] = field(default_factory=dict)
    _count: int = field(default=0, init=False)
    _held: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list), init=False)

    def send(self, relay: MaliciousRelay, envelope: Captured, payloads: list[bytes]) -> list[bytes]:
        if not self.select(envelope):
            return payloads
        self._count += 1
        index = self._count
        if index in self.drop:
            relay.act(f"dropped #{index} ({envelope.describe()})", peer=envelope.to)
            payloads = []
        elif index in self.hold:
            relay.act(f"held back #{index} until after #{self.hold[index]}", peer=envelope.to)
            self._held[self.hold[index]].extend(payloads)
            payloads = []
        released = self._held.pop(index, [])
        if released:
            relay.act(f"released {len(released)} held envelope(s) after #{index}", peer=envelope.to)
        return payloads + released


@dataclass
class Replay(Tactic):
    """When the selected envelope arrives, store copies of earlier recorded envelopes after it
    (chosen by `pick` from the recording), under fresh msg_ids: to the node they are new envelopes."""

    trigger: Select
    pick: Callable[[list[Captured]], list[Captured]]
    fired: bool = False

    def send(self, relay: MaliciousRelay, envelope: Captured, payloads: list[bytes]) -> list[bytes]:
        if self.fired or not self.trigger(envelope):
            return payloads
        self.fired = True
        old = self.pick(relay.recorded[:-1])
        for item in old:
            relay.act(f"replayed {item.sender}→{item.to} {item.describe()} (captured #{item.seq})", peer=item.to)
        return [*payloads, *(item.payload for item in old)]


@dataclass
class BundleSwap(Tactic):
    """Hand `requester` (anyone, if None) `forge(bundle)` instead of `name`'s real bundle."""

    name: str
    forge: Callable[[PrekeyBundle], PrekeyBundle]
    label: str
    requester: str | None = None

    def bundle(self, relay: MaliciousRelay, requester: str, name: str, bundle: bytes | None) -> bytes | None:
        if bundle is None or name != self.name or self.requester not in (None, requester):
            return bundle
        frame = wire.decode(bundle)
        assert isinstance(frame, PrekeyBundle)
        relay.act(f"{self.label} in {name}'s bundle for {requester}", peer=requester)
        return wire.encode(self.forge(frame))


@dataclass
class FeedControl(Tactic):
    """Withhold every CRL from the feed (`withhold`), or push `substitute` in place of what the CA
    published (a rollback when it is an older CRL)."""

    withhold: bool = False
    substitute: bytes | None = None
    recipients: frozenset[str] | None = None

    def crl(self, relay: MaliciousRelay, recipient: str, crl: bytes | None) -> bytes | None:
        if crl is None or (self.recipients is not None and recipient not in self.recipients):
            return crl
        if self.withhold:
            relay.act(f"withheld the new CRL from {recipient}", peer=recipient)
            return None
        if self.substitute is not None:
            relay.act(f"pushed an old CRL to {recipient} instead of the new one", peer=recipient)
            return self.substitute
        return crl


# --- the malicious relay -------------------------------------------------------------------------------------


class ColludingRelay(Interceptor):
    """A relay that lets a revoked node stay and log in (its accomplice): an honest relay cuts it off
    (PROTOCOL.md §16.3), so a scenario that shows the nodes' own refusal needs this one."""

    def admits_revoked(self, name: str) -> bool:
        return True


class MaliciousRelay(Interceptor):
    """The relay as an attacker: a recorder of everything it routes, plus the `tactics` in force."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.tactics: list[Tactic] = []
        #: Every envelope sent through the relay, in arrival order (the passive recording).
        self.recorded: list[Captured] = []
        #: Every bundle handed out, per (requester, name), as handed out.
        self.bundles: dict[tuple[str, str], PrekeyBundle] = {}
        #: Plaintexts the attacker recovered: (sender, recipient, text).
        self.leaks: list[tuple[str, str, str]] = []
        self._inject: dict[str, list[Deliver]] = defaultdict(list)
        self.relay: Relay | None = None

    def bind(self, relay: Relay) -> None:
        """The relay this interceptor sits in (the lab calls it once the relay runs)."""
        self.relay = relay

    def admits_revoked(self, name: str) -> bool:
        """A malicious relay lets revoked nodes in (they may be its accomplices): the nodes refuse them."""
        return True

    def use(self, *tactics: Tactic) -> None:
        """Put tactics in force (in addition to those already in force)."""
        self.tactics.extend(tactics)

    def honest(self) -> None:
        """Stop attacking (the recording goes on)."""
        if self.tactics:
            self.act("stops attacking (the recording goes on)")
        self.tactics.clear()

    def act(self, text: str, *, peer: str | None = None, **data: Any) -> None:
        """Record an attacker action on the timeline."""
        self.timeline.add(Kind.ATTACK, ATTACKER, f"attacker {text}", peer=peer, **data)

    def leak(self, sender: str, recipient: str, body: bytes, *, how: str) -> str:
        """Record a plaintext the attacker recovered (`body` is the node's message body); a receipt or
        retry request (protocol/body.py) is recorded on the timeline only: it holds no words of the users."""
        text = body_text(body)
        if text is None:
            what = f"attacker reads a receipt {sender}→{recipient} ({how})"
            self.timeline.add(Kind.LEAK, ATTACKER, what, peer=sender)
            return "(a receipt)"
        self.leaks.append((sender, recipient, text))
        self.timeline.add(
            Kind.LEAK, ATTACKER, f"attacker READ {sender}→{recipient}: {text!r} ({how})", peer=sender, plaintext=text
        )
        return text

    def inject(self, recipient: str, sender: str, payload: bytes, *, msg_id: bytes | None = None) -> None:
        """Push `payload` to `recipient` as if from `sender` (under `msg_id`, or a fresh one), right
        after the next envelope the relay delivers to it: the interceptor seam cannot start a
        delivery on its own."""
        self._inject[recipient].append(Deliver(msg_id or os.urandom(16), sender, payload, 0))

    async def fetch_bundle(self, name: str) -> PrekeyBundle | None:
        """Take `name`'s bundle from the relay's store as a FETCH_BUNDLE would (one-time prekey included)."""
        assert self.relay is not None, "not bound to a relay"
        found = await self.relay.store.take_bundle(name)
        if found is None:
            return None
        signed, onetime, _ = found
        frame = wire.decode(signed)
        assert isinstance(frame, PrekeyBundle)
        if onetime is not None:
            frame = frame.with_onetime(OneTimePrekey(*msgpack.unpackb(onetime)))
        return frame

    # --- the Interceptor hooks ---

    async def on_send(self, sender: str, send: Send) -> list[Send]:
        envelope = Captured(len(self.recorded) + 1, sender, send.to, send.msg_id, send.payload, self.timeline.now())
        self.recorded.append(envelope)
        self.timeline.add(
            Kind.RELAY, RELAY, f"relay stores {sender}→{send.to} {envelope.describe()}", peer=send.to, detail=True
        )
        payloads = [send.payload]
        for tactic in list(self.tactics):
            payloads = tactic.send(self, envelope, payloads)
        return [Send(send.msg_id if i == 0 else os.urandom(16), send.to, p) for i, p in enumerate(payloads)]

    async def on_deliver(self, recipient: str, deliver: Deliver) -> list[Deliver]:
        self.timeline.add(
            Kind.RELAY,
            RELAY,
            f"relay delivers {deliver.sender}→{recipient} {describe(deliver.payload)}",
            peer=recipient,
            detail=True,
        )
        injected = self._inject.pop(recipient, [])
        for item in injected:
            self.act(
                f"slips in a frame to {recipient} posing as {item.sender}: {describe(item.payload)}", peer=recipient
            )
        return [deliver, *injected]

    async def on_bundle(self, requester: str, name: str, bundle: bytes | None) -> bytes | None:
        for tactic in list(self.tactics):
            bundle = tactic.bundle(self, requester, name, bundle)
        if bundle is not None:
            frame = wire.decode(bundle)
            assert isinstance(frame, PrekeyBundle)
            self.bundles[(requester, name)] = frame
        self.timeline.add(Kind.RELAY, RELAY, f"relay hands {name}'s bundle to {requester}", peer=requester, detail=True)
        return bundle

    async def on_crl(self, recipient: str, crl: bytes) -> bytes | None:
        pushed: bytes | None = crl
        for tactic in list(self.tactics):
            pushed = tactic.crl(self, recipient, pushed)
        if pushed is not None:
            self.timeline.add(Kind.RELAY, RELAY, f"relay pushes a CRL to {recipient}", peer=recipient, detail=True)
        return pushed


def body_text(data: bytes) -> str | None:
    """The text in a node's message body (protocol/body.py), a note if it is none, None for a receipt
    or a retry request."""
    try:
        content = decode_body(data)
    except DecodeError:
        return "(not a text message)"
    return content.text if isinstance(content, TextBody) else None


# --- identities the attacker can present -------------------------------------------------------------------------


class Impostor:
    """An identity the attacker *claims*: the victim's public key, with signatures made by a key the
    attacker does hold (its own, a rogue CA's subject's, or a stolen one). Duck-types IdentityKey for
    `handshake.initiate`/`respond`, which read `public_bytes` and call `sign`."""

    def __init__(self, public_bytes: bytes, signer: IdentityKey | None = None) -> None:
        self.public_bytes = public_bytes
        self._signer = signer or IdentityKey(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        """A signature by the attacker's key: valid only if that key is the victim's (stolen)."""
        return self._signer.sign(data)

    def identity(self) -> IdentityKey:
        """Typed as the handshake expects it."""
        return cast(IdentityKey, self)


@dataclass(frozen=True)
class Credentials:
    """How the attacker presents itself as a node: a certificate (DER) and who signs for it."""

    certificate: bytes
    signer: Impostor | IdentityKey

    @classmethod
    def claimed(cls, certificate: bytes) -> Credentials:
        """The victim's real certificate, signed for with a key that is not the victim's."""
        cert = x509.load_der_x509_certificate(certificate)
        public = cert.public_key().public_bytes_raw()  # type: ignore[union-attr]
        return cls(certificate, Impostor(public))

    @classmethod
    def stolen(cls, certificate: bytes, identity: IdentityKey) -> Credentials:
        """The victim's certificate and its stolen identity key: indistinguishable from the victim."""
        return cls(certificate, identity)

    @classmethod
    def rogue(cls, enrolled: Enrolled) -> Credentials:
        """A certificate from a CA nobody pinned, with its own (valid) key."""
        return cls(enrolled.certificate, enrolled.identity)

    @property
    def identity(self) -> IdentityKey:
        """Typed as the handshake expects it."""
        return self.signer.identity() if isinstance(self.signer, Impostor) else self.signer


class AnyRevocation:
    """The attacker's revocation check: it vouches for everything (it has no reason to refuse)."""

    def check(self, serial: int, now: datetime) -> None:
        """Never refuses."""


# --- the man in the middle -----------------------------------------------------------------------------------


class Mitm(Tactic):
    """The man in the middle between `a` and `b`, posing as each with `pose_as[name]`.

    * Bundles fetched by a node in `swap_for` get the attacker's own prekeys, signed as `pose_as`
      can sign (a key that is not the owner's, a rogue CA's subject, or a stolen key).
    * INITs sent by a node in `forge_from` are answered by the attacker if they were made for its
      prekeys (it reads message 0), and replaced by its own INIT to the real recipient, started
      with the recipient's real bundle as the sender (carrying message 0 on, or its own `lure`
      when it could not read the original), naming no one-time prekey. With `keep_original`, the genuine INIT still goes
      first and the forged one follows it (to replace the session it opens).
    * Once it holds a session with a victim ("a leg"), every message from that victim is opened,
      read, and re-encrypted on the other leg; what it cannot pass on, it drops.
    """

    def __init__(
        self,
        a: str,
        b: str,
        pose_as: dict[str, Credentials],
        *,
        root: x509.Certificate,
        clock: LabClock,
        suite: Suite,
        swap_for: frozenset[str] = frozenset(),
        forge_from: frozenset[str] = frozenset(),
        keep_original: bool = False,
        lure: str = "hi, it's me. what is the door code?",
    ) -> None:
        self.pair = frozenset((a, b))
        self.pose_as = pose_as
        self.root = root
        self.clock = clock
        self.suite = suite
        self.swap_for = swap_for
        self.forge_from = forge_from
        self.keep_original = keep_original
        self.lure = lure
        #: The attacker's prekeys, by the victim who was last handed them.
        self._handed: dict[str, tuple[handshake.PrekeySecrets, PrekeyBundle]] = {}
        self._real: dict[str, PrekeyBundle] = {}
        #: The attacker's session with each victim, by the victim's name.
        self.legs: dict[str, Session] = {}

    def bundle(self, relay: MaliciousRelay, requester: str, name: str, bundle: bytes | None) -> bytes | None:
        if bundle is None or frozenset((requester, name)) != self.pair:
            return bundle
        real = wire.decode(bundle)
        assert isinstance(real, PrekeyBundle)
        self._real[name] = real
        if requester not in self.swap_for:
            self._handed.pop(requester, None)
            return bundle
        relay.act(f"swapped its own prekeys into {name}'s bundle for {requester}", peer=requester)
        return wire.encode(self._fake_bundle(requester, name, real))

    def _fake_bundle(self, requester: str, name: str, real: PrekeyBundle) -> PrekeyBundle:
        creds = self.pose_as[name]
        spk = X25519KeyPair.generate()
        kem = KemKeyPair.generate() if real.kem is not None else None
        fake = handshake.make_bundle(
            creds.identity, creds.certificate, created=real.created, spk_id=real.spk_id, spk=spk,
            kem_id=real.kem_id, kem=kem,
        )  # fmt: skip
        secrets = handshake.PrekeySecrets()
        secrets.add_signed(fake.spk_id, spk)
        if kem is not None and fake.kem_id is not None:
            secrets.add_kem(fake.kem_id, kem)
        self._handed[requester] = (secrets, fake)
        return fake

    def send(self, relay: MaliciousRelay, envelope: Captured, payloads: list[bytes]) -> list[bytes]:
        if frozenset((envelope.sender, envelope.to)) != self.pair:
            return payloads
        init = envelope.init
        if init is not None:
            return self._on_init(relay, envelope, init) if envelope.sender in self.forge_from else payloads
        msg = envelope.message
        inbound = self.legs.get(envelope.sender)
        outbound = self.legs.get(envelope.to)
        if msg is None or inbound is None:
            return payloads
        try:
            got = inbound.decrypt_message(msg)
        except ProtocolError as exc:
            # Not on the attacker's session after all (the victim refused it): pass it on unread.
            relay.act(
                f"could not open {envelope.sender}'s message ({words_of(exc)}); passes it on", peer=envelope.to
            )
            return payloads
        if got.kind is ContentKind.DATA:
            relay.leak(envelope.sender, envelope.to, got.data, how="its session with the sender")
        return [] if outbound is None else [outbound.encrypt(got.data, kind=got.kind)]

    def _on_init(self, relay: MaliciousRelay, envelope: Captured, init: InitMessage) -> list[bytes]:
        sender, to = envelope.sender, envelope.to
        body = self._answer(relay, sender, to, init)
        real = self._real.get(to)
        if real is None:
            return [] if body is not None else [envelope.payload]
        if body is None:
            # The INIT was made for the real prekeys, so the attacker cannot read it: it sends its own words.
            lure = TextBody(os.urandom(16), int(self.clock.now().timestamp() * 1000), self.lure)
            body = encode_body(lure)
        creds = self.pose_as[sender]
        try:
            # Without a one-time prekey (the relay hands those out, and the genuine INIT may have used it).
            started = handshake.initiate(
                identity=creds.identity, certificate=creds.certificate, bundle=real.with_onetime(None), root=self.root,
                revocation=AnyRevocation(), now=self.clock.now(), expected_name=to, first_message=body,
                suite=self.suite,
            )  # fmt: skip
        except ProtocolError as exc:
            relay.act(f"could not start a session with {to}: {words_of(exc)}", peer=to)
            return [envelope.payload]
        self.legs[to] = started.session
        if self.keep_original:
            relay.act(f"slips its own INIT to {to} behind {sender}'s, posing as {sender}", peer=to)
            return [envelope.payload, started.frame]
        relay.act(f"replaced {sender}'s INIT by its own INIT to {to}, posing as {sender}", peer=to)
        return [started.frame]

    def _answer(self, relay: MaliciousRelay, sender: str, to: str, init: InitMessage) -> bytes | None:
        """Answer an INIT made for the attacker's prekeys, as `to`; message 0's body, or None."""
        held = self._handed.pop(sender, None)
        if held is None:
            return None
        secrets, fake = held
        try:
            answered = handshake.respond(
                init, identity=self.pose_as[to].identity,
                certificate_fingerprint=hashlib.sha256(fake.certificate).digest(), bundle=fake, prekeys=secrets,
                root=self.root, revocation=AnyRevocation(), now=self.clock.now(), allowed_suites=(self.suite,),
            )  # fmt: skip
        except ProtocolError as exc:
            relay.act(f"could not answer {sender}'s INIT: {words_of(exc)}", peer=sender)
            return None
        self.legs[sender] = answered.session
        relay.act(f"answered {sender}'s INIT as {to}: it was made for the attacker's prekeys", peer=sender)
        relay.leak(sender, to, answered.first.data, how="message 0, made for the attacker's prekeys")
        return answered.first.data


# --- key theft --------------------------------------------------------------------------------------------------


def steal_identity(victim: LabNode) -> IdentityKey:
    """Copy a node's identity key out of its unlocked keystore."""
    raw = victim.keystore.get(NS_NODE, "identity")
    assert raw is not None
    return IdentityKey.from_private_bytes(raw)


@dataclass(frozen=True)
class StolenSession:
    """A live session copied out of a node's memory: its state, and the sending chain as it stands
    in memory (the keystore holds that chain only as of the end of the node's current reservation
    of message numbers, PROTOCOL.md §6.4a, so the live chain key is what a memory dump adds)."""

    state: bytes
    chain_key: bytes | None
    sent: int

    def copy(self) -> Session:
        """A working copy of the victim's session."""
        return Session.from_bytes(self.state)


def steal_session(victim: LabNode, peer: str) -> StolenSession:
    """Copy a node's live session with `peer` (its whole ratchet state) out of its memory, as malware
    on the device would; reads the node's private in-memory objects, which is the point."""
    session = victim.node._session(peer)
    assert session is not None, f"no session with {peer}"
    ratchet = session.ratchet
    return StolenSession(session.to_bytes(), ratchet._cks, ratchet._ns)


def x25519_keys(victim: LabNode) -> dict[bytes, X25519KeyPair]:
    """Every X25519 private key a node holds right now (prekeys and each session's ratchet key), by public key."""
    keys: dict[bytes, X25519KeyPair] = {}
    raw = victim.keystore.get(NS_NODE, "prekeys")
    if raw is not None:
        fields = msgpack.unpackb(raw)
        signed, onetime = fields[1], fields[3]
        for _, private in (*signed, *onetime):
            pair = X25519KeyPair.from_private_bytes(private)
            keys[pair.public] = pair
    for peer in victim.keystore.names(NS_SESSION):
        state = victim.keystore.get(NS_SESSION, peer)
        if state is not None:
            pair = X25519KeyPair.from_private_bytes(RatchetState.of(Session.from_bytes(state)).dhs)
            keys[pair.public] = pair
    return keys


@dataclass(frozen=True)
class RatchetState:
    """The fields of a ratchet state the attacker needs, read from its serialised form (PROTOCOL.md
    Appendix A): the sending chain, to derive the keys of messages its owner sends."""

    dhs: bytes
    cks: bytes | None
    ns: int

    @classmethod
    def of(cls, session: Session) -> RatchetState:
        """Parse `session.ratchet.to_bytes()`."""
        _, _, dhs, _, cks, _, ns, _, _, _, _ = msgpack.unpackb(session.ratchet.to_bytes())
        return cls(dhs, cks, ns)


class StateReader:
    """Reads recorded frames of one session with a copy of one side's state (`owner`'s).

    Frames *to* the owner go through the real `Session.decrypt` of the copy, which steps its ratchet
    as the owner did. Frames *from* the owner are opened with keys derived from the sending chain:
    possible while the owner still sends under the ratchet key the copy holds, from the chain
    position the copy holds onwards. The copy's own DH steps draw keys from its keygen: random
    ones, unless the attacker somehow knows the owner's (harvest-now's broken X25519)."""

    def __init__(self, owner: str, session: Session, live: StolenSession | None = None) -> None:
        self.owner = owner
        self.session = session
        # The sending chain as it was in memory when stolen (the state's own is reservation-ahead).
        self._live = RatchetState(RatchetState.of(session).dhs, live.chain_key, live.sent) if live else None

    def read(self, sender: str, message: RatchetMessage) -> tuple[bytes | None, str]:
        """The message body if the copy reaches it, else None; and why, in words."""
        if sender != self.owner:
            try:
                got = self.session.decrypt_message(message)
            except ProtocolError as exc:
                return None, str(exc)
            return got.data, "decrypted with the copy's receiving chain"
        state = RatchetState.of(self.session)
        if self._live is not None and self._live.dhs == state.dhs:
            state = self._live
        if message.dh != X25519KeyPair.from_private_bytes(state.dhs).public or state.cks is None:
            return None, "sent under a ratchet key the attacker never held"
        if message.n < state.ns:
            return None, "its key was used and deleted before the copy was taken"
        chain = state.cks
        for _ in range(message.n - state.ns):
            chain, _ = kdf_ck(chain)
        _, key = kdf_ck(chain)
        aad = header_bytes(message.dh, message.pn, message.n) + self.session.transcript
        try:
            plaintext = AESGCM(key).decrypt(message_nonce(message.n), message.ciphertext, aad)
        except InvalidTag:
            return None, "authentication failed: the derived key does not open it"
        return plaintext[1:], "decrypted with the copy's sending chain"


def replaying(keys: Iterator[X25519KeyPair]) -> Callable[[], X25519KeyPair]:
    """A keygen that hands out known keys in order, then random ones."""

    def keygen() -> X25519KeyPair:
        return next(keys, None) or X25519KeyPair.generate()

    return keygen


def rebuild_initiator(
    init: InitMessage,
    bundle: PrekeyBundle,
    *,
    keys: dict[bytes, X25519KeyPair],
    later: list[bytes],
    root: x509.Certificate,
    kem_secret: bytes | None,
) -> Session | None:
    """The initiator's session rebuilt from a recorded INIT, the bundle it was made from, and X25519
    private keys (`keys`, by public key): the ephemeral, and the ratchet keys the initiator used
    `later`, in order. Suite 1 also needs the ML-KEM shared secret; pass the attacker's best guess.
    None if the ephemeral key is not known."""
    ephemeral = keys.get(init.ephemeral)
    if ephemeral is None:
        return None
    suite = Suite(init.suite)
    creds = Credentials.claimed(init.certificate)
    ciphertext = init.kem_ciphertext
    guess = kem_secret or bytes(32)
    # `initiate` gives the transcript hash (the same bundle, identities, ephemeral, KEM ciphertext and
    # creation time give the same hash); the root key is then derived here from what the attacker knows.
    started = handshake.initiate(
        identity=creds.identity, certificate=init.certificate, bundle=bundle, root=root, revocation=AnyRevocation(),
        now=handshake.from_millis(init.created), expected_name=_common_name(bundle.certificate), suite=suite,
        keygen=lambda: ephemeral,
        kem_encaps=lambda _: (guess, ciphertext or b""),
    )  # fmt: skip
    dh1 = ephemeral.exchange(bundle.spk)
    secrets = dh1 + (ephemeral.exchange(bundle.otpk) if bundle.otpk is not None else b"")
    if suite is Suite.HYBRID:
        secrets += guess
    rk = root_key(secrets, started.session.transcript, insecure=suite is Suite.INSECURE_UNSIGNED)
    replay = replaying(keys[k] for k in later if k in keys)
    ratchet = Ratchet.initiator(rk, ours=ephemeral, theirs=bundle.spk, dh_output=dh1, keygen=replay)
    return Session(
        ratchet,
        transcript=started.session.transcript,
        peer=started.session.peer,
        peer_fingerprint=started.session.peer_fingerprint,
        suite=suite,
    )


def _common_name(certificate: bytes) -> str:
    cert = x509.load_der_x509_certificate(certificate)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
