"""The HTML report: one self-contained page (inline CSS and SVG, nothing fetched) that tells each
scenario's story without the terminal: its verdict and checks, a sequence diagram (nodes, relay
and attacker as lanes; refused frames marked), and, where keys were stolen or broken, a
per-message picture of what the attacker could read.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape

from node.clock import utcnow
from scenarios.runner import Result
from scenarios.timeline import ATTACKER, LAB, RELAY, Event, Kind, ReadRow, count, in_words

#: Diagram geometry (pixels). The SVG is drawn at its natural size and scrolls sideways if it must:
#: scaled to fit, its 12 px text would shrink to an unreadable 6 px. A wide screen gets the words in a
#: column right of the lifelines; a narrow one gets them on a band under each arrow.
TOP = 54
LINE = 16  # height of one line of a label
PAD = 10  # space above and below a row
FONT = 12  # every text in the diagram; the page never goes below MIN_FONT
MIN_FONT = 11
CHAR = 7.0  # a generous average width of a 12 px sans-serif character, to wrap labels before they overflow
NARROW_BELOW = 1000  # viewport width (px) under which the page shows the narrow diagram


@dataclass(frozen=True)
class Layout:
    """How a diagram is laid out: lane spacing, and whether the words go beside or under the arrows."""

    left: int
    gap: int
    box: int
    label_width: int  # the column right of every lifeline; 0: the words go on a band under each arrow
    name: str  # prefixes the arrowheads' ids: a page holds both layouts, one of them hidden


WIDE = Layout(left=20, gap=150, box=124, label_width=400, name="w")
NARROW = Layout(left=8, gap=112, box=104, label_width=0, name="n")

#: Read or unread, as a symbol besides the colour (for colour-blind readers and for print).
READ_MARK = "●"
SAFE_MARK = "○"

#: A safety number (eight groups of five digits) is one word for wrapping: never split, never cut.
SAFETY_NUMBER = re.compile(r"\d{5}(?: \d{5}){7}")

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
main{max-width:1280px;margin:0 auto;padding:24px}
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
.cell{min-width:38px;height:24px;padding:0 3px;box-sizing:border-box;border-radius:4px;font-size:11px;
display:flex;align-items:center;justify-content:center;gap:2px}
.cell.read{background:#b91c1c;color:#fff;border:2px solid #b91c1c}
.cell.safe{background:#fff;color:#0f5132;border:2px solid #15803d}
.cell.mark{outline:3px dashed #7c3aed;outline-offset:1px}
.legend .cell{display:inline-flex;margin:0 4px 0 12px;vertical-align:middle}
.svgwrap{overflow-x:auto;border:1px solid #e2e8f0;border-radius:8px;background:#fff}
.svgwrap svg{display:block;max-width:none} .svgwrap.narrow{display:none}
details{margin:8px 0} summary{cursor:pointer;color:#334155}
code{background:#f1f5f9;padding:1px 4px;border-radius:4px}
.index a{color:#1e293b}
"""


# A narrow screen gets the diagram with its words under the arrows, and less padding around it.
CSS += (
    f"@media (max-width:{NARROW_BELOW - 1}px){{.svgwrap.wide{{display:none}} .svgwrap.narrow{{display:block}}"
    " main{padding:12px} section{padding:14px 12px}}"
)


def render(results: Sequence[Result]) -> str:
    """The whole report for these results, as one HTML document."""
    passed = sum(r.passed for r in results)
    when = utcnow().strftime("%Y-%m-%d %H:%M UTC")
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
        f"<td>{escape(in_words(c.expected))}</td><td>{escape(in_words(c.actual))}</td></tr>"
        for c in result.checks
    )
    figures = "".join(f"<tr><td>{escape(k)}</td><td>{escape(in_words(v))}</td></tr>" for k, v in result.figures.items())
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
        + "<h3>Sequence</h3><div class='svgwrap wide'>"
        + diagram(result.events, WIDE)
        + "</div><div class='svgwrap narrow'>"
        + diagram(result.events, NARROW)
        + "</div>"
        + _timeline(result.events)
        + "</section>"
    )


# --- what the attacker could read -----------------------------------------------------------------------


