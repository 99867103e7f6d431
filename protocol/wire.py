"""The msgpack codec for every frame (PROTOCOL.md §3).

A frame is a msgpack array `[version, type, field...]` whose fields follow the type's
schema exactly: count, types and lengths. `decode` raises only `DecodeError`, for any input
bytes whatsoever, and checks the frame's size before msgpack allocates anything.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack

from protocol.errors import DecodeError, UnknownFrameType
from protocol.link import (
    LINK_CLASSES,
    MAX_BATCH,
    MAX_LINK_FRAME,
    Batch,
    Items,
    LinkField,
    LinkFrame,
    Many,
    Str,
)
from protocol.messages import (
    FRAME_CLASSES,
    MAX_CIPHERTEXT,
    MAX_FRAME,
    VERSION,
    Frame,
    FrameType,
    Opt,
    RatchetMessage,
    UInt,
)

_MESSAGE = FrameType.MESSAGE.value

# One packer, reused: msgpack.packb builds a new Packer per call, which costs as much as the
# packing itself on the message hot path. Packer.pack holds the GIL, so sharing it is safe.
_pack = msgpack.Packer().pack


def _check(value: object, field: LinkField) -> None:
    if isinstance(field, Opt):
        if value is not None:
            _check(value, field.inner)
        return
    if isinstance(field, UInt):
        # bool is an int in Python; msgpack decodes true/false to bool, which is not a number here.
        if type(value) is not int or not 0 <= value <= field.max:
            raise DecodeError(f"expected an integer in 0..{field.max}")
        return
    if isinstance(field, Str):
        if type(value) is not str or not field.min <= len(value) <= field.max:
            raise DecodeError(f"expected a string of {field.min}..{field.max} characters")
        return
    if isinstance(field, Many):
        if type(value) is not list or not field.min <= len(value) <= field.max:
            raise DecodeError(f"expected an array of {field.min}..{field.max} values")
        for item in value:
            _check(item, field.field)
        return
    if isinstance(field, Items):
        if type(value) is not list or len(value) > field.max:
            raise DecodeError(f"expected an array of at most {field.max} items")
        for item in value:
            if type(item) is not list or len(item) != len(field.fields):
                raise DecodeError(f"expected items of {len(field.fields)} fields")
            for part, spec in zip(item, field.fields, strict=True):
                _check(part, spec)
        return
    if type(value) is not bytes:
        raise DecodeError("expected bytes")
    if field.size is not None:
        if len(value) != field.size:
            raise DecodeError(f"expected exactly {field.size} bytes, got {len(value)}")
    elif not field.min <= len(value) <= field.max:
        raise DecodeError(f"expected {field.min}..{field.max} bytes, got {len(value)}")


def _unpack(data: bytes, limit: int = MAX_FRAME) -> list[Any]:
    if type(data) is not bytes:
        raise DecodeError("a frame is bytes")
    if len(data) > limit:
        raise DecodeError(f"frame of {len(data)} bytes exceeds {limit}")
    try:
        # msgpack bounds every length by the input's size, and the size is bounded above.
        obj = msgpack.unpackb(data)
    except msgpack.ExtraData as exc:
        raise DecodeError("not a msgpack frame: bytes after its end") from exc
    except Exception as exc:
        raise DecodeError("not a msgpack frame") from exc
    if type(obj) is not list or len(obj) < 2:
        raise DecodeError("a frame is an array [version, type, ...]")
    if obj[0] != VERSION or type(obj[0]) is not int:
        raise DecodeError(f"unsupported protocol version {obj[0]!r}")
    return obj


def _getter(cls: Any) -> Callable[[Any], tuple[Any, ...]]:
    names = [f.name for f in dataclasses.fields(cls)]
    getter = operator.attrgetter(*names)
    return (lambda obj: (getter(obj),)) if len(names) == 1 else getter


# Field getters in wire order, built once: dataclasses.fields() is slow on every call.
_FIELDS: dict[type, Callable[[Any], tuple[Any, ...]]] = {
    cls: _getter(cls) for cls in (*FRAME_CLASSES.values(), *LINK_CLASSES.values())
}


def encode(frame: Frame) -> bytes:
    """The frame's bytes: `[VERSION, TYPE, *fields]`."""
    if type(frame) is RatchetMessage:
        return _pack((VERSION, _MESSAGE, frame.dh, frame.pn, frame.n, frame.ciphertext))
    return _pack((VERSION, frame.TYPE.value, *_FIELDS[type(frame)](frame)))


