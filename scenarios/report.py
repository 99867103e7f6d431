"""The HTML report: one self-contained page (inline CSS and SVG, nothing fetched) that tells each
scenario's story without the terminal: its verdict and checks, a sequence diagram (nodes, relay
and attacker as lanes; refused frames marked), and, where keys were stolen or broken, a
per-message picture of what the attacker could read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

from scenarios.runner import Result
from scenarios.timeline import ATTACKER, LAB, RELAY, Event, Kind, ReadRow

#: Diagram geometry (pixels).
LANE_GAP = 190
LEFT = 30
TOP = 54
ROW = 30
CHAR = 6.4  # average width of a 12 px sans-serif character, to cut labels to fit

COLOURS = {
    Kind.SEND: "#1f5fbf",
    Kind.ACCEPT: "#1d8a3a",
    Kind.REFUSE: "#c62828",
    Kind.NOTICE: "#5f6b7a",
    Kind.ATTACK: "#d9730d",
    Kind.LEAK: "#8e0000",
    Kind.FAULT: "#222222",
    Kind.RELAY: "#9aa5b1",
    Kind.STORY: "#334155",
}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1e293b;margin:0;background:#f8fafc}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:21px;margin:0} h3{font-size:15px;margin:18px 0 6px}
section{background:#fff;border:1px solid #e2e8f0;border-radius:10px;padding:20px 22px;margin:22px 0}
.badge{display:inline-block;padding:2px 10px;border-radius:999px;font-weight:700;font-size:13px;
margin-left:10px;vertical-align:2px}
.pass{background:#dcfce7;color:#166534} .fail{background:#fee2e2;color:#991b1b}
.meta{color:#475569;margin:6px 0} .story{max-width:950px}
.verdict{border-left:5px solid #16a34a;background:#f0fdf4;padding:10px 14px;margin:12px 0;font-size:15px}
.verdict.bad{border-color:#dc2626;background:#fef2f2}
table{border-collapse:collapse;margin:6px 0}
td,th{border-bottom:1px solid #e2e8f0;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f1f5f9;font-weight:600} td.ok{color:#166534;font-weight:700} td.no{color:#991b1b;font-weight:700}
.grid{display:flex;flex-wrap:wrap;gap:3px;max-width:1120px;margin:6px 0 4px}
.cell{width:30px;height:24px;border-radius:4px;font-size:11px;display:flex;align-items:center;justify-content:center;color:#fff}
.cell.read{background:#b91c1c} .cell.safe{background:#15803d}
.cell.mark{outline:3px solid #f59e0b;outline-offset:1px}
.legend span{display:inline-block;width:12px;height:12px;border-radius:3px;margin:0 4px -1px 12px}
.svgwrap{overflow-x:auto;border:1px solid #e2e8f0;border-radius:8px;background:#fff}
details{margin:8px 0} summary{cursor:pointer;color:#334155}
code{background:#f1f5f9;padding:1px 4px;border-radius:4px}
.index a{color:#1e293b}
"""


def render(results: Sequence[Result]) -> str:
    """The whole report for these results, as one HTML document."""
    passed = sum(r.passed for r in results)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    index_rows = "".join(
        f"<tr><td><a href='#{escape(r.scenario.name)}'>{escape(r.scenario.name)}</a></td>"
        f"<td class='{'ok' if r.passed else 'no'}'>{'PASS' if r.passed else 'FAIL'}</td>"
        f"<td>{escape(r.headline)}</td><td>{r.seconds:.2f} s</td></tr>"
        for r in results
    )
    index = (
        ""
        if len(results) < 2
        else f"<section class='index'><h3>Scenarios</h3><table><tr><th>scenario</th><th>verdict</th>"
        f"<th>result</th><th>time</th></tr>{index_rows}</table></section>"
    )
    body = "".join(_section(r) for r in results)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>kmsnet attack lab: {passed} of {len(results)} passed</title><style>{CSS}</style></head><body><main>"
        f"<h1>kmsnet attack lab</h1><p class='meta'>{passed} of {len(results)} scenarios passed · {when}</p>"
        f"{index}{body}</main></body></html>"
    )


