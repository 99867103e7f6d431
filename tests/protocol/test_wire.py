"""protocol.wire: the msgpack codec of every frame, and its refusals (PROTOCOL.md §3).

`decode`, `decode_message`, `decode_link` and `frame_type` must raise only DecodeError for any
input whatsoever; every refusal the codec can raise has a test here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import wire
from protocol.errors import DecodeError, UnknownFrameType
from protocol.link import LINK_CLASSES, MAX_BATCH, MAX_CRL, MAX_LINK_FRAME, Ack, Batch, CrlFeed, Items, Many, Str
from protocol.messages import (
    FRAME_CLASSES,
    HASH_LEN,
    MAX_CERTIFICATE,
    MAX_CIPHERTEXT,
    MAX_FRAME,
    MAX_U32,
    MAX_U64,
    MLKEM768_CIPHERTEXT_LEN,
    MLKEM768_PUBLIC_LEN,
    SIGNATURE_LEN,
    VERSION,
    Bin,
    FrameType,
    InitMessage,
    Opt,
    PrekeyBundle,
    RatchetMessage,
    UInt,
)

# --- sample frames --------------------------------------------------------------------------------

MSG = RatchetMessage(b"\x11" * 32, 7, 42, b"\x22" * 40)
BUNDLE = PrekeyBundle(
    certificate=b"\x30" * 300,
    created=1_700_000_000,
    spk_id=1,
    spk=b"\x33" * 32,
    kem_id=2,
    kem=b"\x44" * MLKEM768_PUBLIC_LEN,
    signature=b"\x55" * SIGNATURE_LEN,
    otpk_id=3,
    otpk=b"\x66" * 32,
    otpk_signature=b"\x77" * SIGNATURE_LEN,
)
BUNDLE_CLASSIC = dataclasses.replace(BUNDLE, kem_id=None, kem=None, otpk_id=None, otpk=None, otpk_signature=None)
INIT = InitMessage(
    suite=1,
    certificate=b"\x30" * 300,
    responder_fingerprint=b"\x88" * HASH_LEN,
    spk_id=1,
    kem_id=2,
    otpk_id=3,
    ephemeral=b"\x99" * 32,
    kem_ciphertext=b"\xaa" * MLKEM768_CIPHERTEXT_LEN,
    signature=b"\xbb" * SIGNATURE_LEN,
    message=wire.encode(MSG),
    created=1_800_000_000_000,
)
INIT_UNSIGNED = dataclasses.replace(INIT, suite=0x7F, kem_id=None, otpk_id=None, kem_ciphertext=None, signature=None)
FRAMES = [MSG, BUNDLE, BUNDLE_CLASSIC, INIT, INIT_UNSIGNED]


def pack(obj: Any) -> bytes:
    """msgpack with bin types for bytes, as the codec writes."""
    return msgpack.packb(obj, use_bin_type=True)


def as_list(frame: Any) -> list[Any]:
    """The frame's msgpack array, for surgery."""
    return msgpack.unpackb(wire.encode(frame))


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_round_trip(frame: Any) -> None:
    data = wire.encode(frame)
    assert wire.decode(data) == frame
    assert wire.frame_type(data) is frame.TYPE
    assert msgpack.unpackb(data)[:2] == [VERSION, frame.TYPE.value]


def test_message_fast_path_agrees_with_generic_decoder() -> None:
    data = wire.encode(MSG)
    assert wire.decode_message(data) == wire.decode(data) == MSG
    # The fast encoder writes exactly what the schema-driven one would.
    assert data == pack([VERSION, FrameType.MESSAGE.value, MSG.dh, MSG.pn, MSG.n, MSG.ciphertext])


def test_message_bounds_are_inclusive() -> None:
    for ct in (b"\x00" * 16, b"\x00" * MAX_CIPHERTEXT):
        for num in (0, MAX_U32):
            msg = RatchetMessage(b"\x01" * 32, num, num, ct)
            assert wire.decode_message(wire.encode(msg)) == msg
            assert wire.decode(wire.encode(msg)) == msg