def decode(data: bytes) -> Frame:
    """Parse any end-to-end frame, checking its schema strictly. Raises only DecodeError."""
    frame: Frame = _decode(_unpack(data), FRAME_CLASSES)
    return frame


def encode_link(frame: LinkFrame) -> bytes:
    """A link frame's bytes: `[VERSION, TYPE, *fields]`."""
    return _pack((VERSION, frame.TYPE.value, *_FIELDS[type(frame)](frame)))


def decode_link(data: bytes) -> LinkFrame:
    """Parse any node ↔ relay frame, checking its schema strictly. Raises only DecodeError."""
    frame: LinkFrame = _decode(_unpack(data, MAX_LINK_FRAME), LINK_CLASSES)
    return frame


def decode_link_frames(data: bytes) -> list[LinkFrame]:
    """Parse one link WebSocket message into its frames: the frame itself, or the frames of a BATCH
    in order. Raises only DecodeError (also for a BATCH inside a BATCH)."""
    frame = decode_link(data)
    if type(frame) is not Batch:
        return [frame]
    frames = [decode_link(inner) for inner in frame.frames]
    if any(type(inner) is Batch for inner in frames):
        raise DecodeError("a BATCH inside a BATCH")
    return frames


# A BATCH's own bytes around its frames: the array headers and the version and type (≤ 16), and
# per frame at most 5 bytes of msgpack bin header.
_BATCH_OVERHEAD = 16
_BIN_HEADER = 5


def pack_link_frames(frames: Sequence[bytes]) -> list[bytes]:
    """WebSocket messages carrying `frames` (each from `encode_link`) in order: a lone frame as
    itself, several as BATCHes of at most MAX_BATCH frames and MAX_LINK_FRAME bytes."""
    messages: list[bytes] = []
    group: list[bytes] = []
    size = _BATCH_OVERHEAD
    for frame in frames:
        if group and (len(group) == MAX_BATCH or size + len(frame) + _BIN_HEADER > MAX_LINK_FRAME):
            messages.append(_batch(group))
            group, size = [], _BATCH_OVERHEAD
        group.append(frame)
        size += len(frame) + _BIN_HEADER
    if group:
        messages.append(_batch(group))
    return messages


def _batch(group: list[bytes]) -> bytes:
    return group[0] if len(group) == 1 else encode_link(Batch(group))


def _decode(obj: list[Any], classes: Mapping[int, Any]) -> Any:
    cls = classes.get(obj[1]) if type(obj[1]) is int else None
    if cls is None:
        raise UnknownFrameType(f"unknown frame type {obj[1]!r}")
    fields = obj[2:]
    if len(fields) != len(cls.SCHEMA):
        raise DecodeError(f"a {cls.TYPE.name} frame has {len(cls.SCHEMA)} fields, got {len(fields)}")
    for value, field in zip(fields, cls.SCHEMA, strict=True):
        _check(value, field)
    return cls(*fields)


def decode_message(data: bytes) -> RatchetMessage:
    """Parse a frame that must be a RatchetMessage (the hot path: checks inlined)."""
    obj = _unpack(data)
    if len(obj) != 6 or type(obj[1]) is not int or obj[1] != _MESSAGE:
        raise DecodeError("expected a ratchet message frame")
    _, _, dh, pn, n, ct = obj
    if (
        type(dh) is not bytes
        or len(dh) != 32
        or type(pn) is not int
        or type(n) is not int
        or not 0 <= pn <= 0xFFFFFFFF
        or not 0 <= n <= 0xFFFFFFFF
        or type(ct) is not bytes
        or not 16 <= len(ct) <= MAX_CIPHERTEXT
    ):
        raise DecodeError("malformed ratchet message")
    return RatchetMessage(dh, pn, n, ct)


def frame_type(data: bytes) -> FrameType:
    """Peek at a frame's type (for routing and state checks) without trusting the rest."""
    obj = _unpack(data)
    if type(obj[1]) is not int:
        raise UnknownFrameType(f"frame type {obj[1]!r} is not an integer")
    try:
        return FrameType(obj[1])
    except ValueError as exc:
        raise UnknownFrameType(f"unknown frame type {obj[1]!r}") from exc
