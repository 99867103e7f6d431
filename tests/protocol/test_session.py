"""protocol.session: transcript-bound sessions, content kinds, the heartbeat policy, closing, persistence."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import msgpack
import pytest

from protocol import wire
from protocol.errors import (
    AuthenticationFailed,
    DecodeError,
    DuplicateMessage,
    LocalError,
    SessionClosed,
)
from protocol.handshake import Initiated, PrekeySecrets, Responded
from protocol.identity import X25519KeyPair
from protocol.messages import MAX_PLAINTEXT, Suite
from protocol.ratchet import Ratchet
from protocol.session import DEFAULT_DH_STEP_AFTER, Kind, Received, Session
from tests.support.pki import ALICE, BOB, CA, establish, make_prekeys

Pair = tuple[Initiated, Responded]


@pytest.fixture
def sessions(established: Pair) -> tuple[Session, Session]:
    """(alice's session, bob's session) after a real handshake; bob has received message 0."""
    initiated, responded = established
    return initiated.session, responded.session


def test_handshake_result_metadata(established: Pair) -> None:
    initiated, responded = established
    a, b = initiated.session, responded.session
    assert responded.first == Received(Kind.DATA, b"hello")
    assert a.transcript == b.transcript and len(a.transcript) == 32
    assert (a.peer, b.peer) == ("bob", "alice")
    assert a.peer_fingerprint == BOB.fingerprint and b.peer_fingerprint == ALICE.fingerprint
    assert a.suite == b.suite == Suite.HYBRID
    assert a.closed is None and b.closed is None
    assert a.dh_step_after == DEFAULT_DH_STEP_AFTER
    assert isinstance(a.ratchet, Ratchet)


def test_conversation(sessions: tuple[Session, Session]) -> None:
    a, b = sessions
    for i in range(4):
        assert b.decrypt(a.encrypt(b"a%d" % i)) == Received(Kind.DATA, b"a%d" % i)
        assert a.decrypt(b.encrypt(b"b%d" % i)) == Received(Kind.DATA, b"b%d" % i)
    msg = a.encrypt_message(b"decoded")
    assert b.decrypt_message(msg).data == b"decoded"
    assert wire.decode_message(a.encrypt(b"")).ciphertext  # even empty data carries the kind byte


def test_heartbeat_kind(sessions: tuple[Session, Session]) -> None:
    a, b = sessions
    got = a.decrypt(b.encrypt(b"", kind=Kind.HEARTBEAT))
    assert got.kind is Kind.HEARTBEAT and got.data == b""


def test_plaintext_limits(sessions: tuple[Session, Session]) -> None:
    a, b = sessions
    biggest = b"\x01" * (MAX_PLAINTEXT - 1)  # plus the kind byte = MAX_PLAINTEXT
    assert b.decrypt(a.encrypt(biggest)).data == biggest
    before = a.to_bytes()
    with pytest.raises(LocalError):
        a.encrypt(b"\x01" * MAX_PLAINTEXT)
    assert a.to_bytes() == before


@pytest.mark.parametrize(
    "plaintext",
    [b"", b"\x00", b"\x03rest", b"\xffrest", b"\x02heartbeat with content"],
    ids=["empty", "kind 0", "kind 3", "kind 255", "heartbeat with content"],
)
def test_unknown_content_is_refused_without_state_change(sessions: tuple[Session, Session], plaintext: bytes) -> None:
    """An authentic message whose content we cannot interpret (only a buggy or hostile peer sends one) is
    refused like any bad frame: DecodeError, and the session is byte-identical (the key is not consumed)."""
    a, b = sessions
    msg = a.ratchet.encrypt(plaintext, a.transcript)
    before = b.to_bytes()
    with pytest.raises(DecodeError, match="content"):
        b.decrypt_message(msg)
    assert b.to_bytes() == before
    # The session goes on, and the refused message's number is simply skipped.
    assert b.decrypt(a.encrypt(b"next")).data == b"next"
    assert b.ratchet.skipped_count == 1


def test_transcript_is_associated_data(sessions: tuple[Session, Session]) -> None:
    a, b = sessions
    msg = a.ratchet.encrypt(b"\x01text", b"\x00" * 32)  # right keys, wrong transcript
    before = b.to_bytes()
    with pytest.raises(AuthenticationFailed):
        b.decrypt_message(msg)
    assert b.to_bytes() == before


def test_message_from_another_session(established: Pair) -> None:
    _, responded = established
    other_initiated, _ = establish(CA, ALICE, make_prekeys(BOB, label="other"))
    before = responded.session.to_bytes()
    with pytest.raises(AuthenticationFailed):
        responded.session.decrypt(other_initiated.session.encrypt(b"x"))
    assert responded.session.to_bytes() == before


def test_refused_frames_leave_the_session_unchanged(sessions: tuple[Session, Session]) -> None:
    a, b = sessions
    frame = a.encrypt(b"payload")
    msg = wire.decode_message(frame)
    bad_frames = [
        frame[:-1],
        frame + b"\x00",
        b"garbage",
        wire.encode(dataclasses.replace(msg, ciphertext=msg.ciphertext[:-1] + bytes([msg.ciphertext[-1] ^ 1]))),
        wire.encode(dataclasses.replace(msg, pn=msg.pn + 1)),
    ]
    for bad in bad_frames:
        before = b.to_bytes()
        with pytest.raises((DecodeError, AuthenticationFailed)):
            b.decrypt(bad)
        assert b.to_bytes() == before
    assert b.decrypt(frame).data == b"payload"
    before = b.to_bytes()
    with pytest.raises(DuplicateMessage):
        b.decrypt(frame)
    assert b.to_bytes() == before


# --- heartbeat policy --------------------------------------------------------------------------------


def test_heartbeat_due_after_default_count(sessions: tuple[Session, Session]) -> None:
    a, b = sessions
    # Bob has received message 0 (inside the INIT): DEFAULT - 1 more make DEFAULT in a row.
    for i in range(DEFAULT_DH_STEP_AFTER - 2):
        b.decrypt(a.encrypt(b"%d" % i))
        assert not b.heartbeat_due
    b.decrypt(a.encrypt(b"last"))
    assert b.ratchet.received_in_chain == DEFAULT_DH_STEP_AFTER
    assert b.heartbeat_due
    assert not a.heartbeat_due
    old_dh = wire.decode_message(a.encrypt(b"before")).dh
    b.decrypt(a.encrypt(b"more"))  # still due while bob says nothing
    assert b.heartbeat_due
    heartbeat = b.encrypt(b"", kind=Kind.HEARTBEAT)
    assert not b.heartbeat_due
    assert a.decrypt(heartbeat).kind is Kind.HEARTBEAT
    # Alice's next message is a DH step: a new ratchet key in its header.
    nxt = wire.decode_message(a.encrypt(b"after"))
    assert nxt.dh != old_dh and nxt.n == 0
    assert b.decrypt(wire.encode(nxt)).data == b"after"
    assert not b.heartbeat_due


@pytest.mark.parametrize("step", [1, 3])
def test_heartbeat_due_after_configured_count(step: int) -> None:
    initiated, responded = establish(CA, ALICE, make_prekeys(BOB))
    a, b = initiated.session, responded.session
    b.dh_step_after = step
    b = Session.from_bytes(b.to_bytes())  # the setting is persisted
    assert b.dh_step_after == step
    assert b.heartbeat_due == (step == 1)  # message 0 already received
    for _ in range(step - 1):
        b.decrypt(a.encrypt(b"x"))
    assert b.heartbeat_due
    dh_before = wire.decode_message(a.encrypt(b"y")).dh
    a.decrypt(b.encrypt(b"", kind=Kind.HEARTBEAT))
    assert wire.decode_message(a.encrypt(b"z")).dh != dh_before


def test_heartbeat_never_due_without_a_sending_chain() -> None:
    spk = X25519KeyPair.generate()
    ratchet = Ratchet(root_key=os.urandom(32), dhs=spk, dhr=None, cks=None, ckr=None, nr=99)
    session = Session(ratchet, transcript=b"\x00" * 32, peer="p", peer_fingerprint=b"\x00" * 32, suite=1)
    assert not session.heartbeat_due
    with pytest.raises(LocalError):
        session.encrypt(b"x")


# --- closing -----------------------------------------------------------------------------------------


def test_closed_session_refuses_both_ways(sessions: tuple[Session, Session]) -> None:
    a, b = sessions
    pending = a.encrypt(b"in flight")
    b.close("peer revoked")
    assert b.closed == "peer revoked"
    before = b.to_bytes()
    with pytest.raises(SessionClosed, match="peer revoked"):
        b.decrypt(pending)
    with pytest.raises(SessionClosed):
        b.decrypt_message(wire.decode_message(pending))
    with pytest.raises(SessionClosed):
        b.encrypt(b"x")
    with pytest.raises(SessionClosed):
        b.encrypt_message(b"x", kind=Kind.HEARTBEAT)
    assert b.to_bytes() == before
    # Closed survives persistence.
    restored = Session.from_bytes(b.to_bytes())
    assert restored.closed == "peer revoked"
    with pytest.raises(SessionClosed):
        restored.decrypt(pending)
    assert "closed: peer revoked" in repr(restored)


# --- construction and persistence --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"transcript": b"\x00" * 31},
        {"transcript": b"\x00" * 33},
        {"peer_fingerprint": b""},
        {"dh_step_after": 0},
        {"dh_step_after": -5},
    ],
)
def test_constructor_refusals(sessions: tuple[Session, Session], kwargs: dict[str, object]) -> None:
    a, _ = sessions
    args: dict[str, object] = {
        "transcript": a.transcript,
        "peer": "bob",
        "peer_fingerprint": a.peer_fingerprint,
        "suite": 1,
        **kwargs,
    }
    with pytest.raises(LocalError):
        Session(a.ratchet, **args)  # type: ignore[arg-type]


def test_round_trip_mid_conversation(sessions: tuple[Session, Session]) -> None:
    a, b = sessions
    pending = [a.encrypt(b"p%d" % i) for i in range(3)]
    b.decrypt(pending[2])
    a.decrypt(b.encrypt(b"r"))
    state = b.to_bytes()
    assert b.to_bytes() == state  # byte-identical while unchanged
    restored = Session.from_bytes(state)
    assert restored.to_bytes() == state
    assert (restored.peer, restored.transcript, restored.suite) == (b.peer, b.transcript, b.suite)
    assert restored.decrypt(pending[0]).data == b"p0"
    assert restored.decrypt(a.encrypt(b"new")).data == b"new"
    assert a.decrypt(restored.encrypt(b"back")).data == b"back"


def test_round_trip_uses_the_keygen(sessions: tuple[Session, Session]) -> None:
    a, b = sessions
    fixed = X25519KeyPair.generate()
    restored = Session.from_bytes(b.to_bytes(), keygen=lambda: fixed)
    a.decrypt(restored.encrypt(b"1"))
    restored.decrypt(a.encrypt(b"2"))
    assert restored.ratchet.ratchet_public == fixed.public


def test_initiator_session_round_trips_before_the_first_reply(established: Pair) -> None:
    initiated, responded = established
    state = initiated.session.to_bytes()
    restored = Session.from_bytes(state)
    assert restored.to_bytes() == state
    assert responded.session.decrypt(restored.encrypt(b"after restart")).data == b"after restart"
    assert restored.decrypt(responded.session.encrypt(b"reply")).data == b"reply"


def _field(index: int, value: object) -> Callable[[list[object]], object]:
    def edit(fields: list[object]) -> object:
        fields = list(fields)
        fields[index] = value
        return fields

    return edit


MALFORMED_SESSION: dict[str, Callable[[list[object]], object]] = {
    "format 3": _field(0, 3),
    "format 1 with a rank": _field(0, 1),
    "format not int": _field(0, "2"),
    "created not int": _field(8, "now"),
    "created negative": _field(8, -1),
    "initiator not bytes": _field(9, "alice"),
    "initiator short": _field(9, b"\x00" * 31),
    "ratchet not bytes": _field(1, "state"),
    "ratchet garbage": _field(1, b"\x00\x01"),
    "transcript not bytes": _field(2, None),
    "transcript short": _field(2, b"\x00" * 31),
    "peer not str": _field(3, b"bob"),
    "fingerprint not bytes": _field(4, "fp"),
    "fingerprint short": _field(4, b"\x00"),
    "suite not int": _field(5, "1"),
    "step not int": _field(6, 1.5),
    "step zero": _field(6, 0),
    "closed not str": _field(7, b"revoked"),
    "one field short": lambda f: f[:-1],
    "one field more": lambda f: [*f, None],
    "not an array": lambda f: 5,
    "a map": lambda f: {"peer": "bob"},
}


def test_format_1_sessions_still_restore_and_rank_lowest(sessions: tuple[Session, Session]) -> None:
    """A session saved before sessions carried a rank restores, ranked below any session made since."""
    _, b = sessions
    old = msgpack.packb([1, *msgpack.unpackb(b.to_bytes())[1:8]])
    restored = Session.from_bytes(old)
    assert (restored.created, restored.initiator) == (0, b"")
    assert b.created > 0 and len(b.initiator) == 32


@pytest.mark.parametrize("edit", MALFORMED_SESSION.values(), ids=MALFORMED_SESSION.keys())
def test_from_bytes_refuses_malformed_state(
    sessions: tuple[Session, Session], edit: Callable[[list[object]], object]
) -> None:
    _, b = sessions
    fields = msgpack.unpackb(b.to_bytes())
    with pytest.raises(DecodeError):
        Session.from_bytes(msgpack.packb(edit(fields)))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x98", b"\xa3\xff\xfe\xfd", b"\x00" * 8], ids=repr)
def test_from_bytes_refuses_non_state_bytes(data: bytes) -> None:
    with pytest.raises(DecodeError):
        Session.from_bytes(data)


def test_received_is_a_small_immutable_tuple() -> None:
    got = Received(Kind.DATA, b"abc")
    assert got.kind is Kind.DATA and got.data == b"abc"
    assert tuple(got) == (Kind.DATA, b"abc")
    with pytest.raises(AttributeError):
        got.data = b"x"  # type: ignore[misc]


@pytest.mark.parametrize("fmt", [True, 1.0], ids=["true", "1.0"])
@pytest.mark.parametrize("kind", ["session", "ratchet", "prekeys"])
def test_stored_state_format_must_be_the_integer_1(sessions: tuple[Session, Session], kind: str, fmt: object) -> None:
    _, b = sessions
    cls, data = {
        "session": (Session, b.to_bytes()),
        "ratchet": (Ratchet, b.ratchet.to_bytes()),
        "prekeys": (PrekeySecrets, make_prekeys(BOB).secrets.to_bytes()),
    }[kind]
    fields = msgpack.unpackb(data)
    fields[0] = fmt
    with pytest.raises(DecodeError):
        cls.from_bytes(msgpack.packb(fields))  # type: ignore[attr-defined]


def test_a_heartbeat_with_content_is_refused_at_the_sender(sessions: tuple[Session, Session]) -> None:
    a, _ = sessions
    with pytest.raises(LocalError, match="heartbeat"):
        a.encrypt(b"x", kind=Kind.HEARTBEAT)


def test_a_closed_session_reserves_nothing(sessions: tuple[Session, Session]) -> None:
    a, _ = sessions
    assert a.reserve(4) is True
    a.close("peer revoked")
    with pytest.raises(SessionClosed):
        a.reserve(4)
