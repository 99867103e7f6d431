"""A hypothesis state machine over two real peer engines (protocol/peer.py `Peer`) and a hostile network.

Each side is what a node keeps for the other: one `Peer` engine, the records it committed (every
`Outcome`'s puts and deletes, as the node's journal does), and its prekey account. The node's shell is
reduced to its rules: a send starts a session (`start`) when none is open, else `encrypt`s; a refused
frame that makes a fresh handshake due starts one (`reset_due`, a HEARTBEAT INIT); a due heartbeat is
sent; a CRL is applied with `revoked_by` → `close`.

The network delivers any frame in flight (reordering), drops, duplicates (a relay's redelivery under the
same id, or a replay under a new one), and holds an INIT back to deliver it late. Either side crashes
and restarts from the records it committed; restores an old copy of its keystore (which the rollback
detector catches: every session dropped, a new handshake); renews its certificate (same identity key,
new serial); and the CA may revoke one side, every certificate of its key, which the other side learns
from a CRL.

Invariants: no (session, ratchet key, message number), i.e. no AES-GCM (key, nonce), ever encrypts
twice; every delivered plaintext was sent by the other side and is delivered at most once; nothing a
revoked peer sends is delivered once the CRL listing it is held; and once the network turns honest
the conversation recovers by itself within a bounded number of messages, both ways (unless a side
was revoked).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from protocol import handshake, wire
from protocol.errors import ProtocolError, UnknownPrekey
from protocol.messages import InitMessage, PrekeyBundle
from protocol.peer import MAX_AUTH_FAILURES, NS_ARCHIVE, NS_PEER, NS_SEEN, NS_SESSION, Local, Outcome, Peer
from protocol.session import Kind
from tests.support.pki import ALICE, BOB, CA, NOW, Node, make_prekeys, reloaded, stored

SIDES = st.sampled_from(["a", "b"])
OTHER = {"a": "b", "b": "a"}
NAME = {"a": "alice", "b": "bob"}
#: Rounds of honest traffic within which a conversation must have recovered.
RECOVERY_ROUNDS = MAX_AUTH_FAILURES + 3
#: Message numbers reserved per durable write (small, so that crashes land inside and across reservations).
RESERVE = 4

Records = dict[tuple[str, str], bytes]


class Side:
    """One node as its engine for the other side sees it: the engine, its committed records, its prekeys."""

    def __init__(self, side: str, node: Node) -> None:
        self.node = node
        self.peer_name = NAME[OTHER[side]]
        self.engine = Peer(self.peer_name)
        self.records: Records = {}
        self.prekeys = make_prekeys(node, onetime=0)
        self.serials = [node.serial]
        #: The serials the CRL this side holds lists.
        self.revoked: frozenset[int] = frozenset()
        self.ids = 0

    def local(self) -> Local:
        def bundle(spk_id: int) -> PrekeyBundle:
            if spk_id != self.prekeys.bundle.spk_id:
                raise UnknownPrekey(f"signed prekey {spk_id} is not ours")
            return self.prekeys.bundle

        return Local(
            identity=self.node.identity,
            certificate=self.node.cert,
            fingerprint=self.node.fingerprint,
            root=CA.root,
            revocation=CA.revocation(self.revoked),
            revoked=self.revoked,
            prekeys=self.prekeys.secrets,
            bundle=bundle,
        )

    def commit(self, outcome: Outcome) -> Outcome:
        """What the node's journal does with an outcome (the model commits at once, and never fails)."""
        self.records.update(outcome.puts)
        for key in outcome.deletes:
            self.records.pop(key, None)
        return outcome

    def restored(self, records: Records) -> Peer:
        """The engine as a node restarting on `records` restores it (node/sessions.py)."""
        return Peer.restore(
            self.peer_name,
            session=records.get((NS_SESSION, self.peer_name)),
            archive=records.get((NS_ARCHIVE, self.peer_name)),
            record=records.get((NS_PEER, self.peer_name)),
            seen=[bytes.fromhex(name.rsplit(":", 1)[1]) for ns, name in records if ns == NS_SEEN],
        )

    def next_id(self) -> bytes:
        self.ids += 1
        return self.node.name.encode() + self.ids.to_bytes(8, "big")


