"""The scenarios, by name, in the order of PRODUCT.md's table.

A scenario is a module in `scenarios/cases/` with one `@scenario(...)` coroutine: it gets a
`Context` (its timeline, a temporary directory, the lab clock), builds a `Lab`, plays its story,
and states its outcomes with `ctx.check(...)`. The runner (`scenarios.runner`) does the rest.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.interceptor import Interceptor
from scenarios.lab import Lab, LabClock
from scenarios.timeline import Check, Timeline

#: Names in PRODUCT.md's order (hsm-theft, issue #18, beside identity-compromise); each is a module
#: `scenarios/cases/<name with _>.py`.
ORDER = (
    "mitm-unsigned",
    "mitm-signed",
    "rogue-ca",
    "tamper",
    "replay",
    "reorder-drop",
    "revoked-peer",
    "stale-feed",
    "crl-withholding",
    "feed-rollback",
    "session-compromise",
    "identity-compromise",
    "hsm-theft",
    "harvest-now",
    "downgrade",
    "skip-flood",
    "relay-crash",
    "crossed-inits",
    "stale-init",
    "renewal-revocation",
    "fsync-failure",
    "state-rollback",
    "init-swap",
    "replay-cache-fill",
    "relay-forwarding",
)


@dataclass
class Context:
    """What a scenario gets: where to record, where to keep files, and the lab clock."""

    timeline: Timeline
    workdir: Path
    clock: LabClock
    #: The one-line result the verdict shows (numbers included), set by `conclude`.
    headline: str = ""

    def lab(self, *, interceptor: Interceptor | None = None, relay_process: bool = False) -> Lab:
        """A lab on this scenario's timeline (use with `async with`)."""
        return Lab(self.timeline, self.workdir, self.clock, interceptor=interceptor, relay_process=relay_process)

    def story(self, text: str) -> None:
        """A scene heading on the timeline."""
        self.timeline.story(text)

    def check(self, name: str, expected: Any, actual: Any, ok: bool | None = None) -> Check:
        """Assert one outcome (see `Timeline.check`)."""
        return self.timeline.check(name, expected, actual, ok)

    def figure(self, name: str, value: Any) -> None:
        """A measured figure reported with the verdict."""
        self.timeline.figure(name, value)

    def conclude(self, headline: str) -> None:
        """The verdict's one line, in numbers where they are numbers."""
        self.headline = headline


Play = Callable[[Context], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    """One scripted attack or fault with an asserted outcome."""

    name: str
    #: The attack or fault, in a line.
    attack: str
    #: What must happen (PRODUCT.md's "expected outcome").
    expected: str
    #: A short story: who does what, what the attacker tries, what the defence is.
    story: str
    play: Play


_REGISTERED: dict[str, Scenario] = {}


def scenario(name: str, *, attack: str, expected: str, story: str) -> Callable[[Play], Play]:
    """Register the decorated coroutine as scenario `name`."""

    def register(play: Play) -> Play:
        _REGISTERED[name] = Scenario(name, attack, expected, " ".join(story.split()), play)
        return play

    return register


def all_scenarios() -> list[Scenario]:
    """Every scenario, in PRODUCT.md's order (importing `scenarios/cases/` registers them)."""
    return [get(name) for name in ORDER]


def get(name: str) -> Scenario:
    """The scenario called `name`; KeyError if there is none."""
    if name not in ORDER:
        raise KeyError(name)
    if name not in _REGISTERED:
        importlib.import_module(f"scenarios.cases.{name.replace('-', '_')}")
    return _REGISTERED[name]
