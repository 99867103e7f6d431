"""The application body (protocol/body.py, PROTOCOL.md §7.5): round trips, the old format, strict refusals."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import body
from protocol.body import MAX_BODY, MAX_IDS, Receipt, RetryRequest, TextBody
from protocol.errors import DecodeError, LocalError

ID = st.binary(min_size=16, max_size=16)
A, B = bytes(16), bytes(range(16))


@given(ID, st.integers(0, 2**53), st.text(max_size=200))
def test_text_round_trip(msg_id: bytes, sent_at: int, text: str) -> None:
    sent = TextBody(msg_id, sent_at, text)
    assert body.decode(body.encode(sent)) == sent


@given(st.lists(ID, min_size=1, max_size=MAX_IDS, unique=True))
def test_receipt_and_retry_round_trip(ids: list[bytes]) -> None:
    for cls in (Receipt, RetryRequest):
        sent = cls(tuple(ids))
        got = body.decode(body.encode(sent))
        assert got == sent and type(got) is cls


def test_known_encoding() -> None:
    """The bytes PROTOCOL.md §7.5 describes, for another implementation to check against."""
    assert body.encode(TextBody(A, 1_700_000_000_123, "hi")).hex() == (
        "9401c410" + "00" * 16 + "cf0000018bcfe5687b" + "a26869"
    )
    assert body.encode(Receipt((A, B))).hex() == "9202" + "92" + "c410" + "00" * 16 + "c410" + B.hex()
    assert body.encode(RetryRequest((B,))).hex() == "9203" + "91" + "c410" + B.hex()


def test_old_bodies_still_decode_as_text() -> None:
    """`[id, seconds, text]`, as nodes wrote it before body kinds: float or int seconds."""
    assert body.decode(msgpack.packb([A, 1_700_000_000.1234, "old"])) == TextBody(A, 1_700_000_000_123, "old")
    assert body.decode(msgpack.packb([A, 5, "int"])) == TextBody(A, 5000, "int")


@pytest.mark.parametrize(
    "fields",
    [
        [A, 1.0],  # too few
        [A, 1.0, "x", "extra"],
        [A[:15], 1.0, "x"],  # short id
        ["not bin", 1.0, "x"],
        [A, -1.0, "x"],  # before the epoch
        [A, float("nan"), "x"],
        [A, float("inf"), "x"],
        [A, True, "x"],  # a bool is no number
        [A, "1", "x"],
        [A, 1.0, b"bytes, not text"],
        [A, 2**53, "x"],  # seconds far beyond MAX_SENT_AT
    ],
)
def test_malformed_old_bodies_are_refused(fields: list[object]) -> None:
    with pytest.raises(DecodeError):
        body.decode(msgpack.packb(fields))


@pytest.mark.parametrize(
    "fields",
    [
        [1, A, 1],  # too few
        [1, A, 1, "x", 0],  # too many
        [1, A[:4], 1, "x"],
        [1, A, -1, "x"],
        [1, A, 2**53 + 1, "x"],
        [1, A, 1.5, "x"],  # ms are integers
        [1, A, False, "x"],
        [1, A, 1, 7],  # text not a string
        [2, []],  # no ids
        [2, [A] * 2],  # an id twice
        [2, [A[:15]]],
        [2, [A] + [bytes([i % 256, i // 256]) * 8 for i in range(MAX_IDS)]],  # too many
        [3, "not a list"],
        [3, [A], "extra"],
        [4, [A]],  # unknown kind
        [0, [A]],
        [True, [A]],  # a bool is not a kind
        [1.0, A, 1, "x"],
        [None],
    ],
)
def test_malformed_bodies_are_refused(fields: list[object]) -> None:
    with pytest.raises(DecodeError):
        body.decode(msgpack.packb(fields))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        msgpack.packb([1, A, 1, "x"]) + b"\x00",  # bytes after the array
        msgpack.packb({"kind": 1}),
        msgpack.packb([]),
        msgpack.packb(7),
        b"\x94\x01\xc4\x10" + A + b"\x01\xa2\xff\xfe",  # text that is not UTF-8
        b"\x00" * (MAX_BODY + 1),
    ],
)
def test_what_is_not_a_body_is_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        body.decode(data)


def test_only_bytes_decode() -> None:
    with pytest.raises(DecodeError):
        body.decode(bytearray(b"\x91\x01"))  # type: ignore[arg-type]


def test_bodies_are_checked_when_made() -> None:
    with pytest.raises(LocalError):
        TextBody(A[:3], 0, "x")
    with pytest.raises(LocalError):
        TextBody(A, -1, "x")
    with pytest.raises(LocalError):
        TextBody(A, True, "x")
    with pytest.raises(LocalError):
        TextBody(A, 0, b"x")  # type: ignore[arg-type]
    with pytest.raises(LocalError):
        Receipt(())
    with pytest.raises(LocalError):
        RetryRequest((A, A))


def test_a_text_too_long_for_one_message_is_refused_when_encoded() -> None:
    with pytest.raises(LocalError, match="at most"):
        body.encode(TextBody(A, 0, "x" * MAX_BODY))
    fits = TextBody(A, 0, "x" * (MAX_BODY - 40))
    assert body.decode(body.encode(fits)) == fits


def test_repr_shows_no_text() -> None:
    assert "secret" not in repr(TextBody(A, 0, "secret words"))
