"""What a malicious relay does to what it routes, one `Tactic` each: flip bits, rewrite, drop and hold
back (delay, reorder), replay, swap bundles, withhold or roll back the CRL feed.

Tactics chain: each hook gets what the previous tactic left. `Mitm` (`scenarios.attacker.mitm`) is
a tactic too.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from protocol import wire
from protocol.messages import PrekeyBundle
from scenarios.attacker.malicious_relay import Captured, MaliciousRelay


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
