"""The reference node's application body: what a DATA plaintext carries (PROTOCOL.md §7.5).

A session delivers opaque DATA bytes (§7.1); the reference node puts one of three bodies in them,
msgpack arrays whose first element names the kind:

    TEXT     [1, id, sent_at, text]   a message for the user
    RECEIPT  [2, [id, ...]]           "these messages reached my application" (batched)
    RETRY    [3, [id, ...]]           "I refused these envelopes: send their messages again"

`id` is 16 bytes, `sent_at` milliseconds since the epoch by the sender's clock, `text` UTF-8.
A body written before kinds existed, `[id, seconds (int or float), text]`, still decodes as TEXT.
Decoding is strict: exact field counts and types (no bool for an int, no map, no extra element),
every bound checked; anything else is a `DecodeError`. Nothing here reads a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from protocol.errors import DecodeError, LocalError
from protocol.messages import MAX_PLAINTEXT

#: Length of a message id (the same 16 bytes the relay link names an envelope by, §16.1).
ID_LEN = 16
#: Most ids one RECEIPT or RETRY names (a sender batches beyond this into several bodies).
MAX_IDS = 256
#: Largest encoded body: a DATA plaintext is one kind byte plus at most this many bytes (§7.1).
MAX_BODY = MAX_PLAINTEXT - 1
#: `sent_at` fits a double exactly (2^53 ms is some 285,000 years).
MAX_SENT_AT = 2**53


class BodyKind(IntEnum):
    """The first element of a body."""

    TEXT = 1
    RECEIPT = 2
    RETRY = 3


@dataclass(frozen=True, slots=True)
class TextBody:
    """A message for the user. `sent_at` is milliseconds since the epoch, by the sender's clock."""

    msg_id: bytes
    sent_at: int
    text: str

    def __post_init__(self) -> None:
        _check_id(self.msg_id, LocalError)
        if type(self.sent_at) is not int or not 0 <= self.sent_at <= MAX_SENT_AT:
            raise LocalError("sent_at is an integer number of milliseconds, 0..2^53")
        if type(self.text) is not str:
            raise LocalError("text is a str")

    def __repr__(self) -> str:  # never the text itself (it may end up in a log)
        return f"TextBody(id={self.msg_id.hex()[:8]}, {len(self.text)} chars)"


@dataclass(frozen=True, slots=True)
class IdsBody:
    """A list of 1..MAX_IDS distinct message ids (the shape of RECEIPT and RETRY)."""

    ids: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_ids(self.ids, LocalError)


@dataclass(frozen=True, slots=True)
class Receipt(IdsBody):
    """The receiver's application holds these messages (committed to its keystore). Never receipted."""


@dataclass(frozen=True, slots=True)
class RetryRequest(IdsBody):
    """The receiver refused the envelopes with these ids: the sender should send their messages again."""


Body = TextBody | Receipt | RetryRequest


def encode(body: Body) -> bytes:
    """The bytes of `body`; `LocalError` if they exceed MAX_BODY (a text too long for one message)."""
    fields: list[Any]
    if isinstance(body, TextBody):
        fields = [BodyKind.TEXT.value, body.msg_id, body.sent_at, body.text]
    elif isinstance(body, Receipt):
        fields = [BodyKind.RECEIPT.value, list(body.ids)]
    else:
        fields = [BodyKind.RETRY.value, list(body.ids)]
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    if len(data) > MAX_BODY:
        raise LocalError(f"a message body is at most {MAX_BODY} bytes; this one is {len(data)}")
    return data


def decode(data: bytes) -> Body:
    """The body in DATA bytes (strict; an old `[id, seconds, text]` body decodes as TEXT)."""
    if type(data) is not bytes or len(data) > MAX_BODY:
        raise DecodeError(f"a message body is bytes, at most {MAX_BODY}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack's many errors (ExtraData, invalid UTF-8, ...) are one case here
        raise DecodeError("a message body is one msgpack array") from exc
    if type(obj) is not list or not obj:
        raise DecodeError("a message body is a non-empty array")
    head = obj[0]
    if type(head) is bytes:
        return _legacy_text(obj)
    if type(head) is not int or head not in BodyKind._value2member_map_:
        raise DecodeError("unknown message body kind")
    kind = BodyKind(head)
    if kind is BodyKind.TEXT:
        _arity(obj, 4)
        _, msg_id, sent_at, text = obj
        _check_id(msg_id, DecodeError)
        if type(sent_at) is not int or not 0 <= sent_at <= MAX_SENT_AT:
            raise DecodeError("sent_at is an integer number of milliseconds, 0..2^53")
        if type(text) is not str:
            raise DecodeError("text is a UTF-8 string")
        return TextBody(msg_id, sent_at, text)
    _arity(obj, 2)
    ids = obj[1]
    if type(ids) is not list:
        raise DecodeError("a receipt or retry request carries an array of ids")
    checked = _check_ids(tuple(ids), DecodeError)
    return Receipt(checked) if kind is BodyKind.RECEIPT else RetryRequest(checked)


def _legacy_text(obj: list[Any]) -> TextBody:
    """`[id, seconds since the epoch (int or float), text]`: what nodes sent before body kinds."""
    _arity(obj, 3)
    msg_id, seconds, text = obj
    _check_id(msg_id, DecodeError)
    if type(seconds) not in (int, float) or not math.isfinite(seconds) or not 0 <= seconds <= MAX_SENT_AT / 1000:
        raise DecodeError("sent_at is a number of seconds since the epoch")
    if type(text) is not str:
        raise DecodeError("text is a UTF-8 string")
    return TextBody(msg_id, round(seconds * 1000), text)


def _arity(obj: list[Any], count: int) -> None:
    if len(obj) != count:
        raise DecodeError(f"this message body kind has {count} fields, not {len(obj)}")


def _check_id(value: object, error: type[Exception]) -> None:
    if type(value) is not bytes or len(value) != ID_LEN:
        raise error(f"a message id is {ID_LEN} bytes")


def _check_ids(ids: tuple[Any, ...], error: type[Exception]) -> tuple[bytes, ...]:
    if not 1 <= len(ids) <= MAX_IDS:
        raise error(f"a receipt or retry request names 1..{MAX_IDS} ids, not {len(ids)}")
    for value in ids:
        _check_id(value, error)
    if len(set(ids)) != len(ids):
        raise error("a receipt or retry request names each id once")
    return ids


__all__ = [
    "ID_LEN",
    "MAX_BODY",
    "MAX_IDS",
    "Body",
    "BodyKind",
    "Receipt",
    "RetryRequest",
    "TextBody",
    "decode",
    "encode",
]
