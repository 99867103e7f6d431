"""Run scenarios: each in a fresh temporary directory, under a deadline, ending in a verdict.

A scenario passes when it stated at least one check and every check held. Anything else fails
it: a failed check, a step that did not happen in time, or an exception (reported in one line;
the run goes on with the next scenario).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import words_of
from scenarios.lab import LabClock
from scenarios.registry import Context, Scenario
from scenarios.timeline import LAB, Check, Event, Kind, ReadRow, Sink, Timeline

log = logging.getLogger("kmsnet.scenarios")

#: Longest a single scenario may run (seconds); `run --all` must stay under a minute in total.
DEADLINE = 45.0


@dataclass(frozen=True)
class Result:
    """A finished scenario: its verdict, checks, measured figures, events and readability table."""

    scenario: Scenario
    passed: bool
    headline: str
    checks: tuple[Check, ...]
    figures: Mapping[str, Any]
    events: tuple[Event, ...]
    table: tuple[ReadRow, ...]
    seconds: float
    error: str | None

    def verdict_json(self) -> dict[str, Any]:
        """The verdict object that ends a scenario's `--json` stream."""
        return {
            "type": "verdict",
            "scenario": self.scenario.name,
            "passed": self.passed,
            "headline": self.headline,
            "seconds": round(self.seconds, 3),
            "checks": [c.to_json() for c in self.checks],
            "figures": dict(self.figures),
            "error": self.error,
        }


async def run(scenario: Scenario, *, sinks: tuple[Sink, ...] = (), deadline: float = DEADLINE) -> Result:
    """Play one scenario and return its result (never raises for a scenario's own failure)."""
    clock = LabClock()
    timeline = Timeline(clock.now, sinks)
    started = time.monotonic()
    error: str | None = None
    log.info("scenario_started", extra={"fields": {"scenario": scenario.name}})
    with tempfile.TemporaryDirectory(prefix=f"kmsnet-{scenario.name}-") as tmp:
        ctx = Context(timeline, Path(tmp), clock)
        try:
            async with asyncio.timeout(deadline):
                await scenario.play(ctx)
        except TimeoutError:
            error = f"did not finish within {deadline:g} s"
        except Exception as exc:  # noqa: BLE001 - a scenario that breaks fails its verdict; the run goes on
            error = f"an unexpected error ({words_of(exc)}): {exc}"
    passed = error is None and bool(timeline.checks) and all(c.ok for c in timeline.checks)
    headline = ctx.headline or scenario.expected
    if error is not None:
        headline = f"the scenario broke off: {error}"
    failed = [c.name for c in timeline.checks if not c.ok]
    verdict = "PASS" if passed else "FAIL"
    detail = f" (failed: {'; '.join(failed)})" if failed else ""
    timeline.add(Kind.VERDICT, LAB, f"{verdict} {scenario.name}: {headline}{detail}", passed=passed)
    seconds = time.monotonic() - started
    log.info("scenario_finished", extra={"fields": {"scenario": scenario.name, "passed": passed, "seconds": seconds}})
    return Result(
        scenario,
        passed,
        headline,
        tuple(timeline.checks),
        dict(timeline.figures),
        tuple(timeline.events),
        tuple(timeline.table),
        seconds,
        error,
    )
