"""protocol.peer's state table, driven through real engines: every PeerState × every frame type, with
the next state it leads to or the precise refusal (PROTOCOL.md §8.1), and each state read back from the
records the engine said to commit (a restart in that state)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import pytest

from protocol import wire
from protocol.errors import CertificateRevoked, SessionClosed, StaleInit, UnknownPrekey
from protocol.messages import FrameType, PrekeyBundle
from protocol.peer import NS_ARCHIVE, NS_PEER, NS_SEEN, NS_SESSION, TRANSITIONS, Local, Outcome, Peer, PeerState
from protocol.session import Kind
from tests.support.pki import ALICE, BOB, CA, NOW, Node, Prekeys, make_prekeys

MS = timedelta(milliseconds=1)

#: The documented table (PROTOCOL.md §8.1), written out independently of TRANSITIONS.
DOCUMENTED = {
    (PeerState.IDLE, FrameType.BUNDLE): PeerState.INITIATED,
    (PeerState.IDLE, FrameType.INIT): PeerState.ESTABLISHED,
    (PeerState.INITIATED, FrameType.BUNDLE): PeerState.INITIATED,
    (PeerState.INITIATED, FrameType.INIT): PeerState.ESTABLISHED,
    (PeerState.INITIATED, FrameType.MESSAGE): PeerState.ESTABLISHED,
    (PeerState.ESTABLISHED, FrameType.BUNDLE): PeerState.INITIATED,
    (PeerState.ESTABLISHED, FrameType.INIT): PeerState.ESTABLISHED,
    (PeerState.ESTABLISHED, FrameType.MESSAGE): PeerState.ESTABLISHED,
}

#: What each pair the table leaves out is refused with, precisely.
REFUSED = {
    (PeerState.IDLE, FrameType.MESSAGE): (SessionClosed, "session_closed"),
    (PeerState.CLOSED, FrameType.BUNDLE): (CertificateRevoked, "certificate_revoked"),
    (PeerState.CLOSED, FrameType.INIT): (CertificateRevoked, "certificate_revoked"),
    (PeerState.CLOSED, FrameType.MESSAGE): (SessionClosed, "session_closed"),
}


def local(owner: Node, prekeys: Prekeys, revoked: frozenset[int] = frozenset()) -> Local:
    def bundle(spk_id: int) -> PrekeyBundle:
        if spk_id != prekeys.bundle.spk_id:
            raise UnknownPrekey(f"signed prekey {spk_id} is not ours")
        return prekeys.bundle

    return Local(
        identity=owner.identity,
        certificate=owner.cert,
        fingerprint=owner.fingerprint,
        root=CA.root,
        revocation=CA.revocation(),
        revoked=revoked,
        prekeys=prekeys.secrets,
        bundle=bundle,
    )


class Pair:
    """Alice and Bob, each with a real engine for the other; `bob` is the engine under test."""

    def __init__(self) -> None:
        self.alice_prekeys = make_prekeys(ALICE, onetime=20)
        self.bob_prekeys = make_prekeys(BOB, onetime=20)
        self.alice, self.bob = Peer("bob"), Peer("alice")
        self.records: dict[tuple[str, str], bytes] = {}
        self.now = NOW
        self.ids = 0

    def tick(self) -> datetime:
        self.now += MS
        return self.now

    @property
    def alice_local(self) -> Local:
        return local(ALICE, self.alice_prekeys)

    @property
    def bob_local(self) -> Local:
        revoked = frozenset({ALICE.serial}) if self.bob.state is PeerState.CLOSED else frozenset()
        return local(BOB, self.bob_prekeys, revoked)

    def keep(self, outcome: Outcome) -> Outcome:
        """What a node does with an outcome: commit its records."""
        self.records.update(outcome.puts)
        for key in outcome.deletes:
            self.records.pop(key, None)
        return outcome

    def alice_init(self) -> bytes:
        started = self.alice.start(self.bob_prekeys.fetch(), self.tick(), self.alice_local, first=b"a0")
        assert started.frame is not None
        return started.frame

    def alice_message(self) -> bytes:
        frame = self.alice.encrypt(b"a", reserve=64).frame
        assert frame is not None
        return frame

    def bob_start(self) -> Outcome:
        return self.keep(self.bob.start(self.alice_prekeys.fetch(), self.tick(), self.bob_local, first=b"b0"))

    def bob_receive(self, frame: bytes) -> Outcome:
        self.ids += 1
        return self.keep(self.bob.receive(frame, self.tick(), self.bob_local, msg_id=self.ids.to_bytes(16, "big")))

    def deliver_bob_init_to_alice(self, outcome: Outcome) -> None:
        assert outcome.frame is not None
        taken = self.alice.receive(outcome.frame, self.tick(), self.alice_local)
        assert not taken.refused, taken.events

    def restored(self) -> Peer:
        """Bob's engine read back from the records committed so far."""
        return Peer.restore(
            "alice",
            session=self.records.get((NS_SESSION, "alice")),
            archive=self.records.get((NS_ARCHIVE, "alice")),
            record=self.records.get((NS_PEER, "alice")),
            seen=[bytes.fromhex(n.split(":")[1]) for ns, n in self.records if ns == NS_SEEN],
        )


