"""Frames of the node ↔ relay link (PROTOCOL.md §16).

The relay is untrusted: these frames carry routing data (names, message ids) and opaque
payloads (end-to-end INIT and MESSAGE frames, signed bundles, signed CRLs). The only
cryptography the relay does is check a node's certificate and challenge signature, so that
nobody can connect, fetch mail or publish a bundle as another node.

Every frame is `[VERSION, type, field...]` like the end-to-end frames, with types from 32
up so the two families can never be confused.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar
from urllib.parse import urlsplit

from protocol.labels import LABEL_RELAY_AUTH
from protocol.messages import (
    MAX_CERTIFICATE,
    MAX_CIPHERTEXT,
    MAX_U32,
    MAX_U64,
    SIGNATURE_LEN,
    X25519_LEN,
    Bin,
    Field,
    Opt,
    UInt,
)

#: Message ids are 16 random bytes chosen by the sender (deduplication key end to end).
MSG_ID_LEN = 16
#: Challenge nonces are 32 random bytes chosen by the relay.
CHALLENGE_LEN = 32
#: Node names: the certificate's CN rules (PROTOCOL.md §9).
MAX_NAME = 64
#: An end-to-end payload: an INIT (certificate + KEM ciphertext + message 0) or a MESSAGE.
MAX_PAYLOAD = MAX_CIPHERTEXT + MAX_CERTIFICATE + 4096
#: A signed prekey bundle frame.
MAX_BUNDLE = MAX_CERTIFICATE + 2048
#: A CRL (DER); 10,000 revoked entries fit.
MAX_CRL = 512 * 1024
#: One-time prekeys per upload.
MAX_ONETIME_UPLOAD = 200
#: Error text.
MAX_ERROR_TEXT = 200
#: The largest link frame (a CRL); the relay's websocket max_size.
MAX_LINK_FRAME = MAX_CRL + 64
#: Frames in one BATCH.
MAX_BATCH = 256


@dataclass(frozen=True, slots=True)
class Str:
    """A msgpack str of 1..`max` characters."""

    max: int
    min: int = 1


@dataclass(frozen=True, slots=True)
class Items:
    """A msgpack array of at most `max` items, each an array following `fields`."""

    fields: tuple[Field, ...]
    max: int


@dataclass(frozen=True, slots=True)
class Many:
    """A msgpack array of `min`..`max` values, each following `field`."""

    field: Field
    max: int
    min: int = 0


LinkField = Field | Str | Items | Many


class LinkType(IntEnum):
    """Second element of every link frame."""

    CHALLENGE = 32
    AUTH = 33
    WELCOME = 34
    PUBLISH_BUNDLE = 35
    FETCH_BUNDLE = 36
    BUNDLE = 37
    SEND = 38
    ACCEPTED = 39
    DELIVER = 40
    ACK = 41
    PUBLISH_CRL = 42
    CRL = 43
    ERROR = 44
    BATCH = 45


class ErrorCode(IntEnum):
    """Codes of ERROR frames; the relay closes the connection after the fatal ones."""

    MALFORMED = 1
    UNKNOWN_TYPE = 2
    TOO_LARGE = 3
    AUTH_FAILED = 4
    RATE_LIMITED = 5
    QUOTA_EXCEEDED = 6
    UNKNOWN_RECIPIENT = 7
    NOT_ALLOWED = 8
    UNAVAILABLE = 9
    #: The node's certificate is revoked (at login, or by a CRL just published); preceded by that CRL.
    REVOKED = 10


@dataclass(frozen=True, slots=True)
class Challenge:
    """relay → node, first frame: sign this nonce to prove who you are."""

    TYPE: ClassVar[LinkType] = LinkType.CHALLENGE
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (Bin(CHALLENGE_LEN), Str(255))
    nonce: bytes
    relay: str


@dataclass(frozen=True, slots=True)
class Auth:
    """node → relay: certificate and Ed25519 signature over `auth_signed_bytes` (the nonce, the
    relay's name and the URL the node dialled)."""

    TYPE: ClassVar[LinkType] = LinkType.AUTH
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (Bin(min=1, max=MAX_CERTIFICATE), Bin(SIGNATURE_LEN))
    certificate: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class Welcome:
    """relay → node: authenticated as `name`; `pending` stored envelopes follow as DELIVER frames;
    `onetime` of our one-time prekeys are left to hand out (the node tops them up)."""

    TYPE: ClassVar[LinkType] = LinkType.WELCOME
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (Str(MAX_NAME), UInt(MAX_U32), UInt(MAX_U32))
    name: str
    pending: int
    onetime: int


@dataclass(frozen=True, slots=True)
class PublishBundle:
    """node → relay: our signed bundle (an encoded BUNDLE frame) and one-time prekeys to hand out."""

    TYPE: ClassVar[LinkType] = LinkType.PUBLISH_BUNDLE
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (
        Bin(min=1, max=MAX_BUNDLE),
        Items((UInt(MAX_U32), Bin(X25519_LEN), Bin(SIGNATURE_LEN)), MAX_ONETIME_UPLOAD),
        UInt(1),
    )
    bundle: bytes
    onetime: list[list[object]]
    #: 1: replace the stored one-time prekeys (after a restore); 0: add to them.
    replace: int


@dataclass(frozen=True, slots=True)
class FetchBundle:
    """node → relay: the bundle of `name`, with one one-time prekey if any is left."""

    TYPE: ClassVar[LinkType] = LinkType.FETCH_BUNDLE
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (UInt(MAX_U32), Str(MAX_NAME))
    request: int
    name: str


@dataclass(frozen=True, slots=True)
class BundleReply:
    """relay → node: the answer to FETCH_BUNDLE `request` (nil: no bundle published); `onetime_left` for status."""

    TYPE: ClassVar[LinkType] = LinkType.BUNDLE
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (UInt(MAX_U32), Opt(Bin(min=1, max=MAX_BUNDLE)), UInt(MAX_U32))
    request: int
    bundle: bytes | None
    onetime_left: int


@dataclass(frozen=True, slots=True)
class Send:
    """node → relay: route `payload` to `to`; the relay answers ACCEPTED once it is on disk."""

    TYPE: ClassVar[LinkType] = LinkType.SEND
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (Bin(MSG_ID_LEN), Str(MAX_NAME), Bin(min=1, max=MAX_PAYLOAD))
    msg_id: bytes
    to: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Accepted:
    """relay → node: envelope `msg_id` is stored durably and will be delivered."""

    TYPE: ClassVar[LinkType] = LinkType.ACCEPTED
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (Bin(MSG_ID_LEN),)
    msg_id: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """relay → node: an envelope for us; it stays stored until we ACK it."""

    TYPE: ClassVar[LinkType] = LinkType.DELIVER
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (
        Bin(MSG_ID_LEN),
        Str(MAX_NAME),
        Bin(min=1, max=MAX_PAYLOAD),
        UInt(MAX_U64),
    )
    msg_id: bytes
    sender: str
    payload: bytes
    #: When the relay stored it (milliseconds since the epoch; the relay's word, not a trusted time).
    stored_at: int


@dataclass(frozen=True, slots=True)
class Ack:
    """node → relay: envelope `msg_id` is processed (and our state saved); delete it."""

    TYPE: ClassVar[LinkType] = LinkType.ACK
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (Bin(MSG_ID_LEN),)
    msg_id: bytes


@dataclass(frozen=True, slots=True)
class PublishCrl:
    """CA node → relay: a new CRL (DER) for the feed. The relay takes it only from the CA node and
    only if it verifies and is newer than the one it holds; nodes verify it again themselves."""

    TYPE: ClassVar[LinkType] = LinkType.PUBLISH_CRL
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (Bin(min=1, max=MAX_CRL),)
    crl: bytes


@dataclass(frozen=True, slots=True)
class CrlFeed:
    """relay → node: the newest CRL the relay holds, on connect and on change. Nodes verify it."""

    TYPE: ClassVar[LinkType] = LinkType.CRL
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (Bin(min=1, max=MAX_CRL),)
    crl: bytes


@dataclass(frozen=True, slots=True)
class Error:
    """Either side: what was wrong with the last frame."""

    TYPE: ClassVar[LinkType] = LinkType.ERROR
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (UInt(0xFFFF), Str(MAX_ERROR_TEXT, min=0), Opt(Bin(MSG_ID_LEN)))
    code: int
    text: str
    #: The envelope the error is about, if any (a refused SEND).
    msg_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """Either side: several link frames (each encoded on its own) in one WebSocket message, handled
    in order exactly as if each had come alone. A busy connection then pays one message, and one
    system call, for many frames. A BATCH never holds a BATCH."""

    TYPE: ClassVar[LinkType] = LinkType.BATCH
    SCHEMA: ClassVar[tuple[LinkField, ...]] = (Many(Bin(min=1, max=MAX_LINK_FRAME), MAX_BATCH, min=1),)
    frames: list[bytes]


LinkFrame = (
    Challenge
    | Auth
    | Welcome
    | PublishBundle
    | FetchBundle
    | BundleReply
    | Send
    | Accepted
    | Deliver
    | Ack
    | PublishCrl
    | CrlFeed
    | Error
    | Batch
)

LINK_CLASSES: dict[int, type[LinkFrame]] = {
    cls.TYPE.value: cls
    for cls in (
        Challenge,
        Auth,
        Welcome,
        PublishBundle,
        FetchBundle,
        BundleReply,
        Send,
        Accepted,
        Deliver,
        Ack,
        PublishCrl,
        CrlFeed,
        Error,
        Batch,
    )
}


def auth_signed_bytes(nonce: bytes, relay: str, url: str) -> bytes:
    """What a node signs to authenticate to a relay: bound to this challenge, this relay's name and
    the URL dialled (canonical, `canonical_url`), each length-prefixed so no two pairs collide."""
    name, where = relay.encode(), canonical_url(url).encode()
    return LABEL_RELAY_AUTH + nonce + len(name).to_bytes(2, "big") + name + len(where).to_bytes(2, "big") + where


#: The port a ws:// or wss:// URL means when it names none.
_DEFAULT_PORTS = {"ws": 80, "wss": 443}


def relay_name_of(url: str) -> str:
    """The name a relay dialled at `url` must give in its CHALLENGE: `host:port` as dialled, the host
    in lower case, the port explicit (IPv6 literals in brackets). ValueError for a URL without a
    host or with a scheme other than ws/wss."""
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not a relay URL: {url!r}")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port or _DEFAULT_PORTS[parts.scheme]}"


def canonical_url(url: str) -> str:
    """`scheme://host:port` of a relay URL (path dropped, defaults made explicit): what AUTH signs."""
    return f"{urlsplit(url).scheme}://{relay_name_of(url)}"
