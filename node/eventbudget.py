"""How many security events a peer can make a node record (issue #13 part 6).

Every refused frame used to cost one stored security-event record, so an enrolled peer sending
forged frames could grow the victim's keystore without bound. `EventBudget` coalesces them: per
(peer, event) at most `burst` are recorded per `window`; the others are counted, and the next one
recorded says how many were left out. Notices a person must see (a new session, a changed or
revoked identity) are never held back. And the stored inbox holds at most `MAX_STORED_EVENTS`
security events until the application takes them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from node.events import SecurityEvent

#: Events recorded per (peer, event) per window, and the window.
BURST = 5
WINDOW = timedelta(minutes=1)
#: Security events kept in the stored inbox until taken; beyond, they are logged only.
MAX_STORED_EVENTS = 1000
#: Never coalesced: what a person must see each time.
ALWAYS = frozenset(
    {"session_established", "identity_changed", "peer_revoked", "revoked", "renewal_failed", "peer_flooding"}
)


@dataclass
class _Window:
    start: datetime
    recorded: int = 0
    left_out: int = 0


class EventBudget:
    """Decides which security events are recorded, and words the ones that stand for several."""

    def __init__(self, *, burst: int = BURST, window: timedelta = WINDOW) -> None:
        self.burst = burst
        self.window = window
        self._windows: dict[tuple[str | None, str], _Window] = {}
        #: Events left out since the node started, in all and by event name (for tests and the bench).
        self.left_out = 0
        self.left_out_by: dict[str, int] = {}

    def admit(self, event: SecurityEvent, now: datetime) -> SecurityEvent | None:
        """The event to record (`event`, or it saying how many like it were left out), or None."""
        if event.event in ALWAYS:
            return event
        key = (event.peer, event.event)
        current = self._windows.get(key)
        if current is None or now - current.start >= self.window:
            if len(self._windows) >= 4 * MAX_STORED_EVENTS:  # old windows hold nothing back
                self._windows = {k: w for k, w in self._windows.items() if now - w.start < self.window}
            left_out = current.left_out if current is not None else 0
            current = self._windows[key] = _Window(now)
            if left_out:
                event = replace(event, reason=f"{event.reason} (and {left_out} more like it before, not recorded)")
        if current.recorded >= self.burst:
            current.left_out += 1
            self.left_out += 1
            self.left_out_by[event.event] = self.left_out_by.get(event.event, 0) + 1
            return None
        current.recorded += 1
        return event


#: Frames refused from one peer per REFUSAL_WINDOW before its frames are dropped unprocessed.
REFUSALS = 200
REFUSAL_WINDOW = timedelta(minutes=1)
#: How long a peer over its budget has its frames dropped unprocessed.
QUARANTINE = timedelta(minutes=1)


class RefusalBudget:
    """A per-peer budget of refused frames (each may have cost skipped-key derivation before its tag
    check failed): beyond `REFUSALS` a window, that peer's frames are dropped unprocessed for
    `QUARANTINE` (acknowledged, so the relay forgets them), and the node says so once."""

    def __init__(self, *, refusals: int = REFUSALS, window: timedelta = REFUSAL_WINDOW) -> None:
        self.refusals = refusals
        self.window = window
        self._counts: dict[str, _Window] = {}
        self._quarantined: dict[str, datetime] = {}
        #: Frames dropped unprocessed since the node started.
        self.dropped = 0

    def drops(self, peer: str, now: datetime) -> bool:
        """Whether a frame from `peer` is to be dropped unprocessed now (counted)."""
        until = self._quarantined.get(peer)
        if until is None:
            return False
        if now >= until:
            del self._quarantined[peer]
            return False
        self.dropped += 1
        return True

    def refused(self, peer: str, now: datetime) -> bool:
        """Count a refused frame from `peer`; True once it goes over its budget (quarantined from now)."""
        current = self._counts.get(peer)
        if current is None or now - current.start >= self.window:
            if len(self._counts) >= MAX_STORED_EVENTS:  # old windows hold nothing back
                self._counts = {p: w for p, w in self._counts.items() if now - w.start < self.window}
            current = self._counts[peer] = _Window(now)
        current.recorded += 1
        if current.recorded <= self.refusals:
            return False
        del self._counts[peer]
        self._quarantined[peer] = now + QUARANTINE
        return True