def in_state(state: PeerState) -> Pair:
    """A pair whose Bob stands in `state` with Alice, reached through real frames."""
    pair = Pair()
    if state is PeerState.IDLE:
        # Alice holds a session Bob never had (his keystore lost it): her messages reach an IDLE Bob.
        lost = Pair()
        lost.alice = pair.alice
        lost.bob_prekeys = pair.bob_prekeys
        lost.bob_receive(lost.alice_init())
    elif state is PeerState.INITIATED:
        pair.deliver_bob_init_to_alice(pair.bob_start())
    else:
        pair.bob_receive(pair.alice_init())
        if state is PeerState.CLOSED:
            pair.keep(pair.bob.close(f"certificate {ALICE.serial:x} revoked (key-compromise)"))
    assert pair.bob.state is state and pair.restored().state is state
    return pair


FRAMES: dict[FrameType, Callable[[Pair], Outcome]] = {
    # A BUNDLE arrives when the node fetched one to start a handshake.
    FrameType.BUNDLE: lambda pair: pair.bob_start(),
    # A fresh INIT from the peer (fresher than every session either side holds).
    FrameType.INIT: lambda pair: pair.bob_receive(pair.alice_init()),
    # A MESSAGE on the peer's current session.
    FrameType.MESSAGE: lambda pair: pair.bob_receive(pair.alice_message()),
}


@pytest.mark.parametrize("state", list(PeerState), ids=lambda s: s.name)
@pytest.mark.parametrize("frame", list(FrameType), ids=lambda f: f.name)
def test_every_state_and_frame_through_a_real_engine(state: PeerState, frame: FrameType) -> None:
    pair = in_state(state)
    before = dict(pair.records)
    if frame is FrameType.BUNDLE and (state, frame) in REFUSED:
        error, _ = REFUSED[(state, frame)]
        with pytest.raises(error):
            pair.bob_start()  # a handshake is refused before anything is made
        assert pair.records == before and pair.bob.state is state
        return
    outcome = FRAMES[frame](pair)
    expected = DOCUMENTED.get((state, frame))
    if expected is None:
        error, code = REFUSED[(state, frame)]
        assert outcome.refused and not outcome.puts and outcome.received is None
        assert [event.error for event in outcome.events] == [code]
        assert pair.bob.state is state and pair.records == before
        return
    assert not outcome.refused and outcome.puts
    assert pair.bob.state is expected and pair.restored().state is expected
    if frame is FrameType.BUNDLE:
        assert outcome.frame is not None and wire.frame_type(outcome.frame) is FrameType.INIT and outcome.sync
    else:
        assert outcome.received is not None and outcome.received.kind is Kind.DATA
        # An accepted INIT consumed a prekey: fsynced, with the prekey account.
        assert outcome.sync is outcome.prekeys is (frame is FrameType.INIT)


def test_the_grid_is_exhaustive_and_the_table_is_the_documented_one() -> None:
    assert TRANSITIONS == DOCUMENTED
    pairs = {(state, frame) for state in PeerState for frame in FrameType}
    assert len(pairs) == 12 and pairs == set(DOCUMENTED) | set(REFUSED)
    assert not set(DOCUMENTED) & set(REFUSED)
    assert PeerState.CLOSED not in TRANSITIONS.values()  # nothing leads there by a frame: only `close`


@pytest.mark.parametrize("state", list(PeerState), ids=lambda s: s.name)
def test_a_delivered_bundle_is_refused_in_every_state(state: PeerState) -> None:
    """A BUNDLE is fetched from the relay, never delivered by a peer."""
    pair = in_state(state)
    outcome = pair.bob_receive(wire.encode(pair.alice_prekeys.fetch()))
    assert outcome.refused and [e.error for e in outcome.events] == ["unexpected_frame"]
    assert pair.bob.state is state


def test_a_crossing_init_that_ours_outranks_leaves_initiated_and_is_delivered() -> None:
    pair = Pair()
    older = pair.alice_init()  # Alice's INIT, made before Bob's
    started = pair.bob_start()
    outcome = pair.bob_receive(older)
    assert not outcome.refused and outcome.received is not None and outcome.received.data == b"a0"
    assert pair.bob.state is PeerState.INITIATED  # archived: Bob's own session stays current
    assert pair.bob.conversation.archive and pair.bob.current is not None
    assert pair.bob.current.transcript != pair.bob.conversation.archive[0].transcript
    assert started.frame is not None


def test_an_older_init_once_established_is_refused_as_stale_before_it_consumes_anything() -> None:
    pair = Pair()
    older = pair.alice_init()
    pair.alice = Peer("bob")
    pair.bob_receive(pair.alice_init())
    left = len(pair.bob_prekeys.secrets._onetime)
    outcome = pair.bob_receive(older)
    assert outcome.refused and [e.error for e in outcome.events] == [StaleInit.code]
    assert len(pair.bob_prekeys.secrets._onetime) == left and pair.bob.state is PeerState.ESTABLISHED


