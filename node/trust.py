"""Trust on first use, then verified: which peer identity keys the user has checked (PROTOCOL.md §11).

A peer is *unverified* until the user compares the safety number out of band and marks it
(`kmsnet trust NAME --safety-number N`, `/verify NAME` in the chat). From then on the verified
identity key is remembered, and when the peer turns up with another key (a re-key, a new device,
or someone in the middle), sending to it is *held*: `send` refuses with `IdentityChanged` until
the user accepts the new safety number the same way (Signal's behaviour). Receiving goes on; the
user is told by the `identity_changed` event.

Keystore layout: `trust/<peer>` → `[1, verified identity key (32 bytes), verified at (ms), held key or nil]`,
the held key being the new one a send was held for (so that `trust` can check a number against it
before any session with it exists).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from node.errors import IdentityChanged, NodeError, SafetyNumberMismatch
from node.keystore import Keystore
from protocol.safety import safety_number

NS_TRUST = "trust"


class TrustState(StrEnum):
    """What the user knows of a peer's identity key (`status --json`'s `trust`)."""

    UNVERIFIED = "unverified"  # trusted on first use: nobody compared the safety number
    VERIFIED = "verified"  # the user compared the safety number of this very key
    CHANGED = "changed"  # verified once, and the peer now has another key: sending is held


@dataclass(frozen=True, slots=True)
class TrustRecord:
    """The record `trust/<peer>`."""

    verified: bytes
    verified_at: float
    held: bytes | None = None

    def pack(self) -> bytes:
        """The sealed record's value."""
        return msgpack.packb([1, self.verified, round(self.verified_at * 1000), self.held])

    @classmethod
    def unpack(cls, value: bytes) -> TrustRecord:
        """A record as `pack` wrote it."""
        _, verified, at, held = msgpack.unpackb(value)
        return cls(verified, at / 1000, held)


def certificate_key(certificate: bytes) -> bytes:
    """The raw Ed25519 identity key in a DER certificate (a bundle's, before any session with it)."""
    key = x509.load_der_x509_certificate(certificate).public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


class Trust:
    """The verified identity keys of one node's peers."""

    def __init__(self, keystore: Keystore, own_key: Callable[[], bytes]) -> None:
        """`own_key()`: this node's identity key now (it changes with a re-key)."""
        self.keystore = keystore
        self.own_key = own_key

    def record(self, peer: str) -> TrustRecord | None:
        """The stored record of `peer`, or None if never verified."""
        value = self.keystore.get(NS_TRUST, peer)
        return TrustRecord.unpack(value) if value is not None else None

    def state(self, peer: str, identity: bytes | None) -> TrustState:
        """Unverified, verified, or changed, for the identity key `identity` the peer has now."""
        record = self.record(peer)
        if record is None:
            return TrustState.UNVERIFIED
        if identity is None or hmac.compare_digest(identity, record.verified):
            return TrustState.VERIFIED
        return TrustState.CHANGED

    def check_send(self, peer: str, identity: bytes) -> None:
        """Refuse to send to a verified peer whose identity key is no longer the verified one.

        Raises `IdentityChanged` (exit 4), naming the new safety number to compare.
        """
        if self.state(peer, identity) is not TrustState.CHANGED:
            return
        record = self.record(peer)
        assert record is not None
        if record.held != identity:
            self._put(peer, replace(record, held=identity))
        number = safety_number(self.own_key(), identity)
        raise IdentityChanged(
            f"{peer}'s identity key changed since you verified it: nothing sent. Compare the new safety "
            f"number {number} with {peer} out of band, then `kmsnet trust {peer} --safety-number '{number}'`"
        )

    def verify(self, peer: str, number: str, known: bytes | None, now: datetime) -> bytes:
        """Mark `peer` verified if `number` is the safety number of its key; return that key.

        The key checked is the one a send was held for, else `known` (the key of the session held
        with the peer). Raises `SafetyNumberMismatch` (exit 4) if the number is another one, and
        `NodeError` if no key of the peer is known yet.
        """
        record = self.record(peer)
        candidate = record.held if record is not None and record.held is not None else known
        if candidate is None:
            raise NodeError(f"no identity key of {peer} is known yet: exchange a message first, then verify")
        expected = safety_number(self.own_key(), candidate)
        if not hmac.compare_digest(_digits(number), _digits(expected)):
            raise SafetyNumberMismatch(
                f"that is not the safety number shared with {peer} (it is {expected} here): "
                "do not trust this contact until you know why"
            )
        self._put(peer, TrustRecord(candidate, now.timestamp()))
        return candidate

    def forget(self, peer: str) -> bool:
        """Back to unverified (trust on first use); whether it was verified."""
        with self.keystore.transaction():
            return self.keystore.delete(NS_TRUST, peer)

    def _put(self, peer: str, record: TrustRecord) -> None:
        with self.keystore.transaction():
            self.keystore.put(NS_TRUST, peer, record.pack())


def _digits(number: str) -> bytes:
    """A safety number as typed ("12345 67890 ...", with or without spaces or dashes): its digits."""
    return "".join(c for c in number if c.isdigit()).encode()