def test_largest_init_fits_in_a_frame() -> None:
    """The largest INIT the schema allows still fits under MAX_FRAME (so the size check never refuses a valid one)."""
    big = dataclasses.replace(
        INIT, certificate=b"\x30" * MAX_CERTIFICATE, message=b"\x00" * (MAX_CIPHERTEXT + 256), spk_id=MAX_U32
    )
    data = wire.encode(big)
    assert len(data) <= MAX_FRAME
    assert wire.decode(data) == big


def test_bundle_onetime_property() -> None:
    assert BUNDLE.onetime is not None and BUNDLE.onetime.key_id == 3
    assert BUNDLE_CLASSIC.onetime is None
    assert BUNDLE.with_onetime(None) == dataclasses.replace(BUNDLE, otpk_id=None, otpk=None, otpk_signature=None)
    assert BUNDLE_CLASSIC.with_onetime(BUNDLE.onetime).onetime == BUNDLE.onetime


def field_strategy(field: Any) -> st.SearchStrategy[Any]:
    """Values a schema field accepts (lengths capped to keep examples small; bounds are tested above)."""
    if isinstance(field, Opt):
        return st.none() | field_strategy(field.inner)
    if isinstance(field, UInt):
        return st.integers(0, field.max)
    if isinstance(field, Str):
        return st.text(min_size=field.min, max_size=min(field.max, 20))
    if isinstance(field, Items):
        return st.lists(st.tuples(*(field_strategy(f) for f in field.fields)).map(list), max_size=min(field.max, 3))
    if isinstance(field, Many):
        return st.lists(field_strategy(field.field), min_size=field.min, max_size=min(field.max, 3))
    assert isinstance(field, Bin)
    if field.size is not None:
        return st.binary(min_size=field.size, max_size=field.size)
    return st.binary(min_size=field.min, max_size=min(field.max, 64))


def frame_strategy(classes: dict[int, Any]) -> st.SearchStrategy[Any]:
    return st.sampled_from(sorted(classes.values(), key=lambda c: c.TYPE.value)).flatmap(
        lambda cls: st.tuples(*(field_strategy(f) for f in cls.SCHEMA)).map(lambda v: cls(*v))
    )


@settings(max_examples=150, deadline=None)
@given(frame_strategy(FRAME_CLASSES))
def test_round_trip_any_frame(frame: Any) -> None:
    data = wire.encode(frame)
    assert wire.decode(data) == frame
    assert wire.frame_type(data) is frame.TYPE
    if isinstance(frame, RatchetMessage):
        assert wire.decode_message(data) == frame


@settings(max_examples=150, deadline=None)
@given(frame_strategy(LINK_CLASSES))
def test_round_trip_any_link_frame(frame: Any) -> None:
    data = wire.encode_link(frame)
    assert wire.decode_link(data) == frame


# --- refusals: the input as a whole -------------------------------------------------------------------

DECODERS = [wire.decode, wire.decode_message, wire.frame_type, wire.decode_link]
DECODER_IDS = ["decode", "decode_message", "frame_type", "decode_link"]


@pytest.mark.parametrize("decoder", DECODERS, ids=DECODER_IDS)
@pytest.mark.parametrize(
    "data",
    [bytearray(wire.encode(MSG)), memoryview(wire.encode(MSG)), wire.encode(MSG).hex(), None, 5, [1, 1]],
    ids=["bytearray", "memoryview", "str", "None", "int", "list"],
)
def test_not_bytes(decoder: Any, data: Any) -> None:
    with pytest.raises(DecodeError, match="a frame is bytes"):
        decoder(data)


