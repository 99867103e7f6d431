"""The relay as an attacker (PROTOCOL.md §12): what it sees of an envelope, and the relay that records
everything it routes and runs the tactics in force (`scenarios.attacker.tactics`).

`MaliciousRelay` is an `Interceptor`, the seam `relay.server.Relay` calls on everything it routes:
it records every envelope (the passive recorder), passes each through the tactics, and can slip
frames of its own in. `ColludingRelay` only lets a revoked node in.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from protocol import wire
from protocol.body import TextBody
from protocol.body import decode as decode_body
from protocol.errors import DecodeError
from protocol.link import Deliver, Send
from protocol.messages import InitMessage, PrekeyBundle, RatchetMessage, Suite
from relay.interceptor import Interceptor
from relay.server import Relay
from scenarios.timeline import ATTACKER, RELAY, Kind, Timeline

if TYPE_CHECKING:
    from scenarios.attacker.tactics import Tactic


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
        return frame.with_onetime(onetime)

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
