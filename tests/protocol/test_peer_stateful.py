"""A hypothesis state machine over two peers' engines (protocol/peer.py with real handshakes) and a
hostile network: either side sends (starting a session when it holds none, as a node does), the
network delivers any frame in flight (so INITs cross and arrive late), drops and duplicates; either
side restarts from what it persisted, or loses every session (a detected rollback); and the CA may
revoke one side, which the other learns from a CRL.

Invariants: every delivered plaintext was sent by the other side and is delivered at most once; no
(session, ratchet key, message number) ever encrypts twice (no AES-GCM key and nonce reuse); nothing
a revoked peer sends is delivered once the CRL listing it is held; and once the network is honest
again the conversation recovers by itself within a bounded number of messages, both ways (unless a
side was revoked).
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from protocol import handshake, wire
from protocol.errors import RemoteError
from protocol.messages import InitMessage
from protocol.peer import MAX_AUTH_FAILURES, Conversation
from protocol.session import Kind, Session
from tests.support.pki import ALICE, BOB, CA, NOW, Node, Prekeys, make_prekeys

SIDES = st.sampled_from(["a", "b"])
OTHER = {"a": "b", "b": "a"}
WHO: dict[str, Node] = {"a": ALICE, "b": BOB}
NAME = {"a": "alice", "b": "bob"}
#: Rounds of honest traffic within which a conversation must have recovered.
RECOVERY_ROUNDS = MAX_AUTH_FAILURES + 3


class Peer:
    """What a node keeps for one peer, reduced to the engine: the conversation and whether its
    current session is confirmed (the node's peer record says "established")."""

    def __init__(self, side: str) -> None:
        self.side = side
        self.conversation = Conversation()
        self.confirmed = False
        self.prekeys: Prekeys = make_prekeys(WHO[side], onetime=0)


class TwoEngines(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.peers = {"a": Peer("a"), "b": Peer("b")}
        self.in_flight: dict[str, list[bytes]] = {"a": [], "b": []}  # towards that side
        self.sent: dict[str, set[bytes]] = {"a": set(), "b": set()}
        self.delivered: dict[str, list[bytes]] = {"a": [], "b": []}
        self.nonces: set[tuple[bytes, bytes, int]] = set()
        self.counter = 0
        self.ms = 0
        #: Sides the CA revoked (the other side holds the CRL that lists them), and what each
        #: receiver had delivered when it learned of it.
        self.revoked: set[str] = set()
        self.delivered_before_revocation: dict[str, int] = {}

    @initialize()
    def start(self) -> None:
        self.ms = 0

    # --- what a node does ------------------------------------------------------------------------------

    def now(self) -> object:
        self.ms += 1
        return NOW + timedelta(milliseconds=self.ms)

    def _note(self, session: Session, frame: bytes) -> None:
        decoded = wire.decode(frame)
        message = wire.decode_message(decoded.message) if isinstance(decoded, InitMessage) else decoded
        key = (session.transcript, message.dh, message.n)  # type: ignore[union-attr]
        assert key not in self.nonces, "a (key, nonce) pair was used twice"
        self.nonces.add(key)

    def _crl(self) -> object:
        return CA.revocation([WHO[s].serial for s in self.revoked])

    def _initiate(self, side: str, body: bytes, kind: Kind = Kind.DATA) -> None:
        me, peer = self.peers[side], self.peers[OTHER[side]]
        if OTHER[side] in self.revoked:
            return  # our own check refuses a revoked peer's bundle (a revoked thief still tries: the peer refuses)
        started = handshake.initiate(
            identity=WHO[side].identity,
            certificate=WHO[side].cert,
            bundle=peer.prekeys.fetch(),
            root=CA.root,
            revocation=self._crl(),  # type: ignore[arg-type]
            now=self.now(),  # type: ignore[arg-type]
            expected_name=NAME[OTHER[side]],
            first_message=body,
            first_kind=kind,
        )
        me.conversation.adopt(started.session)
        me.confirmed = False
        self._note(started.session, started.frame)
        self.in_flight[OTHER[side]].append(started.frame)

    def _send(self, side: str) -> bytes:
        self.counter += 1
        body = f"{side}:{self.counter}".encode()
        self.sent[side].add(body)
        current = self.peers[side].conversation.current
        if current is None or current.closed is not None:
            self._initiate(side, body)
        else:
            message = current.encrypt_message(body)
            frame = wire.encode(message)
            self._note(current, frame)
            self.in_flight[OTHER[side]].append(frame)
        return body

    def _receive(self, side: str, frame: bytes) -> None:
        me = self.peers[side]
        try:
            decoded = wire.decode(frame)
            if isinstance(decoded, InitMessage):
                initiator = WHO[OTHER[side]].fingerprint
                me.conversation.check_init(decoded.created, initiator, confirmed=me.confirmed)
                responded = handshake.respond(
                    decoded,
                    identity=WHO[side].identity,
                    certificate_fingerprint=WHO[side].fingerprint,
                    bundle=me.prekeys.bundle,
                    prekeys=me.prekeys.secrets,
                    root=CA.root,
                    revocation=self._crl(),  # type: ignore[arg-type]
                    now=NOW + timedelta(milliseconds=self.ms + 1),
                )
                if me.conversation.adopt(responded.session):
                    me.confirmed = True
                received = responded.first
            else:
                received, session = me.conversation.decrypt(wire.decode_message(frame))
                if session is me.conversation.current:
                    me.confirmed = True
        except RemoteError:
            if me.conversation.reset_due:
                self._initiate(side, b"", Kind.HEARTBEAT)
            return
        if received.kind is Kind.DATA:
            self.delivered[side].append(received.data)

    # --- rules -----------------------------------------------------------------------------------------

    @rule(side=SIDES)
    def send(self, side: str) -> None:
        self._send(side)

    @rule(side=SIDES, pick=st.integers(min_value=0))
    def deliver(self, side: str, pick: int) -> None:
        queue = self.in_flight[side]
        if queue:
            self._receive(side, queue.pop(pick % len(queue)))

    @rule(side=SIDES, pick=st.integers(min_value=0))
    def drop(self, side: str, pick: int) -> None:
        queue = self.in_flight[side]
        if queue:
            queue.pop(pick % len(queue))

    @rule(side=SIDES, pick=st.integers(min_value=0))
    def duplicate(self, side: str, pick: int) -> None:
        queue = self.in_flight[side]
        if queue:
            queue.append(queue[pick % len(queue)])

    @rule(side=SIDES)
    def restart(self, side: str) -> None:
        conversation = self.peers[side].conversation
        current = conversation.current
        restored = Conversation(
            Session.from_bytes(current.to_bytes()) if current is not None else None,
            Conversation.archive_from_bytes(conversation.archive_bytes()),
        )
        self.peers[side].conversation = restored

    @rule(side=SIDES)
    def rolled_back(self, side: str) -> None:
        """The node found its keystore older than its epoch: every session dropped, a new handshake."""
        self.peers[side].conversation = Conversation()
        self.peers[side].confirmed = False
        self._initiate(side, b"", Kind.HEARTBEAT)

    @rule(side=SIDES)
    def revoke(self, side: str) -> None:
        """The CA revokes `side`; the other side accepts the CRL and closes every session with it."""
        if self.revoked:
            return
        self.revoked.add(side)
        receiver = OTHER[side]
        self.peers[receiver].conversation.close("peer revoked")
        self.delivered_before_revocation[receiver] = len(self.delivered[receiver])

    @rule()
    def network_turns_honest(self) -> None:
        """Everything in flight arrives in order; then the two talk with each message delivered at once:
        within RECOVERY_ROUNDS rounds, a message each way gets through."""
        for side in ("a", "b"):
            while self.in_flight[side]:
                self._receive(side, self.in_flight[side].pop(0))
        if self.revoked:
            return  # nothing recovers with a revoked peer (checked by the invariant below)
        for _ in range(RECOVERY_ROUNDS):
            through = []
            for side in ("a", "b"):
                body = self._send(side)
                while self.in_flight[OTHER[side]]:
                    self._receive(OTHER[side], self.in_flight[OTHER[side]].pop(0))
                while self.in_flight[side]:  # a handshake the receiver started by itself
                    self._receive(side, self.in_flight[side].pop(0))
                through.append(body in self.delivered[OTHER[side]])
            if all(through):
                return
        raise AssertionError("the conversation did not recover once the network was honest")

    # --- invariants ------------------------------------------------------------------------------------

    @invariant()
    def nothing_from_a_revoked_peer_once_the_crl_is_held(self) -> None:
        for receiver, count in self.delivered_before_revocation.items():
            assert len(self.delivered[receiver]) == count, "a revoked peer's message was delivered"

    @invariant()
    def delivered_once_and_only_what_was_sent(self) -> None:
        for side in ("a", "b"):
            got = self.delivered[side]
            assert len(got) == len(set(got)), "a plaintext was delivered twice"
            assert set(got) <= self.sent[OTHER[side]], "a plaintext nobody sent was delivered"


TwoEngines.TestCase.settings = settings(
    max_examples=150, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_two_engines = TwoEngines.TestCase