@pytest.mark.parametrize("decoder", DECODERS[:3], ids=DECODER_IDS[:3])
def test_oversized_frame_refused_before_parsing(decoder: Any) -> None:
    # A valid msgpack prefix followed by padding: the size alone decides.
    data = pack([VERSION, 1, b"\x00" * 32, 0, 0, b"\x00" * (MAX_FRAME)])
    assert len(data) > MAX_FRAME
    with pytest.raises(DecodeError, match="exceeds"):
        decoder(data)
    with pytest.raises(DecodeError, match="exceeds"):
        decoder(b"\x00" * (MAX_FRAME + 1))


def test_oversized_link_frame() -> None:
    with pytest.raises(DecodeError, match="exceeds"):
        wire.decode_link(b"\x00" * (MAX_LINK_FRAME + 1))


NOT_MSGPACK = {
    "empty": b"",
    "reserved byte 0xc1": b"\xc1",
    "truncated array": wire.encode(MSG)[:-1],
    "truncated header": b"\x96",
    "bad utf-8 str": b"\xa3\xff\xfe\xfd",
    "bad timestamp ext": b"\xc7\x03\xff\x00\x00\x00",
    "deep nesting": b"\x91" * 100_000 + b"\x00",
    "map with array key": b"\x81\x91\x00\x00",
}


@pytest.mark.parametrize("decoder", DECODERS, ids=DECODER_IDS)
@pytest.mark.parametrize("data", NOT_MSGPACK.values(), ids=NOT_MSGPACK.keys())
def test_not_msgpack(decoder: Any, data: bytes) -> None:
    with pytest.raises(DecodeError, match="not a msgpack frame"):
        decoder(data)


@pytest.mark.parametrize("decoder", DECODERS, ids=DECODER_IDS)
def test_trailing_bytes(decoder: Any) -> None:
    with pytest.raises(DecodeError, match="not a msgpack frame: bytes after its end"):
        decoder(wire.encode(MSG) + b"\x00")
    with pytest.raises(DecodeError, match="not a msgpack frame: bytes after its end"):
        decoder(wire.encode(MSG) + wire.encode(MSG))


NOT_AN_ARRAY = {
    "int": 1,
    "nil": None,
    "bin": wire.encode(MSG),
    "str": "frame",
    "map": {"v": 1, "t": 1},
    "empty array": [],
    "one element": [VERSION],
    "timestamp": msgpack.Timestamp(0),
}


@pytest.mark.parametrize("decoder", DECODERS, ids=DECODER_IDS)
@pytest.mark.parametrize("obj", NOT_AN_ARRAY.values(), ids=NOT_AN_ARRAY.keys())
def test_not_an_array(decoder: Any, obj: Any) -> None:
    with pytest.raises(DecodeError, match=r"a frame is an array"):
        decoder(pack(obj))


@pytest.mark.parametrize("decoder", DECODERS, ids=DECODER_IDS)
@pytest.mark.parametrize("version", [0, 2, 255, -1, True, 1.0, "1", b"\x01", None, [1]])
def test_wrong_version(decoder: Any, version: Any) -> None:
    obj = as_list(MSG)
    obj[0] = version
    with pytest.raises(DecodeError, match="unsupported protocol version"):
        decoder(pack(obj))


@pytest.mark.parametrize("frame_type", [0, 4, 31, 99, -1, 2**40, "1", b"\x01", None, [1], {"t": 1}, True, 1.0])
def test_unknown_type_generic_decoder(frame_type: Any) -> None:
    obj = as_list(MSG)
    obj[1] = frame_type
    with pytest.raises(UnknownFrameType):
        wire.decode(pack(obj))
    with pytest.raises(UnknownFrameType):
        wire.decode_link(pack(obj))


@pytest.mark.parametrize("frame_type", [0, 4, 99, -1, 2**40])
def test_unknown_type_fast_paths(frame_type: Any) -> None:
    obj = as_list(MSG)
    obj[1] = frame_type
    with pytest.raises(DecodeError, match="expected a ratchet message frame"):
        wire.decode_message(pack(obj))
    with pytest.raises(UnknownFrameType):
        wire.frame_type(pack(obj))