def _readability(rows: Sequence[ReadRow]) -> str:
    if not rows:
        return ""
    # Read or not is told by the fill, a symbol and the words in the table, never by colour alone.
    parts = ["<h3>What the attacker could read</h3><p class='legend'>each square is one message, in order:"
             f"<span class='cell read'>{READ_MARK}</span>read by the attacker"
             f"<span class='cell safe'>{SAFE_MARK}</span>stayed unreadable"
             "<span class='cell safe mark'>&nbsp;</span>first message of a new phase (after the theft)"
             "</p>"]  # fmt: skip
    for phase_group in _groups(rows):
        label = phase_group[0].phase if len({r.phase for r in phase_group}) == 1 else ""
        read = sum(r.readable for r in phase_group)
        cells = []
        for previous, row in zip([None, *phase_group], phase_group, strict=False):
            mark = previous is not None and previous.phase != row.phase
            title = f"#{row.index} {row.sender}→{row.recipient}: {row.text} — {row.why}"
            cells.append(
                f"<div class='cell {'read' if row.readable else 'safe'}{' mark' if mark else ''}' "
                f"title='{escape(title, quote=True)}'>{READ_MARK if row.readable else SAFE_MARK}{row.index}</div>"
            )
        caption = f"{escape(label) + ': ' if label else ''}{read} of {count(len(phase_group), 'message')} read"
        parts.append(f"<p class='meta'><b>{caption}</b></p><div class='grid'>{''.join(cells)}</div>")
    table = "".join(
        f"<tr><td>{r.index}</td><td>{escape(r.sender)}→{escape(r.recipient)}</td><td>{escape(r.text)}</td>"
        f"<td>{escape(r.phase)}</td><td class='{'no' if r.readable else 'ok'}'>"
        f"{f'{READ_MARK} read' if r.readable else f'{SAFE_MARK} safe'}</td>"
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
            bulk = Event(event.seq, event.t, event.clock, Kind.SEND, event.actor, pair, event.peer, True)
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


def diagram(events: Iterable[Event], layout: Layout = WIDE) -> str:
    """The sequence diagram of a scenario, as inline SVG at its natural size.

    Lanes (lifelines), arrows and marks between them; every row's words wrapped (never cut), in a
    column right of the last lifeline (WIDE) or on an opaque band under the arrow (NARROW), so that
    no label ever crosses a lifeline; a story line spans the width on its own band.
    """
    rows = _rows(events)
    lanes = _lanes(rows)
    half = layout.box // 2
    x = {lane: layout.left + half + i * layout.gap for i, lane in enumerate(lanes)}
    lanes_end = layout.left + half + (len(lanes) - 1) * layout.gap + half
    label_x = lanes_end + 40 if layout.label_width else layout.left + 8
    width = max(label_x + layout.label_width + layout.left, lanes_end + layout.left, 320)
    laid: list[tuple[_Row, list[str], int]] = []
    y = TOP
    for row in rows:
        story = row.event.kind is Kind.STORY
        beside = layout.label_width and not story
        lines = _wrap(_label(row), layout.label_width if beside else width - 2 * layout.left - 16)
        laid.append((row, lines, y))
        y += _height(row, lines, layout)
    height = y + PAD
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' width='{width}' height='{height}' "
        f"font-family='system-ui,sans-serif' font-size='{FONT}'>",
        "<defs>",
        *(
            f"<marker id='{layout.name}-{k.value}' markerWidth='9' markerHeight='9' refX='8' refY='4.5' orient='auto'>"
            f"<path d='M0,0 L9,4.5 L0,9 z' fill='{c}'/></marker>"
            for k, c in COLOURS.items()
        ),
        "</defs>",
    ]
    for i, (row, lines, top) in enumerate(laid):
        if i % 2 and row.event.kind is not Kind.STORY:  # zebra rows, so the eye follows a row to its words
            out.append(f"<rect x='0' y='{top}' width='{width}' height='{_height(row, lines, layout)}' fill='#f8fafc'/>")
    for lane, lx in x.items():
        fill = "#fde7d3" if lane == ATTACKER else "#e2e8f0" if lane in (RELAY, "ca") else "#dbeafe"
        out.append(
            f"<line x1='{lx}' y1='{TOP - 8}' x2='{lx}' y2='{height - 6}' stroke='#cbd5e1' stroke-dasharray='4 4'/>"
        )
        out.append(
            f"<rect x='{lx - half}' y='10' width='{layout.box}' height='30' rx='6' fill='{fill}' stroke='#94a3b8'/>"
        )
        out.append(f"<text x='{lx}' y='30' text-anchor='middle' font-weight='700'>{escape(lane)}</text>")
    if layout.label_width:
        out.append(f"<line x1='{label_x - 20}' y1='{TOP - 8}' x2='{label_x - 20}' y2='{height - 6}' stroke='#e2e8f0'/>")
    for i, (row, lines, top) in enumerate(laid):
        band = "#f8fafc" if i % 2 else "#ffffff"
        out.append(_draw(row, lines, top, x, label_x, width, layout, band))
    out.append("</svg>")
    return "".join(out)


def _height(row: _Row, lines: list[str], layout: Layout) -> int:
    """A row's height: its words, plus the arrow's own line when the words go under it."""
    under = not layout.label_width and row.event.kind is not Kind.STORY
    return len(lines) * LINE + 2 * PAD + (ARROW_LINE if under else 0)


ARROW_LINE = 18  # the height an arrow takes when its words go on a band under it


