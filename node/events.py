"""What a node hands its application: messages and security events (PRODUCT.md, `receive --json`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Message:
    """A decrypted, authenticated message from a peer."""

    id: str
    sender: str
    text: str
    sent_at: float  # seconds since the epoch, as the sender's clock said (inside the encryption)

    def to_json(self) -> dict[str, Any]:
        """The `receive --json` shape."""
        return {"type": "message", "id": self.id, "from": self.sender, "text": self.text, "sent_at": self.sent_at}

    def __repr__(self) -> str:
        return f"Message(id={self.id[:8]}, from={self.sender!r}, {len(self.text)} chars)"


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """Something a check refused or noticed: a tampered, replayed, revoked or stale input, a new session."""

    event: str
    peer: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        """The `receive --json` shape."""
        return {"type": "event", "event": self.event, "peer": self.peer, "reason": self.reason}


Delivered = Message | SecurityEvent