@pytest.mark.parametrize("frame_type", [True, False, 1.0, 2.0, "1", b"\x01", None, [1], {"t": 1}])
def test_frame_type_must_be_an_integer(frame_type: Any) -> None:
    """true / 1.0 compare equal to 1 in Python: the fast paths must not take them for MESSAGE (a second
    encoding of the same frame), nor anything else that is not an integer."""
    obj = as_list(MSG)
    obj[1] = frame_type
    data = pack(obj)
    with pytest.raises(DecodeError, match="expected a ratchet message frame"):
        wire.decode_message(data)
    with pytest.raises(DecodeError, match="not an integer"):
        wire.frame_type(data)
    with pytest.raises(UnknownFrameType):
        wire.decode(data)


@pytest.mark.parametrize("frame", [BUNDLE, INIT], ids=["bundle", "init"])
def test_decode_message_refuses_other_frame_types(frame: Any) -> None:
    with pytest.raises(DecodeError, match="expected a ratchet message frame"):
        wire.decode_message(wire.encode(frame))


# --- refusals: field count, types and lengths -------------------------------------------------------


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_wrong_field_count(frame: Any) -> None:
    obj = as_list(frame)
    for bad in (obj[:-1], [*obj, b"extra"], obj[:2]):
        with pytest.raises(DecodeError, match="fields, got"):
            wire.decode(pack(bad))
        if isinstance(frame, RatchetMessage):
            with pytest.raises(DecodeError, match="expected a ratchet message frame"):
                wire.decode_message(pack(bad))


def field_mutations(field: Any) -> list[tuple[str, Any]]:
    """Values of the wrong type, or of the right type out of bounds, for one schema field."""
    wrong_types: list[tuple[str, Any]] = [("list", [b"\x00"]), ("map", {"k": 1}), ("float", 1.5)]
    optional = isinstance(field, Opt)
    inner = field.inner if optional else field
    if not optional:
        wrong_types.append(("nil", None))
    if isinstance(inner, UInt):
        return [
            *wrong_types,
            ("bool true", True),
            ("bool false", False),
            ("float int", 1.0),
            ("str", "1"),
            ("bin", b"\x01"),
            ("negative", -1),
            # (a u64 field cannot be exceeded: msgpack has no larger integer)
            *([("too large", inner.max + 1)] if inner.max < MAX_U64 else []),
        ]
    assert isinstance(inner, Bin)
    sized = inner.size if inner.size is not None else max(inner.min, 1)
    out = [*wrong_types, ("str for bytes", "x" * sized), ("int for bytes", 7), ("bool for bytes", True)]
    if inner.size is not None:
        out += [("one short", b"\x00" * (inner.size - 1)), ("one long", b"\x00" * (inner.size + 1)), ("empty", b"")]
    else:
        out += [("over max", b"\x00" * (inner.max + 1))]
        if inner.min > 0:
            out += [("under min", b"\x00" * (inner.min - 1))]
    return out


FIELD_CASES = [
    pytest.param(frame, index, value, id=f"{type(frame).__name__}.{dataclasses.fields(frame)[index].name}-{label}")
    for frame in (MSG, BUNDLE, INIT)
    for index, field in enumerate(frame.SCHEMA)
    for label, value in field_mutations(field)
]


@pytest.mark.parametrize(("frame", "index", "value"), FIELD_CASES)
def test_wrong_field_type_or_length(frame: Any, index: int, value: Any) -> None:
    obj = as_list(frame)
    obj[2 + index] = value
    data = pack(obj)
    with pytest.raises(DecodeError, match=r"expected|malformed"):
        wire.decode(data)
    if isinstance(frame, RatchetMessage):
        with pytest.raises(DecodeError, match="malformed ratchet message"):
            wire.decode_message(data)


