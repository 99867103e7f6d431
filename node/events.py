"""What a node hands its application: messages and security events (PRODUCT.md, `receive --json`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: Every security event a node reports, and what it means (the `event` of `receive --json`).
EVENTS = {
    "session_established": "a session with the peer started; compare the safety number out of band",
    "identity_changed": "the peer's identity key changed: verify the new safety number before trusting it",
    "session_refused": "a session could not start: the peer's certificate, bundle or handshake was refused",
    "peer_revoked": "the CA revoked the peer's certificate: its session is closed",
    "session_reset": "messages from the peer stopped authenticating under every session held: a new handshake started",
    "state_rollback": "this node's keystore was older than its last durable state: sessions dropped and restarted",
    "stale_init": "a session start older than the live session arrived (delayed or held back): refused",
    "revoked": "the CA revoked this node's own certificate: the relay refuses it, and it cannot send",
    "replay_refused": "a message arrived a second time and was refused",
    "peer_flooding": "a peer sent too many refused frames: its frames are dropped unread for a while",
    "frame_refused": "a message for a session that was closed was refused",
    "malformed_message": "a message authenticated but its content could not be read",
    "send_refused": "the relay refused a message this node sent",
    "renewal_failed": "this node's certificate could not be renewed (it is tried again)",
    "crl_refused": "a revocation list from the relay was refused",
    "crl_rollback": "the relay offered an older revocation list than one already held: refused",
    "crl_invalid": "a revocation list did not verify under the CA root: refused",
    "stale_feed": "the newest revocation list is out of date: new sessions are refused until a fresh one comes",
    "no_revocation_data": "no revocation list is held yet: new sessions are refused until one comes",
    "certificate_revoked": "a certificate was refused as revoked",
    "authentication_failed": "a message did not authenticate (tampered, or not for this session): refused",
    "too_many_skipped": "a message claimed to skip too many earlier ones: refused, with bounded work",
    "decode_error": "a frame could not be decoded: refused",
    "unknown_frame_type": "a frame of a type this version does not know: refused",
    "unexpected_frame": "a frame came that the session's state does not accept: refused",
    "handshake_error": "a session start was malformed or inconsistent (a bad bundle or initial message): refused",
    "replay_cache_quota": "a peer sent more session starts without a one-time prekey than its share: refused",
    "unknown_prekey": "a session start named a prekey this node does not hold: refused",
    "replayed_initial_message": "a session start was replayed: refused",
    "bad_signature": "a signature did not verify: refused",
    "suite_error": "a session start asked for a suite that is not accepted here (a downgrade?): refused",
    "weak_key": "a session start used a weak key: refused",
    "untrusted_issuer": "a certificate was not issued by the pinned CA: refused",
    "certificate_expired": "a certificate was past its validity: refused",
    "certificate_not_yet_valid": "a certificate was not valid yet: refused",
    "certificate_constraint_error": "a certificate's key usage or constraints were wrong: refused",
    "name_mismatch": "a certificate named another node than expected: refused",
    "ocsp_error": "an OCSP answer did not verify or did not answer the question: refused",
}


def iso(seconds: float) -> str:
    """Seconds since the epoch as ISO 8601 in UTC, to the millisecond: `2026-12-01T17:19:15.462Z`."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Message:
    """A decrypted, authenticated message from a peer."""

    id: str
    sender: str
    text: str
    sent_at: float  # seconds since the epoch, as the sender's clock said (inside the encryption)

    def to_json(self) -> dict[str, Any]:
        """The `receive --json` shape."""
        return {"type": "message", "id": self.id, "from": self.sender, "text": self.text, "sent_at": iso(self.sent_at)}

    def __repr__(self) -> str:
        return f"Message(id={self.id[:8]}, from={self.sender!r}, {len(self.text)} chars)"


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """Something a check refused or noticed: a tampered, replayed, revoked or stale input, a new session.

    `event` is one of EVENTS; `reason` is a sentence for people; `error` the code of the check
    that refused (`bad_signature`, see node.errors.code_of); `safety_number` is set on
    `session_established` and `identity_changed`.
    """

    event: str
    peer: str | None
    reason: str
    error: str | None = None
    safety_number: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The `receive --json` shape (`error` and `safety_number` only when set)."""
        record: dict[str, Any] = {"type": "event", "event": self.event, "peer": self.peer, "reason": self.reason}
        if self.error is not None:
            record["error"] = self.error
        if self.safety_number is not None:
            record["safety_number"] = self.safety_number
        return record


Delivered = Message | SecurityEvent
