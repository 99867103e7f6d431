"""The demo's transcript: one line per event, with its time since the start and the lane (node,
relay, ca) it belongs to, coloured per lane; or, with --json, one JSON object per line."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from kmsnet.demo.options import DemoOptions

LANE_COLOURS = ("cyan", "magenta", "yellow", "blue", "green", "bright_cyan", "bright_magenta", "bright_blue")

#: kind → (marker, style): one look per kind of line.
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "info": (" ", {}),
    "send": ("→", {}),
    "message": ("✉", {}),
    "secure": ("◆", {"fg": "green", "bold": True}),
    "alert": ("✖", {"fg": "red", "bold": True}),
    "error": ("!", {"fg": "red"}),
    "note": ("·", {"dim": True}),
}


class Transcript:
    """One line per event, with its time since the start and the lane (node, relay, ca) it belongs
    to; or, with --json, one JSON object per line."""

    def __init__(self, options: DemoOptions, lanes: list[str], *, steps: int) -> None:
        self.as_json = options.as_json
        self.steps = steps
        self.color = options.color
        self.start = time.monotonic()
        self.shown = 0.0
        self.width = max(len(lane) for lane in [*lanes, "relay", "demo"])
        self.colours = {lane: LANE_COLOURS[i % len(LANE_COLOURS)] for i, lane in enumerate(lanes)}

    def elapsed(self, at: float | None = None) -> float:
        """Seconds since the demo started (at monotonic time `at`, default now), never less than the
        last time shown: a line a child printed before the script's own last line is shown after it
        (the transcript is drained between steps), so it takes that line's time, not an earlier one."""
        self.shown = max(self.shown, (time.monotonic() if at is None else at) - self.start)
        return self.shown

    def _echo(self, text: str) -> None:
        click.echo(text, color=self.color)

    def step(self, number: int, title: str) -> None:
        """A progress line: which stage of the demo is starting."""
        if self.as_json:
            self._echo(json.dumps({"t": round(self.elapsed(), 3), "kind": "step", "step": number, "title": title}))
        else:
            self._echo(click.style(f"[{number}/{self.steps}] {title}…", bold=True))

    def line(self, lane: str, kind: str, text: str, *, at: float | None = None, data: Any = None) -> None:
        """One event in `lane`; `data` is the record it came from (shown with --json)."""
        seconds = self.elapsed(at)
        if self.as_json:
            record = {"t": round(seconds, 3), "lane": lane, "kind": kind, "text": text}
            if data is not None:
                record["data"] = data
            self._echo(json.dumps(record))
            return
        marker, style = KINDS[kind]
        stamp = click.style(f"{seconds:7.2f}s", dim=True)
        name = click.style(f"{lane:<{self.width}}", fg=self.colours.get(lane), dim=lane not in self.colours)
        self._echo(f"{stamp}  {name}  {click.style(f'{marker} {text}', **style)}")

    def plain(self, text: str = "", **style: Any) -> None:
        """Text outside the timeline (headline, summary, instructions); a JSON string with --json."""
        if self.as_json:
            if text:
                self._echo(json.dumps({"kind": "text", "text": text}))
        else:
            self._echo(click.style(text, **style) if style else text)