def test_every_bool_for_int_is_refused() -> None:
    """The classic msgpack pitfall: true/false decode to bool, which Python treats as an int."""
    for frame in (MSG, BUNDLE, INIT):
        for index, field in enumerate(frame.SCHEMA):
            inner = field.inner if isinstance(field, Opt) else field
            if isinstance(inner, UInt):
                obj = as_list(frame)
                obj[2 + index] = True
                with pytest.raises(DecodeError):
                    wire.decode(pack(obj))


def test_optional_fields_accept_nil() -> None:
    for frame in (BUNDLE, INIT):
        obj = as_list(frame)
        for index, field in enumerate(frame.SCHEMA):
            if isinstance(field, Opt):
                obj[2 + index] = None
        decoded = wire.decode(pack(obj))
        for index, field in enumerate(frame.SCHEMA):
            if isinstance(field, Opt):
                assert getattr(decoded, dataclasses.fields(decoded)[index].name) is None


def test_nested_garbage() -> None:
    obj = as_list(MSG)
    obj[5] = [[[[b"\x00" * 16]]]]
    with pytest.raises(DecodeError):
        wire.decode(pack(obj))
    with pytest.raises(DecodeError):
        wire.decode_message(pack(obj))
    obj = as_list(BUNDLE)
    obj[2] = {"certificate": b"\x30"}
    with pytest.raises(DecodeError):
        wire.decode(pack(obj))
    obj = as_list(INIT)
    obj[11] = msgpack.ExtType(5, b"\x00" * 20)
    with pytest.raises(DecodeError):
        wire.decode(pack(obj))


# --- link frames: the Str and Items schema fields (schema-driven, whatever link.py holds) ---------------


def sample_value(field: Any, *, fill: bool = False) -> Any:
    """The smallest value a field accepts (for Opt: nil, or the inner value when `fill`)."""
    if isinstance(field, Opt):
        return sample_value(field.inner) if fill else None
    if isinstance(field, UInt):
        return 1
    if isinstance(field, Str):
        return "n" * max(field.min, 1)
    if isinstance(field, Items):
        return [[sample_value(f, fill=True) for f in field.fields]]
    if isinstance(field, Many):
        return [sample_value(field.field, fill=True)] * max(field.min, 1)
    assert isinstance(field, Bin)
    return b"\x01" * (field.size if field.size is not None else max(field.min, 1))


def sample(cls: Any, *, fill: bool = False) -> Any:
    return cls(*(sample_value(f, fill=fill) for f in cls.SCHEMA))


LINK_SAMPLES = [sample(cls, fill=fill) for cls in LINK_CLASSES.values() for fill in (False, True)]


@pytest.mark.parametrize("frame", LINK_SAMPLES, ids=lambda f: type(f).__name__)
def test_link_round_trips(frame: Any) -> None:
    assert wire.decode_link(wire.encode_link(frame)) == frame


def test_frame_families_do_not_mix() -> None:
    """A link frame is not an end-to-end frame, nor the reverse (link types start at 32)."""
    assert not set(FRAME_CLASSES) & set(LINK_CLASSES)
    data = wire.encode_link(LINK_SAMPLES[0])
    with pytest.raises(UnknownFrameType):
        wire.decode(data)
    with pytest.raises(UnknownFrameType):
        wire.frame_type(data)
    with pytest.raises(DecodeError):
        wire.decode_message(data)
    with pytest.raises(UnknownFrameType):
        wire.decode_link(wire.encode(MSG))


def link_fields(kind: type) -> list[tuple[Any, int, Any]]:
    return [
        (cls, i, f)
        for cls in LINK_CLASSES.values()
        for i, f in enumerate(cls.SCHEMA)
        if isinstance(f.inner if isinstance(f, Opt) else f, kind)
    ]


