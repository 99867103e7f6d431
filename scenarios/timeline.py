"""What happened in a scenario, as frozen events: the one record that the terminal, `--json` and the
HTML report all render.

A scenario's harness and attacker append `Event`s to a `Timeline` as things happen (a node sent,
the relay saw, the attacker tampered, a node accepted or refused and why); the scenario then
states its asserted outcomes as `Check`s, and the runner closes the timeline with a `Verdict`.
Events marked `detail` are the bulk (every frame of a 100-message conversation): they stream in
`--json` and `--verbose`, while the story-level ones are what a person reads and what the
sequence diagram draws.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    """What an event is; each renderer draws each kind its own way."""

    #: A scene heading: what the scenario does next, in words.
    STORY = "story"
    #: A node handed text to the relay for a peer.
    SEND = "send"
    #: What the relay saw or did as an honest relay would (routing, storing, pushing the feed).
    RELAY = "relay"
    #: Something the attacker did: tamper, drop, replay, substitute, withhold, steal.
    ATTACK = "attack"
    #: A fault that is nobody's attack: a process killed, a machine restarted.
    FAULT = "fault"
    #: A node accepted something: a message delivered to its application, a session, a CRL.
    ACCEPT = "accept"
    #: A node refused something, and why (the defence working).
    REFUSE = "refuse"
    #: Any other security event a node reported (a new session, a revoked peer torn down).
    NOTICE = "notice"
    #: The attacker recovered a plaintext.
    LEAK = "leak"
    #: The attacker tried to read something and could not.
    SAFE = "safe"
    #: One asserted outcome, with what was expected and what happened.
    CHECK = "check"
    #: The scenario's overall result.
    VERDICT = "verdict"


#: Lanes that are not nodes: the relay, the attacker behind it, and the lab itself (the CA, the clock).
RELAY = "relay"
ATTACKER = "attacker"
LAB = "lab"


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened, on one lane (and, for an arrow, towards another)."""

    seq: int
    #: Seconds since the scenario started (wall clock: how long things took).
    t: float
    #: The lab clock at that moment (the time every certificate, CRL and bundle was judged at).
    clock: datetime
    kind: Kind
    actor: str
    text: str
    peer: str | None = None
    detail: bool = False
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The NDJSON shape of `kmsnet scenario run --json`."""
        out: dict[str, Any] = {
            "type": "event",
            "seq": self.seq,
            "t": round(self.t, 4),
            "clock": self.clock.isoformat(),
            "kind": self.kind.value,
            "actor": self.actor,
            "peer": self.peer,
            "text": self.text,
        }
        if self.detail:
            out["detail"] = True
        if self.data:
            out["data"] = dict(self.data)
        return out


@dataclass(frozen=True, slots=True)
class Check:
    """An asserted outcome: `expected` and `actual` in words or numbers, and whether they agree."""

    name: str
    expected: Any
    actual: Any
    ok: bool

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"name": self.name, "expected": self.expected, "actual": self.actual, "ok": self.ok}


@dataclass(frozen=True, slots=True)
class ReadRow:
    """One message in a compromise scenario's table: could the attacker read it, and why (not)."""

    index: int
    sender: str
    recipient: str
    text: str
    phase: str
    readable: bool
    why: str

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "index": self.index,
            "from": self.sender,
            "to": self.recipient,
            "text": self.text,
            "phase": self.phase,
            "readable": self.readable,
            "why": self.why,
        }


Sink = Callable[[Event], None]


class Timeline:
    """The ordered events of one scenario run; every appended event also goes to the `sinks`."""

    def __init__(self, clock: Callable[[], datetime], sinks: tuple[Sink, ...] = ()) -> None:
        self._clock = clock
        self._sinks = sinks
        self._start = time.monotonic()
        self.events: list[Event] = []
        self.checks: list[Check] = []
        #: Per-message readability, for the scenarios about stolen or broken keys.
        self.table: list[ReadRow] = []
        #: Figures a scenario measured (counts, milliseconds), reported with the verdict.
        self.figures: dict[str, Any] = {}

    def now(self) -> datetime:
        """The lab clock's current time."""
        return self._clock()

    @property
    def elapsed(self) -> float:
        """Seconds since the timeline was opened."""
        return time.monotonic() - self._start

    def add(
        self,
        kind: Kind,
        actor: str,
        text: str,
        *,
        peer: str | None = None,
        detail: bool = False,
        **data: Any,
    ) -> Event:
        """Record an event now (and stream it)."""
        event = Event(len(self.events), self.elapsed, self._clock(), kind, actor, text, peer, detail, data)
        self.events.append(event)
        for sink in self._sinks:
            sink(event)
        return event

    def story(self, text: str) -> Event:
        """A scene heading."""
        return self.add(Kind.STORY, LAB, text)

    def check(self, name: str, expected: Any, actual: Any, ok: bool | None = None) -> Check:
        """Assert one outcome: `ok` defaults to `expected == actual`. Recorded whatever the result;
        the scenario goes on, so a report shows every check, not just the first that failed."""
        result = Check(name, expected, actual, expected == actual if ok is None else ok)
        self.checks.append(result)
        mark = "ok" if result.ok else "FAILED"
        self.add(
            Kind.CHECK,
            LAB,
            f"{mark}: {name}: expected {in_words(expected)}, got {in_words(actual)}",
            ok=result.ok,
            expected=_plain(expected),
            actual=_plain(actual),
        )
        return result

    def figure(self, name: str, value: Any) -> None:
        """Remember a measured figure for the verdict."""
        self.figures[name] = value


def count(n: int, noun: str) -> str:
    """A number with its noun, singular or plural: `1 message`, `3 messages`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def in_words(value: Any) -> str:
    """A check's operand or a figure in one short line for people: yes/no, none, lists without
    brackets (long ones elided in the middle), never a Python repr."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        if not value:
            return "none"
        if len(value) > 8:
            return f"{', '.join(in_words(v) for v in value[:3])}, … {in_words(value[-1])} ({len(value)} items)"
        return ", ".join(in_words(v) for v in value)
    return str(value)


def _plain(value: Any) -> Any:
    """A JSON-safe rendering of a check's operand."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)
