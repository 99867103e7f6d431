"""The frames of the end-to-end protocol, as frozen dataclasses (PROTOCOL.md §3).

Each class declares its wire type and its schema: the exact fields, in order, with their
types and bounds. `protocol.wire` encodes and decodes them; nothing else touches bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum
from typing import ClassVar

#: Key and signature sizes (raw encodings).
X25519_LEN = 32
ED25519_LEN = 32
SIGNATURE_LEN = 64
MLKEM768_PUBLIC_LEN = 1184
MLKEM768_CIPHERTEXT_LEN = 1088

#: The protocol version, first element of every frame.
VERSION = 1

#: Largest plaintext one message may carry.
MAX_PLAINTEXT = 64 * 1024
#: AES-GCM adds a 16-byte tag.
MAX_CIPHERTEXT = MAX_PLAINTEXT + 16
#: Largest DER certificate accepted inside a frame.
MAX_CERTIFICATE = 4096
#: Largest frame of any type; checked before the decoder allocates anything.
MAX_FRAME = 2 * MAX_CIPHERTEXT + 2 * MAX_CERTIFICATE + 8192
#: Message numbers and prekey ids are unsigned 32-bit.
MAX_U32 = 0xFFFFFFFF
#: SHA-256 output (fingerprints, transcript hashes).
HASH_LEN = 32
#: Seconds since the epoch fit in 64 bits.
MAX_U64 = 0xFFFFFFFFFFFFFFFF


class FrameType(IntEnum):
    """Second element of every frame."""

    MESSAGE = 1
    INIT = 2
    BUNDLE = 3


class Suite(IntEnum):
    """The handshake suite, carried in the signed transcript."""

    #: X25519 + ML-KEM-768 + Ed25519 signatures; the default and the only one nodes accept unless told.
    HYBRID = 1
    #: X25519 + Ed25519 signatures, no ML-KEM: exists for the harvest-now scenario.
    CLASSIC = 2
    #: Unsigned X25519 (no bundle or transcript signature): INSECURE, for the mitm-unsigned scenario only.
    INSECURE_UNSIGNED = 0x7F


# --- schema vocabulary ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bin:
    """A msgpack bin of exactly `size` bytes, or between `min` and `max` bytes."""

    size: int | None = None
    max: int = 0
    min: int = 0


@dataclass(frozen=True, slots=True)
class UInt:
    """A msgpack non-negative integer up to `max`."""

    max: int


@dataclass(frozen=True, slots=True)
class Opt:
    """The inner field, or nil."""

    inner: Bin | UInt


Field = Bin | UInt | Opt


# --- frames ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RatchetMessage:
    """A Double Ratchet message: header (ratchet key, previous chain length, number) and ciphertext."""

    TYPE: ClassVar[FrameType] = FrameType.MESSAGE
    SCHEMA: ClassVar[tuple[Field, ...]] = (
        Bin(X25519_LEN),
        UInt(MAX_U32),
        UInt(MAX_U32),
        Bin(min=16, max=MAX_CIPHERTEXT),
    )

    dh: bytes
    pn: int
    n: int
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class OneTimePrekey:
    """A one-time X25519 prekey with its own identity signature (the relay hands each out once)."""

    key_id: int
    public: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class PrekeyBundle:
    """What an initiator fetches to start a session with an offline responder.

    `signature` is the identity key's signature over every field but the one-time prekey,
    which carries its own (PROTOCOL.md §4.1).
    """

    TYPE: ClassVar[FrameType] = FrameType.BUNDLE
    SCHEMA: ClassVar[tuple[Field, ...]] = (
        Bin(min=1, max=MAX_CERTIFICATE),
        UInt(MAX_U64),
        UInt(MAX_U32),
        Bin(X25519_LEN),
        Opt(UInt(MAX_U32)),
        Opt(Bin(MLKEM768_PUBLIC_LEN)),
        Bin(SIGNATURE_LEN),
        Opt(UInt(MAX_U32)),
        Opt(Bin(X25519_LEN)),
        Opt(Bin(SIGNATURE_LEN)),
    )

    certificate: bytes
    created: int
    spk_id: int
    spk: bytes
    kem_id: int | None
    kem: bytes | None
    signature: bytes
    otpk_id: int | None = None
    otpk: bytes | None = None
    otpk_signature: bytes | None = None

    def with_onetime(self, onetime: OneTimePrekey | None) -> PrekeyBundle:
        """The bundle as a relay hands it out: the signed part plus (at most) one one-time prekey."""
        if onetime is None:
            return replace(self, otpk_id=None, otpk=None, otpk_signature=None)
        return replace(self, otpk_id=onetime.key_id, otpk=onetime.public, otpk_signature=onetime.signature)

    @property
    def onetime(self) -> OneTimePrekey | None:
        """The one-time prekey, if the bundle carries one."""
        if self.otpk_id is None or self.otpk is None or self.otpk_signature is None:
            return None
        return OneTimePrekey(self.otpk_id, self.otpk, self.otpk_signature)


@dataclass(frozen=True, slots=True)
class InitMessage:
    """The initiator's first frame: its certificate, the keys it used, the signed transcript, message 0."""

    TYPE: ClassVar[FrameType] = FrameType.INIT
    SCHEMA: ClassVar[tuple[Field, ...]] = (
        UInt(0xFF),
        Bin(min=1, max=MAX_CERTIFICATE),
        Bin(HASH_LEN),
        UInt(MAX_U32),
        Opt(UInt(MAX_U32)),
        Opt(UInt(MAX_U32)),
        Bin(X25519_LEN),
        Opt(Bin(MLKEM768_CIPHERTEXT_LEN)),
        Opt(Bin(SIGNATURE_LEN)),
        Bin(min=1, max=MAX_CIPHERTEXT + 256),
        UInt(MAX_U64),
    )

    suite: int
    certificate: bytes
    responder_fingerprint: bytes
    spk_id: int
    kem_id: int | None
    otpk_id: int | None
    ephemeral: bytes
    kem_ciphertext: bytes | None
    signature: bytes | None
    message: bytes
    #: When the initiator made it (milliseconds since the epoch, its clock), signed in the transcript:
    #: the freshness that orders two sessions with one peer (PROTOCOL.md §8).
    created: int


Frame = RatchetMessage | PrekeyBundle | InitMessage

FRAME_CLASSES: dict[int, type[RatchetMessage] | type[PrekeyBundle] | type[InitMessage]] = {
    FrameType.MESSAGE: RatchetMessage,
    FrameType.INIT: InitMessage,
    FrameType.BUNDLE: PrekeyBundle,
}

__all__ = [
    "ED25519_LEN",
    "FRAME_CLASSES",
    "HASH_LEN",
    "MAX_CERTIFICATE",
    "MAX_CIPHERTEXT",
    "MAX_FRAME",
    "MAX_PLAINTEXT",
    "VERSION",
    "Bin",
    "Frame",
    "FrameType",
    "InitMessage",
    "OneTimePrekey",
    "Opt",
    "PrekeyBundle",
    "RatchetMessage",
    "Suite",
    "UInt",
]