class TwoEngines(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sides = {"a": Side("a", ALICE), "b": Side("b", BOB)}
        #: Frames in flight towards a side, with the relay's delivery id.
        self.in_flight: dict[str, list[tuple[bytes, bytes]]] = {"a": [], "b": []}
        #: INITs the network holds back, to deliver late.
        self.held: dict[str, list[tuple[bytes, bytes]]] = {"a": [], "b": []}
        self.sent: dict[str, set[bytes]] = {"a": set(), "b": set()}
        self.delivered: dict[str, list[bytes]] = {"a": [], "b": []}
        self.nonces: set[tuple[bytes, bytes, int]] = set()
        #: A copy of a side's keystore (engine records and prekey account) taken earlier: a backup.
        self.backups: dict[str, tuple[Records, tuple[bytes, Records], int]] = {}
        #: What a side delivered between a backup and its restore: a replay of it may be shown again
        #: (the restored keystore forgot it was taken; PROTOCOL.md §8.2).
        self.forgotten: dict[str, set[bytes]] = {"a": set(), "b": set()}
        self.counter = 0
        self.ms = 0
        self.serial = 1000
        #: The side the CA revoked, and what the other side had delivered when it took the CRL.
        self.revoked: str | None = None
        self.delivered_before_revocation = 0

    # --- what a node does ------------------------------------------------------------------------------

    def now(self) -> datetime:
        self.ms += 1
        return NOW + timedelta(milliseconds=self.ms)

    def _note(self, side: str, frame: bytes) -> None:
        """Every frame that leaves: its AES-GCM (key, nonce) is (session, ratchet key, message number)."""
        session = self.sides[side].engine.conversation.current
        assert session is not None
        decoded = wire.decode(frame)
        message = wire.decode_message(decoded.message) if isinstance(decoded, InitMessage) else decoded
        key = (session.transcript, message.dh, message.n)  # type: ignore[union-attr]
        assert key not in self.nonces, "a (key, nonce) pair was used twice"
        self.nonces.add(key)
        self.in_flight[OTHER[side]].append((self.sides[side].next_id(), frame))

    def _start(self, side: str, body: bytes, kind: Kind) -> None:
        me, peer = self.sides[side], self.sides[OTHER[side]]
        try:
            outcome = me.engine.start(peer.prekeys.fetch(), self.now(), me.local(), first=body, kind=kind)
        except ProtocolError:
            return  # refused (a revoked peer): nothing leaves
        me.commit(outcome)
        assert outcome.frame is not None
        self._note(side, outcome.frame)

    def _encrypt(self, side: str, body: bytes, kind: Kind) -> None:
        me = self.sides[side]
        outcome = me.commit(me.engine.encrypt(body, kind=kind, reserve=RESERVE))
        assert outcome.frame is not None
        self._note(side, outcome.frame)

    def _send(self, side: str) -> bytes:
        self.counter += 1
        body = f"{side}:{self.counter}".encode()
        self.sent[side].add(body)
        me = self.sides[side]
        me.engine.expire(self.now())
        if me.engine.current is None:
            self._start(side, body, Kind.DATA)
        else:
            self._encrypt(side, body, Kind.DATA)
        return body

    def _receive(self, side: str, msg_id: bytes, frame: bytes) -> None:
        me = self.sides[side]
        outcome = me.commit(me.engine.receive(frame, self.now(), me.local(), msg_id=msg_id))
        if outcome.refused:
            if me.engine.reset_due:
                self._start(side, b"", Kind.HEARTBEAT)
            return
        received = outcome.received
        if received is not None and received.kind is Kind.DATA:
            self.delivered[side].append(received.data)
        if me.engine.heartbeat_due:
            self._encrypt(side, b"", Kind.HEARTBEAT)

    def _flush(self, side: str) -> None:
        while self.in_flight[side]:
            self._receive(side, *self.in_flight[side].pop(0))

    # --- rules: traffic and the network ------------------------------------------------------------------

    @rule(side=SIDES)
    def send(self, side: str) -> None:
        self._send(side)

    @rule(side=SIDES, pick=st.integers(min_value=0))
    def deliver(self, side: str, pick: int) -> None:
        """Any frame in flight arrives (the network reorders freely)."""
        queue = self.in_flight[side]
        if queue:
            self._receive(side, *queue.pop(pick % len(queue)))

    @rule(side=SIDES, pick=st.integers(min_value=0))
    def drop(self, side: str, pick: int) -> None:
        queue = self.in_flight[side]
        if queue:
            queue.pop(pick % len(queue))

    @rule(side=SIDES, pick=st.integers(min_value=0), replay=st.booleans())
    def duplicate(self, side: str, pick: int, replay: bool) -> None:
        """A redelivery under the same relay id, or (`replay`) an attacker's copy under a new one."""
        queue = self.in_flight[side]
        if queue:
            msg_id, frame = queue[pick % len(queue)]
            queue.append((self.sides[OTHER[side]].next_id() if replay else msg_id, frame))

    @rule(side=SIDES, pick=st.integers(min_value=0))
    def reorder(self, side: str, pick: int) -> None:
        """A frame in flight overtaken by all the others."""
        queue = self.in_flight[side]
        if queue:
            queue.append(queue.pop(pick % len(queue)))

    @rule(side=SIDES)
    def hold_an_init(self, side: str) -> None:
        """The network holds back the first INIT in flight towards `side`, to deliver it late."""
        queue = self.in_flight[side]
        for index, (_, frame) in enumerate(queue):
            if isinstance(wire.decode(frame), InitMessage):
                self.held[side].append(queue.pop(index))
                return

    @rule(side=SIDES)
    def deliver_a_held_init(self, side: str) -> None:
        if self.held[side]:
            self._receive(side, *self.held[side].pop(0))

    # --- rules: the nodes ----------------------------------------------------------------------------------

    @rule(side=SIDES)
    def crash(self, side: str) -> None:
        """The process dies: the engine and prekey account come back from what was committed."""
        me = self.sides[side]
        me.engine = me.restored(me.records)
        me.prekeys.secrets = reloaded(me.prekeys.secrets)

    @rule(side=SIDES)
    def back_up(self, side: str) -> None:
        me = self.sides[side]
        self.backups[side] = (dict(me.records), stored(me.prekeys.secrets), len(self.delivered[side]))

    @rule(side=SIDES)
    def restore_an_old_copy(self, side: str) -> None:
        """The keystore is restored from the backup. The rollback detector (node/epoch.py) finds it older
        than its epoch: the node drops every session (node/sessions.py `drop_all`) and starts a new one."""
        if side not in self.backups:
            return
        me = self.sides[side]
        records, (account, entries), delivered = self.backups[side]
        self.forgotten[side].update(self.delivered[side][delivered:])
        me.records = {key: value for key, value in records.items() if key[0] not in (NS_SESSION, NS_ARCHIVE)}
        me.prekeys.secrets = handshake.PrekeySecrets.from_bytes(
            account, [(name, value) for (_, name), value in entries.items()]
        )
        me.engine = me.restored(me.records)
        self._start(side, b"", Kind.HEARTBEAT)

    @rule(side=SIDES)
    def renew(self, side: str) -> None:
        """The CA renews `side`'s certificate (same identity key, new serial); its bundle carries it. A
        revoked key is never renewed (ca/issuance.py refuses it)."""
        if side == self.revoked:
            return
        me = self.sides[side]
        self.serial += 1
        me.node = CA.enrol(me.node.name, self.serial, identity=me.node.identity)
        me.serials.append(self.serial)
        old = me.prekeys.bundle
        me.prekeys.owner = me.node
        me.prekeys.bundle = handshake.make_bundle(
            me.node.identity,
            me.node.cert,
            created=old.created,
            spk_id=old.spk_id,
            spk=me.prekeys.spk,
            kem_id=old.kem_id,
            kem=me.prekeys.kem,
        )

    @rule(side=SIDES)
    def revoke(self, side: str) -> None:
        """The CA revokes every certificate of `side`'s key; the other side takes the CRL and closes what
        it lists (a revoked thief keeps the key and goes on sending)."""
        if self.revoked is not None:
            return
        self.revoked = side
        receiver = self.sides[OTHER[side]]
        before, receiver.revoked = receiver.revoked, frozenset(self.sides[side].serials)
        serial = receiver.engine.revoked_by(receiver.revoked, before)
        if serial is not None:
            receiver.commit(receiver.engine.close(f"certificate {serial:x} revoked (key-compromise)"))
        self.delivered_before_revocation = len(self.delivered[OTHER[side]])

    @rule()
    def network_turns_honest(self) -> None:
        """Everything in flight (and held) arrives in order; then the two talk with each message delivered
        at once: within RECOVERY_ROUNDS rounds, a message each way gets through."""
        for side in ("a", "b"):
            self.in_flight[side].extend(self.held[side])
            self.held[side].clear()
        while self.in_flight["a"] or self.in_flight["b"]:
            self._flush("a")
            self._flush("b")
        if self.revoked is not None:
            return  # nothing recovers with a revoked peer (checked by the invariant below)
        for _ in range(RECOVERY_ROUNDS):
            through = []
            for side in ("a", "b"):
                body = self._send(side)
                while self.in_flight["a"] or self.in_flight["b"]:
                    self._flush(OTHER[side])
                    self._flush(side)
                through.append(body in self.delivered[OTHER[side]])
            if all(through):
                return
        raise AssertionError("the conversation did not recover once the network was honest")

    # --- invariants ------------------------------------------------------------------------------------

    @invariant()
    def nothing_from_a_revoked_peer_once_the_crl_is_held(self) -> None:
        if self.revoked is not None:
            receiver = OTHER[self.revoked]
            assert len(self.delivered[receiver]) == self.delivered_before_revocation, "a revoked peer got through"

    @invariant()
    def delivered_once_and_only_what_was_sent(self) -> None:
        for side in ("a", "b"):
            got = self.delivered[side]
            twice = {body for body in got if got.count(body) > 1}
            assert twice <= self.forgotten[side], "a plaintext was delivered twice"
            assert set(got) <= self.sent[OTHER[side]], "a plaintext nobody sent was delivered"


TwoEngines.TestCase.settings = settings(
    max_examples=300, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_two_engines = TwoEngines.TestCase