def _section(result: Result) -> str:
    item = result.scenario
    verdict = "PASS" if result.passed else "FAIL"
    checks = "".join(
        f"<tr><td class='{'ok' if c.ok else 'no'}'>{'✓' if c.ok else '✗'}</td><td>{escape(c.name)}</td>"
        f"<td>{escape(_value(c.expected))}</td><td>{escape(_value(c.actual))}</td></tr>"
        for c in result.checks
    )
    figures = "".join(f"<tr><td>{escape(k)}</td><td>{escape(_value(v))}</td></tr>" for k, v in result.figures.items())
    error = f"<p class='meta'>The scenario broke off: <code>{escape(result.error)}</code></p>" if result.error else ""
    return (
        f"<section id='{escape(item.name)}'><h2>{escape(item.name)}"
        f"<span class='badge {verdict.lower()}'>{verdict}</span></h2>"
        f"<p class='meta'><b>Attack or fault:</b> {escape(item.attack)}. <b>Expected:</b> {escape(item.expected)}.</p>"
        f"<p class='story'>{escape(item.story)}</p>"
        f"<div class='verdict{'' if result.passed else ' bad'}'><b>{verdict}:</b> "
        f"{escape(result.headline)}</div>{error}"
        "<h3>What was asserted</h3><table><tr><th></th><th>check</th><th>expected</th><th>actual</th></tr>"
        f"{checks}</table>"
        + (f"<h3>Measured</h3><table>{figures}</table>" if figures else "")
        + _readability(result.table)
        + "<h3>Sequence</h3><div class='svgwrap'>"
        + diagram(result.events)
        + "</div>"
        + _timeline(result.events)
        + "</section>"
    )


def _value(value: object) -> str:
    if isinstance(value, list | tuple) and len(value) > 8:
        return f"{', '.join(map(str, value[:3]))}, … {value[-1]} ({len(value)} items)"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "none"
    return str(value)


# --- what the attacker could read -----------------------------------------------------------------------


def _readability(rows: Sequence[ReadRow]) -> str:
    if not rows:
        return ""
    parts = ["<h3>What the attacker could read</h3><p class='legend'>each square is one message, in order:"
             "<span style='background:#b91c1c'></span>read by the attacker"
             "<span style='background:#15803d'></span>stayed unreadable"
             "<span style='background:#fff;outline:3px solid #f59e0b'></span>"
             "first message of a new phase (after the theft)</p>"]  # fmt: skip
    for phase_group in _groups(rows):
        label = phase_group[0].phase if len({r.phase for r in phase_group}) == 1 else ""
        read = sum(r.readable for r in phase_group)
        cells = []
        for previous, row in zip([None, *phase_group], phase_group, strict=False):
            mark = previous is not None and previous.phase != row.phase
            title = f"#{row.index} {row.sender}→{row.recipient}: {row.text} — {row.why}"
            cells.append(
                f"<div class='cell {'read' if row.readable else 'safe'}{' mark' if mark else ''}' "
                f"title='{escape(title, quote=True)}'>{row.index}</div>"
            )
        caption = f"{escape(label) + ': ' if label else ''}{read} of {len(phase_group)} read"
        parts.append(f"<p class='meta'><b>{caption}</b></p><div class='grid'>{''.join(cells)}</div>")
    table = "".join(
        f"<tr><td>{r.index}</td><td>{escape(r.sender)}→{escape(r.recipient)}</td><td>{escape(r.text)}</td>"
        f"<td>{escape(r.phase)}</td><td class='{'no' if r.readable else 'ok'}'>{'READ' if r.readable else 'safe'}</td>"
        f"<td>{escape(r.why)}</td></tr>"
        for r in rows
    )
    parts.append(
        "<details><summary>every message, and why the attacker could or could not read it</summary><table>"
        "<tr><th>#</th><th>direction</th><th>text</th><th>when</th><th>attacker</th><th>why</th></tr>"
        f"{table}</table></details>"
    )
    return "".join(parts)