def str_mutations(field: Str) -> list[Any]:
    out: list[Any] = ["x" * (field.max + 1), b"name", 5, None, ["n"]]
    if field.min > 0:
        out.append("x" * (field.min - 1))
    return out


STR_CASES = [
    pytest.param(cls, i, bad, id=f"{cls.__name__}.{i}-{type(bad).__name__}-{j}")
    for cls, i, f in link_fields(Str)
    for j, bad in enumerate(str_mutations(f))
]


@pytest.mark.parametrize(("cls", "index", "value"), STR_CASES)
def test_link_str_field_refusals(cls: Any, index: int, value: Any) -> None:
    obj = msgpack.unpackb(wire.encode_link(sample(cls)))
    obj[2 + index] = value
    with pytest.raises(DecodeError, match=r"string|bytes|integer"):
        wire.decode_link(pack(obj))


def items_mutations(field: Items) -> list[tuple[str, Any, str]]:
    good = [sample_value(f, fill=True) for f in field.fields]
    out = [
        ("not a list", b"not a list", "array of at most"),
        ("too many", [good] * (field.max + 1), "array of at most"),
        ("item not a list", [good[0]], "items of"),
        ("item too short", [good[:-1]], "items of"),
        ("item too long", [[*good, 0]], "items of"),
    ]
    for j, f in enumerate(field.fields):
        bad = list(good)
        bad[j] = [b"nested"]
        out.append((f"item field {j} garbage", [bad], "expected"))
        if isinstance(f, UInt):
            bad = list(good)
            bad[j] = True
            out.append((f"item field {j} bool", [bad], "integer"))
    return out


ITEMS_CASES = [
    pytest.param(cls, i, value, match, id=f"{cls.__name__}.{i}-{label}")
    for cls, i, f in link_fields(Items)
    for label, value, match in items_mutations(f)
]


@pytest.mark.parametrize(("cls", "index", "value", "match"), ITEMS_CASES)
def test_link_items_field_refusals(cls: Any, index: int, value: Any, match: str) -> None:
    obj = msgpack.unpackb(wire.encode_link(sample(cls)))
    obj[2 + index] = value
    with pytest.raises(DecodeError, match=match):
        wire.decode_link(pack(obj))


def many_mutations(field: Many) -> list[tuple[str, Any, str]]:
    good = sample_value(field.field, fill=True)
    out = [
        ("not a list", b"not a list", "array of"),
        ("too many", [good] * (field.max + 1), "array of"),
        ("value garbage", [[b"nested"]], "expected"),
    ]
    if field.min > 0:
        out.append(("too few", [good] * (field.min - 1), "array of"))
    return out


MANY_CASES = [
    pytest.param(cls, i, value, match, id=f"{cls.__name__}.{i}-{label}")
    for cls, i, f in link_fields(Many)
    for label, value, match in many_mutations(f)
]


@pytest.mark.parametrize(("cls", "index", "value", "match"), MANY_CASES)
def test_link_many_field_refusals(cls: Any, index: int, value: Any, match: str) -> None:
    obj = msgpack.unpackb(wire.encode_link(sample(cls)))
    obj[2 + index] = value
    with pytest.raises(DecodeError, match=match):
        wire.decode_link(pack(obj))


def test_link_schemas_exercise_str_items_and_many() -> None:
    """The refusal tests above are only meaningful while link.py has such fields."""
    assert STR_CASES and ITEMS_CASES and MANY_CASES


# --- BATCH: several link frames in one message ------------------------------------------------------


def test_a_batch_decodes_to_its_frames_in_order_and_a_lone_frame_to_itself() -> None:
    frames = [Ack(bytes([i]) * 16) for i in range(5)]
    (message,) = wire.pack_link_frames([wire.encode_link(f) for f in frames])
    assert wire.decode_link_frames(message) == frames
    (alone,) = wire.pack_link_frames([wire.encode_link(frames[0])])
    assert alone == wire.encode_link(frames[0])
    assert wire.decode_link_frames(alone) == frames[:1]
    assert wire.pack_link_frames([]) == []


