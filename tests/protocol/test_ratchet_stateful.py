"""A hypothesis state machine over two real sessions and a hostile network.

Setup runs a real HYBRID handshake (alice → bob). Then, in any order: either side sends; the network
delivers any in-flight frame (so it reorders), drops, duplicates, reverses its queue, replays old
frames and delivers bit-flipped copies; either side may be persisted and restored.

Invariants:
* every delivered plaintext was sent by the other side, and is delivered at most once;
* a bit-flipped frame is always refused (AuthenticationFailed, DecodeError, DuplicateMessage or
  TooManySkipped), never accepted;
* a refused frame leaves the receiving session byte-identical (`to_bytes`);
* a genuine frame never delivered before is accepted unless its chain was forgotten (older than
  MAX_OLD_CHAINS DH steps);
* the skipped-key store never exceeds MAX_SKIPPED_KEYS.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from protocol import wire
from protocol.errors import AuthenticationFailed, DecodeError, DuplicateMessage, TooManySkipped
from protocol.handshake import decode_init
from protocol.ratchet import MAX_SKIPPED_KEYS
from protocol.session import Kind, Session
from tests.support.pki import ALICE, BOB, CA, establish, make_prekeys

REFUSALS = (AuthenticationFailed, DecodeError, DuplicateMessage, TooManySkipped)
SIDES = st.sampled_from(["a", "b"])
OTHER = {"a": "b", "b": "a"}


class TwoSessions(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sessions: dict[str, Session] = {}
        #: Frames sent by a side and not yet delivered or dropped (the network's queue towards the other).
        self.in_flight: dict[str, list[bytes]] = {"a": [], "b": []}
        #: Every frame a side ever sent (for replays and bit flips).
        self.history: dict[str, list[bytes]] = {"a": [], "b": []}
        self.sent: dict[str, set[bytes]] = {"a": set(), "b": set()}
        self.delivered: dict[str, set[bytes]] = {"a": set(), "b": set()}
        #: Frames whose plaintext was delivered (a genuine frame not in here must be accepted if its chain is known).
        self.accepted_frames: set[bytes] = set()
        self.counter = 0
        self.refused_flips = 0

    @initialize()
    def handshake(self) -> None:
        initiated, responded = establish(CA, ALICE, make_prekeys(BOB), first=b"a:0")
        self.sessions = {"a": initiated.session, "b": responded.session}
        message0 = decode_init(initiated.frame).message
        self.history["a"].append(message0)
        self.sent["a"].add(b"a:0")
        self.delivered["b"].add(b"a:0")
        self.accepted_frames.add(message0)

    # --- helpers ---------------------------------------------------------------------------------------

    def _deliver(self, sender: str, frame: bytes, *, genuine: bool) -> None:
        receiver = self.sessions[OTHER[sender]]
        ratchet = receiver.ratchet
        known_chains = {ratchet._dhr, *ratchet._old_chains}
        before = receiver.to_bytes()
        try:
            got = receiver.decrypt(frame)
        except REFUSALS as exc:
            assert receiver.to_bytes() == before, f"refused frame changed the state ({exc!r})"
            if genuine and frame not in self.accepted_frames:
                # Liveness: only a frame of a forgotten chain may be lost.
                dh = wire.decode_message(frame).dh
                assert dh not in known_chains, f"genuine frame of a known chain refused: {exc!r}"
                assert isinstance(exc, AuthenticationFailed)
            return
        assert genuine, "a tampered frame was accepted"
        assert got.kind is Kind.DATA
        assert got.data in self.sent[sender], "delivered plaintext was never sent"
        assert got.data not in self.delivered[OTHER[sender]], "plaintext delivered twice"
        self.delivered[OTHER[sender]].add(got.data)
        self.accepted_frames.add(frame)

    # --- rules -----------------------------------------------------------------------------------------

    @rule(side=SIDES, size=st.integers(0, 40))
    def send(self, side: str, size: int) -> None:
        self.counter += 1
        payload = f"{side}:{self.counter}:".encode() + b"x" * size
        frame = self.sessions[side].encrypt(payload)
        self.sent[side].add(payload)
        self.in_flight[side].append(frame)
        self.history[side].append(frame)

    @rule(side=SIDES, count=st.integers(2, 30))
    def send_burst(self, side: str, count: int) -> None:
        for _ in range(count):
            self.send(side, 0)

    @rule(side=SIDES, rounds=st.integers(1, 8))
    def chat(self, side: str, rounds: int) -> None:
        """Send-and-deliver, alternating sides: each change of direction is a DH step, so old chains pile up."""
        for _ in range(rounds):
            self.send(side, 3)
            frame = self.in_flight[side].pop()
            self._deliver(side, frame, genuine=True)
            side = OTHER[side]

    def _queue(self, side: str) -> tuple[str, list[bytes]]:
        """The queue of `side` if it holds frames, else the other one's (so these rules are never no-ops
        while anything is in flight)."""
        sender = side if self.in_flight[side] else OTHER[side]
        return sender, self.in_flight[sender]

    @rule(side=SIDES, index=st.integers(0, 1000))
    def deliver(self, side: str, index: int) -> None:
        sender, queue = self._queue(side)
        if queue:
            self._deliver(sender, queue.pop(index % len(queue)), genuine=True)

    @rule(side=SIDES, index=st.integers(0, 1000))
    def drop(self, side: str, index: int) -> None:
        _, queue = self._queue(side)
        if queue:
            queue.pop(index % len(queue))

    @rule(side=SIDES, index=st.integers(0, 1000))
    def duplicate(self, side: str, index: int) -> None:
        _, queue = self._queue(side)
        if queue:
            queue.append(queue[index % len(queue)])

    @rule(side=SIDES)
    def reverse(self, side: str) -> None:
        self.in_flight[side].reverse()

    @rule(side=SIDES, index=st.integers(0, 1000))
    def replay(self, side: str, index: int) -> None:
        frames = self.history[side]
        if frames:
            self._deliver(side, frames[index % len(frames)], genuine=True)

    @rule(side=SIDES, index=st.integers(0, 1000), bit=st.integers(0, 2**20))
    def bit_flip(self, side: str, index: int, bit: int) -> None:
        frames = self.history[side]
        if not frames:
            return
        frame = bytearray(frames[index % len(frames)])
        bit %= len(frame) * 8
        frame[bit // 8] ^= 1 << (bit % 8)
        self._deliver(side, bytes(frame), genuine=False)
        self.refused_flips += 1

    @rule(side=SIDES)
    def restore(self, side: str) -> None:
        """Persist and restore a side: the state must survive byte for byte."""
        state = self.sessions[side].to_bytes()
        self.sessions[side] = Session.from_bytes(state)
        assert self.sessions[side].to_bytes() == state

    # --- invariants ---------------------------------------------------------------------------------------

    @invariant()
    def skipped_store_is_bounded(self) -> None:
        for session in self.sessions.values():
            assert session.ratchet.skipped_count <= MAX_SKIPPED_KEYS

    @invariant()
    def delivered_were_sent(self) -> None:
        assert self.delivered["a"] <= self.sent["b"]
        assert self.delivered["b"] <= self.sent["a"]


TwoSessions.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_two_sessions = TwoSessions.TestCase
