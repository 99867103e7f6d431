"""The HTML report's structure, as a browser would draw it (checked in headless Chromium at 1400 and
700 px by hand; this test needs no browser): the diagram is drawn at its natural size (it scrolls,
it never shrinks), no text is below 11 px, no label is cut or crosses a lifeline, the safety number
is whole, read or unread is told by a symbol too, and values read as words."""

from __future__ import annotations

import asyncio
import re
from xml.etree import ElementTree

import pytest

from scenarios import registry, runner
from scenarios.report import CHAR, MIN_FONT, NARROW, SAFETY_NUMBER, WIDE, diagram, render
from scenarios.runner import Result
from scenarios.timeline import in_words

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def results() -> list[Result]:
    async def play() -> list[Result]:
        return [await runner.run(registry.get(name)) for name in ("mitm-signed", "session-compromise")]

    return asyncio.run(play())


def svgs(page: str) -> list[ElementTree.Element]:
    return [ElementTree.fromstring(m[0]) for m in re.finditer(r"<svg .*?</svg>", page, re.DOTALL)]


def lines_of(text: ElementTree.Element) -> list[str]:
    return [span.text or "" for span in text.iter(f"{SVG}tspan")] or [text.text or ""]


def test_the_diagram_is_drawn_at_its_natural_size_in_both_layouts(results: list[Result]) -> None:
    page = render(results)
    drawn = svgs(page)
    assert len(drawn) == 2 * len(results)
    for svg in drawn:
        _, _, width, height = svg.get("viewBox", "").split()
        assert svg.get("width") == width and svg.get("height") == height  # never width='100%'
    assert ".svgwrap{overflow-x:auto" in page and "@media (max-width:" in page


def test_no_text_is_smaller_than_11_px(results: list[Result]) -> None:
    page = render(results)
    sizes = [float(s) for s in re.findall(r"font-size[:=]'?(\d+(?:\.\d+)?)(?:px)?", page)]
    assert sizes and min(sizes) >= MIN_FONT


def test_no_label_is_cut_and_the_safety_number_is_whole(results: list[Result]) -> None:
    for result in results:
        numbers = {m[0] for e in result.events for m in SAFETY_NUMBER.finditer(e.text)}
        for layout in (WIDE, NARROW):
            svg = ElementTree.fromstring(diagram(result.events, layout))
            lines = [line for text in svg.iter(f"{SVG}text") for line in lines_of(text)]
            assert not any("…" in line for line in lines)
            for number in numbers:  # on one line, never split over two
                assert any(number in line for line in lines), (layout.name, number)
    assert any(SAFETY_NUMBER.search(e.text) for r in results for e in r.events), "no safety number was drawn"


def test_no_label_crosses_a_lifeline(results: list[Result]) -> None:
    for result in results:
        for layout in (WIDE, NARROW):
            svg = ElementTree.fromstring(diagram(result.events, layout))
            lifelines = [float(line.get("x1", 0)) for line in svg.iter(f"{SVG}line") if line.get("stroke-dasharray")]
            width = float(svg.get("width", 0))
            bands = [
                (float(r.get("y", 0)), float(r.get("y", 0)) + float(r.get("height", 0)))
                for r in svg.iter(f"{SVG}rect")
                if float(r.get("width", 0)) >= width - 8  # a band across the whole diagram hides the lifelines
            ]
            for text in svg.iter(f"{SVG}text"):
                if text.get("text-anchor") == "middle":  # a lane's name, in its box
                    continue
                left, y = float(text.get("x", 0)), float(text.get("y", 0))
                right = left + max(len(line) for line in lines_of(text)) * CHAR
                assert right <= width, (layout.name, lines_of(text))
                crossed = [x for x in lifelines if left <= x <= right]
                on_band = any(top <= y - 6 and y <= bottom for top, bottom in bands)
                assert not crossed or on_band, (layout.name, lines_of(text), crossed)


def test_read_or_unread_carries_a_symbol_and_values_read_as_words(results: list[Result]) -> None:
    page = render(results)
    assert re.search(r"class='cell read[^']*'[^>]*>●43<", page) and re.search(r"class='cell safe'[^>]*>○1<", page)
    assert "● read" in page and "○ safe" in page
    visible = re.sub(r"<[^>]+>", " ", page)
    assert not re.search(r"\b(True|False)\b", visible)
    assert not re.search(r"\b1 [a-z]+s\b", visible.replace("1 s ", "")), re.findall(r"\b1 [a-z]+s\b", visible)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (True, "yes"),
        (False, "no"),
        (None, "none"),
        ([], "none"),
        ((1, 2), "1, 2"),
        (list(range(10)), "0, 1, 2, … 9 (10 items)"),
    ],
)
def test_values_in_words(value: object, words: str) -> None:
    assert in_words(value) == words
