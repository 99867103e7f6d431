"""protocol.peer: two sessions with one peer (crossed or delayed INITs), the rank that orders them the
same way on both sides and across restarts, the archive, stale INITs, and the automatic re-handshake."""

from __future__ import annotations

from datetime import timedelta

import msgpack
import pytest

from protocol import handshake
from protocol.errors import AuthenticationFailed, DecodeError, DuplicateMessage, SessionClosed, StaleInit
from protocol.peer import MAX_ARCHIVED, MAX_AUTH_FAILURES, Conversation, outranks, revoked_serial
from protocol.session import Kind, Received, Session
from tests.support.handshake import initiate, respond
from tests.support.pki import ALICE, BOB, NOW, Prekeys, make_prekeys

MS = timedelta(milliseconds=1)


def init_rank(initiated: handshake.Initiated) -> tuple[int, bytes]:
    init = handshake.decode_init(initiated.frame)
    return init.created, ALICE.fingerprint if init.certificate == ALICE.cert else BOB.fingerprint


def restarted(conversation: Conversation) -> Conversation:
    """The same conversation read back from what a node writes to disk."""
    current = conversation.current
    return Conversation(
        Session.from_bytes(current.to_bytes()) if current is not None else None,
        Conversation.archive_from_bytes(conversation.archive_bytes()),
    )


def crossed(
    alice_prekeys: Prekeys, bob_prekeys: Prekeys, *, bob_later: bool, restart: bool = False
) -> tuple[Conversation, Conversation, handshake.Initiated, handshake.Initiated]:
    """Both start a session at once, each sends two more messages on its own, then each receives the
    other's INIT (after a restart, if asked)."""
    a_init = initiate(bob_prekeys.fetch(), first=b"a0", now=NOW)
    b_init = initiate(alice_prekeys.fetch(), initiator=BOB, expected="alice", first=b"b0", now=NOW + MS * bob_later)
    alice, bob = Conversation(), Conversation()
    assert alice.adopt(a_init.session) and bob.adopt(b_init.session)
    if restart:
        alice, bob = restarted(alice), restarted(bob)
    for who, conversation, init, prekeys in ((alice, alice, b_init, alice_prekeys), (bob, bob, a_init, bob_prekeys)):
        created, initiator = init_rank(init)
        who.check_init(created, initiator, confirmed=False)  # a crossing INIT is never stale
        responded = respond(init.frame, prekeys)
        conversation.adopt(responded.session)
    return alice, bob, a_init, b_init


@pytest.mark.parametrize("restart", [False, True], ids=["live", "restart between the INITs"])
@pytest.mark.parametrize("bob_later", [False, True], ids=["same instant", "bob's INIT later"])
def test_crossed_inits_settle_on_one_session_and_lose_nothing(
    alice_prekeys: Prekeys, bob_prekeys: Prekeys, bob_later: bool, restart: bool
) -> None:
    alice, bob, a_init, b_init = crossed(alice_prekeys, bob_prekeys, bob_later=bob_later, restart=restart)
    # Both sides chose the same current session: the fresher INIT, or for equal ones the lower fingerprint.
    assert alice.current is not None and bob.current is not None
    assert alice.current.transcript == bob.current.transcript
    winner = b_init if bob_later or BOB.fingerprint < ALICE.fingerprint else a_init
    assert alice.current.transcript == winner.session.transcript
    # What each sent on the losing session before it learned of the winner still arrives, once.
    loser_sender, loser_receiver = (alice, bob) if winner is b_init else (bob, alice)
    early = [loser_sender.archive[0].encrypt_message(b"early %d" % i) for i in range(2)]
    for message in early:
        assert loser_receiver.decrypt(message)[0] == Received(Kind.DATA, b"early %d" % early.index(message))
    with pytest.raises(DuplicateMessage):
        loser_receiver.decrypt(early[0])
    # From then on both talk on the winner, both ways.
    received, session = bob.decrypt(alice.current.encrypt_message(b"later"))
    assert received.data == b"later" and session is bob.current
    assert alice.decrypt(bob.current.encrypt_message(b"reply"))[0].data == b"reply"
    assert alice.failures == bob.failures == 0


def test_a_delayed_init_cannot_replace_a_newer_confirmed_session(bob_prekeys: Prekeys) -> None:
    held = initiate(bob_prekeys.fetch(), first=b"old", now=NOW)  # the relay holds this one back
    newer = initiate(bob_prekeys.fetch(), first=b"new", now=NOW + MS)
    bob = Conversation()
    bob.adopt(respond(newer.frame, bob_prekeys).session)
    with pytest.raises(StaleInit):
        bob.check_init(*init_rank(held), confirmed=True)
    # Not yet confirmed (a crossing), it is let through, and joins the archive without replacing anything.
    bob.check_init(*init_rank(held), confirmed=False)
    assert not bob.adopt(respond(held.frame, bob_prekeys).session)
    assert bob.current is not None and bob.current.transcript == newer.session.transcript
    # A fresher INIT (the peer lost its state) does replace the session; the old one is archived.
    fresh = initiate(bob_prekeys.fetch(), first=b"fresh", now=NOW + 2 * MS)
    bob.check_init(*init_rank(fresh), confirmed=True)
    assert bob.adopt(respond(fresh.frame, bob_prekeys).session)
    assert [s.transcript for s in bob.archive] == [newer.session.transcript, held.session.transcript]
    # A message of a session nobody here holds is refused by the current one and by each archived one.
    stranger = initiate(bob_prekeys.fetch(), now=NOW)
    with pytest.raises(AuthenticationFailed):
        bob.decrypt(stranger.session.encrypt_message(b"?"))
    assert bob.failures == 1


