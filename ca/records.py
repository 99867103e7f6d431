"""The JSON records the CA keeps in ca.db, written and read by one helper.

A record is a frozen dataclass that inherits `JsonRecord`; its fields say what it stores and the
helper derives the JSON from their types, so no record has a hand-written codec:

==========================  ==========================================================
field type                  JSON
==========================  ==========================================================
`str`, `int`                itself
a `Literal` of strings      itself, and reading refuses a value outside the literal
`datetime`                  ISO 8601 text (`datetime.isoformat`)
`timedelta`                 whole seconds
`bytes`                     hex (digests, secrets); ASCII text with `metadata=TEXT` (PEM)
`tuple[datetime, ...]`      a list of ISO 8601 texts
`X | None`                  null, or X's form
==========================  ==========================================================

The encoding is compact JSON with sorted keys (`{"a":1,"b":2}`): what the CA's records have
always been, so ca.db files written before this helper read back the same and re-encode to the
same bytes. Reading ignores keys it does not know, and a key it lacks takes the field's default
(a record written before that field existed); a field without a default is required. Whatever
does not parse, or fails the dataclass's own checks (`__post_init__` raising `InvalidRequest`),
raises `KeystoreCorrupt` naming the record kind (the class's `RECORD`), never the content.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, ClassVar, Self

from ca.errors import InvalidRequest
from node.errors import KeystoreCorrupt

__all__ = ["TEXT", "JsonRecord", "dump"]

#: Field metadata for a `bytes` field stored as ASCII text (a PEM) instead of hex.
TEXT: Mapping[str, str] = types.MappingProxyType({"json": "text"})

_Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]


def dump(record: Mapping[str, object]) -> bytes:
    """Compact JSON with sorted keys: the form of every CA record."""
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


class JsonRecord:
    """Base of a frozen dataclass stored as one JSON record in ca.db (see the module docstring)."""

    #: What the record is, in words, for the error when one does not parse ("an enrolment-token record").
    RECORD: ClassVar[str]

    def to_record(self) -> bytes:
        """The record's bytes, as ca.db stores them."""
        codecs = _codecs(type(self))
        return dump({name: encode(getattr(self, name)) for name, (encode, _) in codecs.items()})

    @classmethod
    def from_record(cls, data: bytes) -> Self:
        """Parse what `to_record` wrote (or an older version of it); `KeystoreCorrupt` if it does not parse."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict):
                raise TypeError("a record is a JSON object")
            return cls(**{name: decode(raw[name]) for name, (_, decode) in _codecs(cls).items() if name in raw})
        except (ValueError, KeyError, TypeError, InvalidRequest) as exc:
            raise KeystoreCorrupt(f"{cls.RECORD} does not parse") from exc


_CODECS: dict[type, dict[str, _Codec]] = {}


def _codecs(cls: type) -> dict[str, _Codec]:
    """(encode, decode) of every field of dataclass `cls`, from its type hints (computed once per class)."""
    found = _CODECS.get(cls)
    if found is None:
        hints = typing.get_type_hints(cls)
        found = {f.name: _codec(hints[f.name], f.metadata.get("json")) for f in dataclasses.fields(cls)}
        _CODECS[cls] = found
    return found


def _codec(hint: Any, form: str | None) -> _Codec:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        encode, decode = _codec(inner, form)
        return (lambda v: None if v is None else encode(v)), (lambda v: None if v is None else decode(v))
    if origin is typing.Literal:
        return _same, functools.partial(_member, args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        encode, decode = _codec(args[0], form)
        return (lambda v: [encode(x) for x in v]), (lambda v: tuple(decode(x) for x in _typed(list, v)))
    if hint is datetime:
        return (lambda v: v.isoformat()), (lambda v: datetime.fromisoformat(_typed(str, v)))
    if hint is timedelta:
        return (lambda v: int(v.total_seconds())), (lambda v: timedelta(seconds=_typed(int, v)))
    if hint is bytes:
        if form == "text":
            return (lambda v: v.decode("ascii")), (lambda v: _typed(str, v).encode("ascii"))
        return (lambda v: v.hex()), (lambda v: bytes.fromhex(_typed(str, v)))
    if hint in (str, int):
        return _same, functools.partial(_typed, hint)
    raise TypeError(f"no JSON form for a record field of type {hint!r}")


def _same(value: Any) -> Any:
    return value


def _typed(kind: type, value: Any) -> Any:
    # bool is an int to Python, never to a record.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}")
    return value


def _member(allowed: tuple[str, ...], value: Any) -> str:
    if value not in allowed:
        raise ValueError("a value outside its set")
    return typing.cast(str, value)