def test_frames_are_split_into_batches_within_the_count_and_size_limits() -> None:
    many = [wire.encode_link(Ack(i.to_bytes(16, "big"))) for i in range(MAX_BATCH * 2 + 3)]
    messages = wire.pack_link_frames(many)
    assert len(messages) == 3
    assert [f for m in messages for f in wire.decode_link_frames(m)] == [wire.decode_link(f) for f in many]
    big = [wire.encode_link(CrlFeed(bytes([i]) * (MAX_CRL // 2 + 20))) for i in range(5)]
    messages = wire.pack_link_frames(big)
    assert all(len(m) <= MAX_LINK_FRAME for m in messages)
    assert len(messages) == 5  # two just over half a CRL each do not fit one message
    assert [f for m in messages for f in wire.decode_link_frames(m)] == [wire.decode_link(f) for f in big]
    near = [wire.encode_link(CrlFeed(b"\x01" * (MAX_CRL // 2 - 64))) for _ in range(2)]
    (both,) = wire.pack_link_frames(near)
    assert len(both) <= MAX_LINK_FRAME


def test_a_batch_inside_a_batch_or_a_malformed_inner_frame_is_refused() -> None:
    inner = wire.encode_link(Batch([wire.encode_link(Ack(b"\x01" * 16))]))
    with pytest.raises(DecodeError, match="BATCH inside a BATCH"):
        wire.decode_link_frames(wire.encode_link(Batch([inner, wire.encode_link(Ack(b"\x02" * 16))])))
    with pytest.raises(DecodeError):
        wire.decode_link_frames(wire.encode_link(Batch([b"\x93\x01\x29", wire.encode_link(Ack(b"\x02" * 16))])))
    with pytest.raises(UnknownFrameType):
        wire.decode_link_frames(wire.encode_link(Batch([wire.encode(MSG)])))


# --- fuzzing: only DecodeError, whatever the bytes -------------------------------------------------------


def decodes_or_refuses(data: bytes) -> None:
    """Every decoder either returns a well-typed frame or raises DecodeError; nothing else escapes."""
    for decoder in DECODERS:
        try:
            out = decoder(data)
        except DecodeError:
            continue
        if decoder is wire.decode_message:
            assert type(out) is RatchetMessage
        elif decoder is wire.frame_type:
            assert isinstance(out, FrameType)
        elif decoder is wire.decode:
            assert type(out) in FRAME_CLASSES.values()
            assert wire.decode(wire.encode(out)) == out


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


VALID_FRAMES = [wire.encode(f) for f in FRAMES] + [wire.encode_link(f) for f in LINK_SAMPLES]


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "header"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "header" and len(data) > 8:
            # Mutate the first bytes, where the array, version, type and first lengths live.
            data[draw(st.integers(0, 8))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_frames())
def test_fuzz_mutated_valid_frames(data: bytes) -> None:
    decodes_or_refuses(data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.binary(max_size=40)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([1, 0, 2]),
    st.sampled_from([*FRAME_CLASSES, *LINK_CLASSES, 0, 7, 200]),
    st.lists(msgpack_values, max_size=12),
)
def test_fuzz_structured(version: int, frame_type: int, fields: list[Any]) -> None:
    """Well-formed msgpack arrays with plausible headers and arbitrary fields."""
    decodes_or_refuses(pack([version, frame_type, *fields]))


def test_fuzz_limits_are_what_the_schema_says() -> None:
    """Sanity: the bounds the fuzzers rely on are the module's constants."""
    assert RatchetMessage.SCHEMA[3] == Bin(min=16, max=MAX_CIPHERTEXT)
    assert MAX_U64 == 2**64 - 1
    assert InitMessage.SCHEMA[0] == UInt(0xFF)