def _groups(rows: Sequence[ReadRow]) -> list[list[ReadRow]]:
    """Rows split where the numbering restarts (one group per recorded session)."""
    groups: list[list[ReadRow]] = []
    for row in rows:
        if not groups or row.index <= groups[-1][-1].index:
            groups.append([])
        groups[-1].append(row)
    return groups


# --- the sequence diagram ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    event: Event
    count: int


def _rows(events: Iterable[Event]) -> list[_Row]:
    """Story-level events, with runs of the same thing (differing only in numbers) folded into one,
    and runs of bulk messages (detail-level sends) shown as one row per pair of nodes."""
    rows: list[_Row] = []
    for event in events:
        if event.detail and event.kind is Kind.SEND and event.peer is not None:
            pair = " ⇄ ".join(sorted((event.actor, event.peer)))
            bulk = Event(event.seq, event.t, event.clock, Kind.SEND, event.actor, f"messages {pair}", event.peer, True)
            if rows and rows[-1].event.detail and rows[-1].event.text == bulk.text:
                rows[-1] = _Row(rows[-1].event, rows[-1].count + 1)
            else:
                rows.append(_Row(bulk, 1))
            continue
        if event.detail or event.kind in (Kind.CHECK, Kind.VERDICT, Kind.RELAY, Kind.SAFE):
            continue
        if rows and event.kind is not Kind.LEAK and _shape(rows[-1].event) == _shape(event):
            rows[-1] = _Row(rows[-1].event, rows[-1].count + 1)
        else:
            rows.append(_Row(event, 1))
    return rows


def _shape(event: Event) -> tuple[str, str, str | None, str]:
    text = re.sub(r"[0-9a-f]{8,}|\d+", "#", event.text)
    return (event.kind.value, event.actor, event.peer, text)


def _lanes(rows: Sequence[_Row]) -> list[str]:
    named: list[str] = []
    for row in rows:
        for who in (row.event.actor, row.event.peer):
            if who and who != LAB and who not in named:
                named.append(who)
    nodes = [n for n in named if n not in (RELAY, ATTACKER, "ca")]
    lanes = nodes[:1] + [RELAY] + ([ATTACKER] if ATTACKER in named else []) + nodes[1:]
    return lanes + (["ca"] if "ca" in named else [])


def diagram(events: Iterable[Event]) -> str:
    """The sequence diagram of a scenario, as inline SVG."""
    rows = _rows(events)
    lanes = _lanes(rows)
    x = {lane: LEFT + 80 + i * LANE_GAP for i, lane in enumerate(lanes)}
    width = max(LEFT + 80 + (len(lanes) - 1) * LANE_GAP + 420, 1060)
    height = TOP + ROW * (len(rows) + 1) + 10
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' width='100%' "
        f"font-family='system-ui,sans-serif' font-size='12'>",
        "<defs>",
        *(
            f"<marker id='a-{k.value}' markerWidth='9' markerHeight='9' refX='8' refY='4.5' orient='auto'>"
            f"<path d='M0,0 L9,4.5 L0,9 z' fill='{c}'/></marker>"
            for k, c in COLOURS.items()
        ),
        "</defs>",
    ]
    for lane, lx in x.items():
        fill = "#fde7d3" if lane == ATTACKER else "#e2e8f0" if lane in (RELAY, "ca") else "#dbeafe"
        out.append(
            f"<line x1='{lx}' y1='{TOP - 8}' x2='{lx}' y2='{height - 6}' stroke='#cbd5e1' stroke-dasharray='4 4'/>"
        )
        out.append(f"<rect x='{lx - 62}' y='10' width='124' height='30' rx='6' fill='{fill}' stroke='#94a3b8'/>")
        out.append(f"<text x='{lx}' y='30' text-anchor='middle' font-weight='700'>{escape(lane)}</text>")
    for i, row in enumerate(rows):
        out.append(_draw(row, TOP + ROW * i + 14, x, width))
    out.append("</svg>")
    return "".join(out)