def test_a_future_dated_init_is_refused(bob_prekeys: Prekeys) -> None:
    from protocol.certs import CLOCK_SKEW
    from protocol.errors import HandshakeError

    ahead = initiate(bob_prekeys.fetch(), now=NOW + CLOCK_SKEW + timedelta(seconds=1))
    with pytest.raises(HandshakeError, match="future"):
        respond(ahead.frame, bob_prekeys, now=NOW - timedelta(seconds=1))


def test_the_archive_is_bounded_and_keeps_the_highest_ranked() -> None:
    bob_prekeys = make_prekeys(BOB, onetime=MAX_ARCHIVED + 3)
    inits = [initiate(bob_prekeys.fetch(), now=NOW + i * MS) for i in range(MAX_ARCHIVED + 2)]
    bob = Conversation()
    for init in inits:
        bob.adopt(respond(init.frame, bob_prekeys).session)
    assert bob.current is not None and bob.current.transcript == inits[-1].session.transcript
    assert [s.created for s in bob.archive] == [s.session.created for s in inits[-2:0:-1]]
    assert len(restarted(bob).archive) == MAX_ARCHIVED


def test_messages_no_session_authenticates_start_a_new_handshake(alice_prekeys: Prekeys, bob_prekeys: Prekeys) -> None:
    ours = initiate(bob_prekeys.fetch())
    bob = Conversation()
    bob.adopt(respond(ours.frame, bob_prekeys).session)
    stranger = initiate(bob_prekeys.fetch())  # a session bob never saw (alice restored an old copy, say)
    for i in range(MAX_AUTH_FAILURES):
        assert not bob.reset_due
        with pytest.raises(AuthenticationFailed):
            bob.decrypt(stranger.session.encrypt_message(b"lost %d" % i))
    assert bob.reset_due
    # A message that authenticates (or a new session) clears it; a replay does not count.
    message = ours.session.encrypt_message(b"ok")
    assert bob.decrypt(message)[0].data == b"ok" and not bob.reset_due
    with pytest.raises(DuplicateMessage):
        bob.decrypt(message)
    assert bob.failures == 0
    # With no session at all, every message counts; a closed (revoked) conversation never resets.
    empty = Conversation()
    empty.close("peer revoked")  # nothing to close
    for _ in range(MAX_AUTH_FAILURES):
        with pytest.raises(SessionClosed):
            empty.decrypt(message)
    assert empty.reset_due
    bob.close("peer revoked")
    bob.failures = MAX_AUTH_FAILURES
    assert not bob.reset_due and not bob.archive
    with pytest.raises(SessionClosed, match="revoked"):
        bob.decrypt(message)
    with pytest.raises(SessionClosed):
        bob.current.encrypt_message(b"x")  # type: ignore[union-attr]
    # A closed session is replaced by any new one (the peer's new certificate, say) without archiving.
    bob.check_init(NOW.microsecond, ALICE.fingerprint, confirmed=True)
    assert bob.adopt(initiate(bob_prekeys.fetch()).session) and not bob.archive


def test_outranks_is_a_strict_order() -> None:
    sessions = []
    for created, who in ((1, ALICE), (1, BOB), (2, ALICE)):
        s = Session.__new__(Session)
        s.created, s.initiator = created, who.fingerprint
        sessions.append(s)
    low, high = sorted(sessions[:2], key=lambda s: s.initiator, reverse=True)
    assert outranks(high, low) and not outranks(low, high) and not outranks(low, low)
    assert outranks(sessions[2], high)


@pytest.mark.parametrize(
    "data", [msgpack.packb(5), msgpack.packb([b"x"] * (MAX_ARCHIVED + 1)), b"\xc1", msgpack.packb([b"x"])]
)
def test_a_malformed_archive_is_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        Conversation.archive_from_bytes(data)


def test_sessions_end_with_the_peer_certificate_they_were_made_under(bob_prekeys: Prekeys) -> None:
    from protocol.certs import CLOCK_SKEW

    bob = Conversation()
    assert not bob.expire(NOW, NOW - timedelta(days=1))  # nothing to end
    made = initiate(bob_prekeys.fetch())
    bob.adopt(respond(made.frame, bob_prekeys).session)
    not_after = NOW + timedelta(days=1)
    assert not bob.expire(not_after + CLOCK_SKEW, not_after)  # within the skew it still holds
    assert bob.expire(not_after + CLOCK_SKEW + MS, not_after)
    assert bob.reset_due and not bob.expire(not_after + timedelta(days=9), not_after)  # once
    with pytest.raises(SessionClosed, match="expired"):
        bob.decrypt(made.session.encrypt_message(b"after notAfter"))
    # The new handshake (checking the renewed certificate) gives a session again.
    assert bob.adopt(respond(initiate(bob_prekeys.fetch()).frame, bob_prekeys).session)
    assert not bob.reset_due


def test_a_revoked_serial_of_any_certificate_of_the_key_is_found() -> None:
    assert revoked_serial([7, 5, 3], {3, 9}) == 3
    assert revoked_serial([7, 5], {3, 9}) is None
    assert revoked_serial([], {3}) is None


def test_an_inits_created_is_whole_milliseconds_both_ways() -> None:
    instant = NOW + timedelta(microseconds=123_456)
    assert handshake.millis(instant) == handshake.millis(NOW) + 123
    assert handshake.from_millis(handshake.millis(instant)) == NOW + timedelta(milliseconds=123)
