"""The man in the middle: poses as each side to the other with whatever credentials it has and
re-encrypts both ways when the handshake lets it (PROTOCOL.md §12)."""

from __future__ import annotations

import hashlib
import os

from cryptography import x509

from node.errors import words_of
from protocol import handshake, wire
from protocol.body import TextBody
from protocol.body import encode as encode_body
from protocol.errors import ProtocolError
from protocol.identity import KemKeyPair, X25519KeyPair
from protocol.messages import InitMessage, PrekeyBundle, Suite
from protocol.session import Kind as ContentKind
from protocol.session import Session
from scenarios.attacker.credentials import AnyRevocation, Credentials
from scenarios.attacker.malicious_relay import Captured, MaliciousRelay
from scenarios.attacker.tactics import Tactic
from scenarios.lab import LabClock


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
            relay.act(f"could not open {envelope.sender}'s message ({words_of(exc)}); passes it on", peer=envelope.to)
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