def _draw(row: _Row, y: int, x: dict[str, int], width: int) -> str:
    event, colour = row.event, COLOURS.get(row.event.kind, "#334155")
    text = event.text + (f"  (×{row.count})" if row.count > 1 else "")
    if event.detail:  # a run of ordinary messages, too many to draw one by one
        text = f"{row.count} {event.text} (each one in the full timeline)"
    tip = f"<title>{escape(f'{event.t:.2f} s · {text}')}</title>"
    if event.kind is Kind.STORY:
        return (
            f"<g>{tip}<rect x='4' y='{y - 13}' width='{width - 8}' height='22' fill='#f1f5f9'/>"
            f"<text x='12' y='{y + 2}' font-style='italic' fill='{colour}'>{escape(_fit(text, width - 30))}</text></g>"
        )
    home = x.get(event.actor, x.get(RELAY, LEFT))
    if event.kind in (Kind.ACCEPT, Kind.REFUSE):
        # A delivery the node took or refused: an arrow from the relay to the node, marked at its end.
        source, target = x.get(RELAY, home), home
        mark = "✓" if event.kind is Kind.ACCEPT else "✗"
        return _arrow(source, target, y, colour, f"{mark} {text}", tip, event.kind, width, dashed=False)
    if event.kind is Kind.SEND and event.peer in x:
        return _arrow(home, x[event.peer], y, colour, text, tip, event.kind, width, dashed=False)
    if event.kind is Kind.ATTACK and event.peer in x and event.peer != event.actor:
        return _arrow(home, x[event.peer], y, colour, text, tip, event.kind, width, dashed=True)
    weight = " font-weight='700'" if event.kind in (Kind.LEAK, Kind.FAULT) else ""
    label = text
    return (
        f"<g>{tip}<circle cx='{home}' cy='{y - 4}' r='6' fill='{colour}'/>"
        f"<text x='{home + 12}' y='{y}' fill='{colour}'{weight}>{escape(_fit(label, width - home - 20))}</text></g>"
    )


def _arrow(x1: int, x2: int, y: int, colour: str, text: str, tip: str, kind: Kind, width: int, *, dashed: bool) -> str:
    dash = " stroke-dasharray='6 4'" if dashed else ""
    if x1 == x2:  # to oneself: a short loop
        line = (
            f"<path d='M{x1},{y - 10} h24 v10 h-20' fill='none' stroke='{colour}' stroke-width='1.6'{dash} "
            f"marker-end='url(#a-{kind.value})'/>"
        )
        start = x1 + 30
    else:
        line = (
            f"<line x1='{x1}' y1='{y - 4}' x2='{x2}' y2='{y - 4}' stroke='{colour}' stroke-width='1.8'{dash} "
            f"marker-end='url(#a-{kind.value})'/>"
        )
        start = min(x1, x2) + 16  # clear of the arrowhead when it points left
    label = escape(_fit(text, width - start - 10))
    return f"<g>{tip}{line}<text x='{start}' y='{y - 9}' fill='{colour}'>{label}</text></g>"


def _fit(text: str, pixels: float) -> str:
    limit = max(12, int(pixels / CHAR))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _timeline(events: Iterable[Event]) -> str:
    lines = "".join(
        f"<tr><td>{e.t:.2f} s</td><td>{escape(e.actor)}</td><td>{escape(e.kind.value)}</td>"
        f"<td>{escape(e.text)}</td></tr>"
        for e in events
        if not e.detail
    )
    return f"<details><summary>the full timeline</summary><table>{lines}</table></details>"
