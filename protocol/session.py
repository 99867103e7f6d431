"""An established end-to-end session: the ratchet, bound to a handshake transcript (PROTOCOL.md §7).

The session adds to the ratchet what a node needs: the transcript hash as associated data of
every message, a one-byte content kind (application data or a ratchet heartbeat), the
forced-DH-step policy, a terminal CLOSED state for a revoked peer, and serialisation.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import msgpack

from protocol import wire
from protocol.errors import DecodeError, LocalError, SessionClosed
from protocol.identity import X25519KeyPair
from protocol.messages import HASH_LEN, MAX_PLAINTEXT, RatchetMessage
from protocol.ratchet import KeyGen, Ratchet

#: A receiver that has taken this many messages on one chain without sending asks for a heartbeat,
#: whose new ratchet key makes the sender's next message a DH step (PROTOCOL.md §7.3).
DEFAULT_DH_STEP_AFTER = 50


class Kind(IntEnum):
    """First byte of every session plaintext."""

    DATA = 1
    #: Empty message whose only job is to carry our new ratchet key back (forced DH step).
    HEARTBEAT = 2


class Received(NamedTuple):
    """A decrypted message: its kind and application bytes (immutable; a tuple for speed)."""

    kind: Kind
    data: bytes

    def __repr__(self) -> str:
        return f"Received(kind={self.kind.name}, {len(self.data)} bytes)"


class Session:
    """One side of an established session with one peer."""

    __slots__ = (
        "_closed",
        "_ratchet",
        "created",
        "dh_step_after",
        "initiator",
        "peer",
        "peer_fingerprint",
        "suite",
        "transcript",
    )

    def __init__(
        self,
        ratchet: Ratchet,
        *,
        transcript: bytes,
        peer: str,
        peer_fingerprint: bytes,
        suite: int,
        dh_step_after: int = DEFAULT_DH_STEP_AFTER,
        closed: str | None = None,
        created: int = 0,
        initiator: bytes = b"",
    ) -> None:
        if len(transcript) != HASH_LEN or len(peer_fingerprint) != HASH_LEN:
            raise LocalError("transcript hash and fingerprint are 32 bytes")
        if initiator and len(initiator) != HASH_LEN:
            raise LocalError("the initiator's fingerprint is 32 bytes")
        if dh_step_after < 1:
            raise LocalError("dh_step_after must be at least 1")
        self._ratchet = ratchet
        self.transcript = transcript
        self.peer = peer
        self.peer_fingerprint = peer_fingerprint
        self.suite = suite
        self.dh_step_after = dh_step_after
        self._closed = closed
        #: The INIT's signed freshness (milliseconds) and the certificate fingerprint of the side that
        #: sent it: together they rank two sessions with one peer (PROTOCOL.md §8). 0 and b"" for a
        #: session restored from format 1, which had neither.
        self.created = created
        self.initiator = initiator

    @property
    def ratchet(self) -> Ratchet:
        """The underlying ratchet (for status, tests and scenarios)."""
        return self._ratchet

    @property
    def closed(self) -> str | None:
        """Why the session was closed, or None while it is open."""
        return self._closed

    def close(self, reason: str) -> None:
        """Tear the session down for good: every later frame is refused (e.g. the peer was revoked)."""
        self._closed = reason

    @property
    def heartbeat_due(self) -> bool:
        """True when we have received `dh_step_after` messages in a row and sent none since.

        Sending anything now carries a fresh ratchet key, so the peer's next message is a DH
        step; a node answers a due heartbeat with `encrypt(b"", kind=Kind.HEARTBEAT)`.
        """
        r = self._ratchet
        return r.received_in_chain >= self.dh_step_after and r.sent_in_chain == 0 and r.can_send

    def reserve(self, ahead: int) -> bool:
        """Reserve sending message numbers ahead (see `Ratchet.reserve`); True: persist before sending."""
        if self._closed is not None:
            raise SessionClosed(self._closed)
        return self._ratchet.reserve(ahead)

    def encrypt_message(self, data: bytes, *, kind: Kind = Kind.DATA) -> RatchetMessage:
        """Encrypt application bytes into a ratchet message (not yet encoded)."""
        if self._closed is not None:
            raise SessionClosed(self._closed)
        if len(data) >= MAX_PLAINTEXT:
            raise LocalError(f"message over {MAX_PLAINTEXT - 1} bytes")
        if kind is Kind.HEARTBEAT and data:
            raise LocalError("a heartbeat carries no content")
        return self._ratchet.encrypt(_KIND_BYTE[kind] + data, self.transcript)

    def encrypt(self, data: bytes, *, kind: Kind = Kind.DATA) -> bytes:
        """Encrypt application bytes into an encoded MESSAGE frame."""
        return wire.encode(self.encrypt_message(data, kind=kind))

    def decrypt_message(self, msg: RatchetMessage) -> Received:
        """Decrypt a decoded ratchet message. A refused message leaves the session unchanged."""
        if self._closed is not None:
            raise SessionClosed(self._closed)
        plaintext = self._ratchet.decrypt(msg, self.transcript, _check_content)
        return Received(_KINDS[plaintext[0]], plaintext[1:])

    def decrypt(self, frame: bytes) -> Received:
        """Decode and decrypt a MESSAGE frame."""
        return self.decrypt_message(wire.decode_message(frame))

    def to_bytes(self) -> bytes:
        """The whole session, for the keystore (secret: seal it)."""
        return msgpack.packb(
            [
                2,
                self._ratchet.to_bytes(),
                self.transcript,
                self.peer,
                self.peer_fingerprint,
                self.suite,
                self.dh_step_after,
                self._closed,
                self.created,
                self.initiator,
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, keygen: KeyGen = X25519KeyPair.generate) -> Session:
        """Restore what `to_bytes` wrote. Raises DecodeError on anything malformed."""
        try:
            fields = msgpack.unpackb(data, raw=False, max_map_len=0)
            fmt, ratchet, transcript, peer, fp, suite, step, closed, *rank = fields
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise DecodeError("malformed session state") from exc
        # Format 1 had no rank (created, initiator): such a session ranks below any new one.
        if type(fmt) is not int:
            raise DecodeError("malformed session state")
        if fmt == 2 and len(rank) == 2:
            created, initiator = rank
        elif fmt == 1 and not rank:
            created, initiator = 0, b""
        else:
            raise DecodeError("malformed session state")
        if not (
            type(created) is int
            and created >= 0
            and type(initiator) is bytes
            and type(ratchet) is bytes
            and type(transcript) is bytes
            and type(peer) is str
            and type(fp) is bytes
            and type(suite) is int
            and type(step) is int
            and (closed is None or type(closed) is str)
        ):
            raise DecodeError("malformed session state")
        try:
            return cls(
                Ratchet.from_bytes(ratchet, keygen=keygen),
                transcript=transcript,
                peer=peer,
                peer_fingerprint=fp,
                suite=suite,
                dh_step_after=step,
                closed=closed,
                created=created,
                initiator=initiator,
            )
        except LocalError as exc:
            raise DecodeError(str(exc)) from exc

    def __repr__(self) -> str:
        state = f"closed: {self._closed}" if self._closed else "open"
        return f"Session(peer={self.peer!r}, {state}, {self._ratchet!r})"


_KIND_BYTE = {kind: bytes([kind]) for kind in Kind}
_KINDS = {kind.value: kind for kind in Kind}


def _check_content(plaintext: bytes) -> None:
    """Refuse authentic content we cannot interpret, before the ratchet commits to it."""
    if not plaintext or plaintext[0] not in _KINDS:
        # Only a buggy or hostile peer (holding the keys) sends this; refused like any bad frame.
        raise DecodeError("unknown content kind")
    if plaintext[0] == Kind.HEARTBEAT and len(plaintext) != 1:
        raise DecodeError("a heartbeat carries no content")