def _label(row: _Row) -> str:
    event = row.event
    if event.detail:  # a run of ordinary messages, too many to draw one by one
        return f"{count(row.count, 'message')} {event.text} (each one in the full timeline)"
    text = event.text + (f" ({count(row.count, 'time')})" if row.count > 1 else "")
    mark = {Kind.ACCEPT: "✓ ", Kind.REFUSE: "✗ "}.get(event.kind, "")
    return mark + text


def _wrap(text: str, pixels: float) -> list[str]:
    """`text` in lines that fit `pixels`, broken at spaces only (a long word or a safety number stays
    whole on its own line): nothing is ever cut off."""
    keep = SAFETY_NUMBER.sub(lambda m: m[0].replace(" ", "\u00a0"), text)
    lines = textwrap.wrap(keep, max(12, int(pixels / CHAR)), break_long_words=False, break_on_hyphens=False)
    return [line.replace("\u00a0", " ") for line in lines] or [""]


def _draw(
    row: _Row, lines: list[str], top: int, x: dict[str, int], label_x: int, width: int, layout: Layout, band: str
) -> str:
    """One row: its arrow or mark at the top, and its words beside it, or on a `band` (colour) under it."""
    event, colour = row.event, COLOURS.get(row.event.kind, "#334155")
    tip = f"<title>{escape(f'{event.t:.2f} s · {_label(row)}')}</title>"
    y = top + PAD + FONT  # the baseline of the arrow's line; the arrow or mark sits on it
    if event.kind is Kind.STORY:
        height = len(lines) * LINE + 2 * PAD - 6
        return (
            f"<g>{tip}<rect x='4' y='{top + 3}' width='{width - 8}' height='{height}' fill='#f1f5f9'/>"
            f"{_text(28 if layout.label_width else label_x, y, lines, colour, italic=True)}</g>"
        )
    bold = event.kind in (Kind.LEAK, Kind.FAULT)
    if layout.label_width:
        words = _text(label_x, y, lines, colour, bold=bold)
    else:  # an opaque band under the arrow hides the lifelines behind the words
        below = y + ARROW_LINE
        words = (
            f"<rect x='4' y='{below - FONT - 2}' width='{width - 8}' height='{len(lines) * LINE + 4}' fill='{band}'/>"
            + _text(label_x, below, lines, colour, bold=bold)
        )
    home = x.get(event.actor, x.get(RELAY, 0))
    marker = f"{layout.name}-{event.kind.value}"
    if event.kind in (Kind.ACCEPT, Kind.REFUSE):
        # A delivery the node took or refused: an arrow from the relay to the node.
        return _arrow(x.get(RELAY, home), home, y, colour, words, tip, marker, dashed=False)
    if event.kind is Kind.SEND and event.peer in x:
        return _arrow(home, x[event.peer], y, colour, words, tip, marker, dashed=False)
    if event.kind is Kind.ATTACK and event.peer in x and event.peer != event.actor:
        return _arrow(home, x[event.peer], y, colour, words, tip, marker, dashed=True)
    return f"<g>{tip}<circle cx='{home}' cy='{y - 4}' r='6' fill='{colour}'/>{words}</g>"


def _text(left: int, y: int, lines: list[str], colour: str, *, italic: bool = False, bold: bool = False) -> str:
    style = (" font-style='italic'" if italic else "") + (" font-weight='700'" if bold else "")
    spans = "".join(
        f"<tspan x='{left}' dy='{0 if i == 0 else LINE}'>{escape(line)}</tspan>" for i, line in enumerate(lines)
    )
    return f"<text x='{left}' y='{y}' fill='{colour}'{style}>{spans}</text>"


def _arrow(x1: int, x2: int, y: int, colour: str, words: str, tip: str, marker: str, *, dashed: bool) -> str:
    dash = " stroke-dasharray='6 4'" if dashed else ""
    if x1 == x2:  # to oneself: a short loop
        line = (
            f"<path d='M{x1},{y - 10} h24 v10 h-20' fill='none' stroke='{colour}' stroke-width='1.6'{dash} "
            f"marker-end='url(#{marker})'/>"
        )
    else:
        line = (
            f"<line x1='{x1}' y1='{y - 4}' x2='{x2}' y2='{y - 4}' stroke='{colour}' stroke-width='1.8'{dash} "
            f"marker-end='url(#{marker})'/>"
        )
    return f"<g>{tip}{line}{words}</g>"


def _timeline(events: Iterable[Event]) -> str:
    lines = "".join(
        f"<tr><td>{e.t:.2f} s</td><td>{escape(e.actor)}</td><td>{escape(e.kind.value)}</td>"
        f"<td>{escape(e.text)}</td></tr>"
        for e in events
        if not e.detail
    )
    return f"<details><summary>the full timeline</summary><table>{lines}</table></details>"