def test_a_redelivery_is_taken_once() -> None:
    pair = Pair()
    init = pair.alice_init()
    first = pair.bob.receive(init, pair.tick(), pair.bob_local, msg_id=b"\x01" * 16)
    again = pair.bob.receive(init, pair.tick(), pair.bob_local, msg_id=b"\x01" * 16)
    assert first.received is not None and (NS_SEEN, f"alice:{'01' * 16}") in first.puts
    assert again == Outcome()  # acknowledged, nothing to commit, nothing to tell


@pytest.mark.parametrize("state", [PeerState.ESTABLISHED, PeerState.CLOSED], ids=lambda s: s.name)
def test_a_new_identity_key_is_told_and_after_closed_starts_from_idle(state: PeerState) -> None:
    pair = in_state(state)
    rekeyed = CA.enrol("alice", 0x2001)
    pair.alice, pair.alice_prekeys = Peer("bob"), make_prekeys(rekeyed)
    started = pair.alice.start(pair.bob_prekeys.fetch(), pair.tick(), local(rekeyed, pair.alice_prekeys))
    assert started.frame is not None
    outcome = pair.bob_receive(started.frame)
    assert [e.event for e in outcome.events] == ["identity_changed", "session_established"]
    assert pair.bob.state is PeerState.ESTABLISHED


# --- the engine's other decisions -------------------------------------------------------------------


def test_encrypt_needs_an_open_session() -> None:
    with pytest.raises(SessionClosed, match="no session"):
        Peer("alice").encrypt(b"x", reserve=64)
    pair = in_state(PeerState.CLOSED)
    with pytest.raises(SessionClosed, match="revoked"):
        pair.bob.encrypt(b"x", reserve=64)


def test_encrypt_commits_a_reservation_fsynced_and_then_nothing_until_it_runs_out() -> None:
    pair = in_state(PeerState.ESTABLISHED)
    first = pair.bob.encrypt(b"x", reserve=2)
    assert first.sync and (NS_SESSION, "alice") in first.puts
    second = pair.bob.encrypt(b"y", reserve=2)
    assert not second.sync and not second.puts and second.frame is not None


def test_revocation_by_any_serial_of_the_identity_key_told_once() -> None:
    pair = in_state(PeerState.ESTABLISHED)
    assert pair.bob.revoked_by({ALICE.serial}, ()) == ALICE.serial
    assert pair.bob.revoked_by({ALICE.serial}, {ALICE.serial}) is None  # told on the CRL that listed it
    assert pair.bob.revoked_by({0x999}, ()) is None
    assert Peer("carol").revoked_by({ALICE.serial}, ()) is None
    outcome = pair.bob.close("certificate 1001 revoked (key-compromise)")
    assert outcome.sync and [e.event for e in outcome.events] == ["peer_revoked"]
    assert pair.bob.state is PeerState.CLOSED and not pair.bob.reset_due and not pair.bob.heartbeat_due
    assert Peer("carol").close("revoked").puts == {(NS_ARCHIVE, "carol"): pair.bob.conversation.archive_bytes()}


def test_closed_by_ocsp_refuses_the_same_key_even_when_no_crl_lists_it() -> None:
    pair = in_state(PeerState.CLOSED)
    bundle = pair.alice_prekeys.fetch()
    with pytest.raises(CertificateRevoked, match="ended by a revocation"):
        pair.bob.start(bundle, pair.tick(), local(BOB, pair.bob_prekeys))  # no CRL entry held


def test_an_unreadable_certificate_is_left_to_the_handshake_to_refuse() -> None:
    pair = in_state(PeerState.ESTABLISHED)
    pair.bob._admit(b"not a certificate", pair.bob_local)  # no decision here; verification refuses it
    assert pair.bob.state is PeerState.ESTABLISHED


def test_a_peer_sending_on_a_session_we_lost_makes_a_fresh_handshake_due() -> None:
    pair = in_state(PeerState.IDLE)
    for _ in range(3):
        assert pair.bob_receive(pair.alice_message()).refused
    assert pair.bob.reset_due


def test_a_heartbeat_is_due_after_a_run_of_received_messages() -> None:
    pair = in_state(PeerState.ESTABLISHED)
    for _ in range(60):
        pair.bob_receive(pair.alice_message())
    assert pair.bob.heartbeat_due


def test_old_received_ids_are_forgotten_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("protocol.peer.MAX_SEEN_PER_PEER", 2)
    pair = in_state(PeerState.ESTABLISHED)
    deleted = []
    for _ in range(6):
        deleted += pair.bob_receive(pair.alice_message()).deletes
    assert deleted and len(pair.bob.seen) <= 4
    assert all(ns == NS_SEEN for ns, _ in deleted)


def test_event_names_of_refusals() -> None:
    from protocol.errors import DuplicateMessage, LocalError, code_of
    from protocol.peer import event_name

    assert event_name(DuplicateMessage("again")) == "replay_refused"
    assert code_of(LocalError) == "local_error"  # a class without an explicit code: named after it
