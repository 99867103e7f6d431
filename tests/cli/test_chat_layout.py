"""The chat UI's layout and words at 120x40, 80x24 and 40x12 (Textual Pilot): the contact list folds
away on a narrow terminal, contacts are chosen from the keyboard, `you:` is not in the error red, the
expiry warning waits for the last third, a typo adds no contact, and a banner never runs ahead of the
status bar and the contact list."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from textual.pilot import Pilot

from kmsnet.chat_app import EXPIRING_FRACTION, NARROW_WIDTH, YOU_STYLE, ChatApp, Line, _render_line
from node.node import Node
from relay.server import Relay
from tests.support.chat_ui import contacts, shown, type_line, until
from tests.support.lab import make_node, next_message, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA, MALLORY

SIZES = [(120, 40), (80, 24), (40, 12)]


@contextlib.asynccontextmanager
async def chat(relay: Relay, size: tuple[int, int]) -> AsyncIterator[tuple[ChatApp, Pilot[None], Node, Node]]:
    """Alice in the UI at `size`; bob and mallory as plain nodes; a fresh CRL on the feed."""
    await publish_crl(relay, CA, CA.crl())
    bob, mallory = make_node(CA, BOB, relay.url), make_node(CA, MALLORY, relay.url)
    app = ChatApp(make_node(CA, ALICE, relay.url))
    async with running(bob), running(mallory), app.run_test(size=size) as pilot:
        online = ("connected", "online")  # a narrow status bar says it in one short word
        await until(pilot, lambda: any(word in shown(app, "#statusbar") for word in online), "alice to connect")
        yield app, pilot, bob, mallory


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_the_layout_fits_the_terminal_and_contacts_switch_from_the_keyboard(
    size: tuple[int, int], tmp_path: Path
) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay, chat(relay, size) as (app, pilot, bob, mallory):
        await type_line(pilot, "/msg bob hi bob")
        await next_message(bob)
        await type_line(pilot, "/msg mallory hi mallory")
        await next_message(mallory)
        narrow = size[0] < NARROW_WIDTH
        listing = app.query_one("#contacts")
        conversation = app.query_one("#conversation")
        assert app.has_class("-narrow") == narrow and listing.display == (not narrow)
        # The conversation keeps most of the width: all of it when the list folds away.
        assert conversation.size.width >= (size[0] - 2 if narrow else size[0] - 32), conversation.size
        assert app.query_one("#statusbar").region.bottom == size[1]  # the status bar is on screen, and fits
        assert len(shown(app, "#statusbar")) <= size[0] - 2, shown(app, "#statusbar")

        # Ctrl+Up/Down switch contacts while the input line keeps the focus.
        assert app.selected == "mallory"
        await pilot.press("ctrl+up")
        assert app.selected == "bob" and "Conversation with bob" in str(conversation.border_title)
        await pilot.press("ctrl+down")
        assert app.selected == "mallory" and app.query_one("#input").has_focus
        await pilot.press("ctrl+down")  # round the list
        assert app.selected == "bob"


async def test_a_typo_adds_no_contact(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay, chat(relay, (80, 24)) as (app, pilot, bob, _):
        await type_line(pilot, "/msg bob hello")
        await next_message(bob)
        await type_line(pilot, "/msg bbo")  # selected, but not a contact until a message goes out
        assert "Conversation with bbo (new)" in str(app.query_one("#conversation").border_title)
        assert "bbo" not in contacts(app)
        await pilot.press("ctrl+down")
        assert app.selected == "bob"
        await type_line(pilot, "/msg zed are you there?")  # a name the relay does not know
        await until(pilot, lambda: "no node named 'zed' has enrolled" in shown(app, "#notice"), "the refusal")
        await until(pilot, lambda: "zed" not in contacts(app), "zed to go")
        assert "zed" not in app.contacts and app.selected == "bob"


async def test_the_expiry_warning_waits_for_the_last_third_of_the_certificates_life(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay, chat(relay, (120, 40)) as (app, _, __, ___):
        status = app.node.status()
        lifetime = app._lifetime()
        last_third = lifetime * EXPIRING_FRACTION
        for left, expiring in [(lifetime * 0.9, False), (lifetime * 0.4, False), (last_third - 60, True)]:
            status["certificate"]["expires_in_seconds"] = int(left)
            assert ("expiring" in str(app._status_line(status))) == expiring, left
        status["certificate"]["expires_in_seconds"] = 0
        assert "certificate EXPIRED" in str(app._status_line(status))


async def test_a_revocation_banner_never_runs_ahead_of_the_status_bar_and_the_contacts(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay, chat(relay, (80, 24)) as (app, pilot, bob, _):
        await type_line(pilot, "/msg bob hello")
        await next_message(bob)
        await publish_crl(relay, CA, CA.crl([BOB.serial], number=2))
        await until(pilot, lambda: "certificate revoked — bob" in shown(app, "#banner"), "the revocation banner")
        # In the same frame as the banner: no wait for the next periodic refresh.
        assert "CRL #2" in shown(app, "#statusbar") and "bob revoked" in contacts(app)


def test_you_is_in_a_calm_colour_and_red_is_for_failures() -> None:
    sent = _render_line("bob", Line("out", "hi", 0.0, "✓ stored at relay"))
    failed = _render_line("bob", Line("out", "hi", 0.0, "✗ not sent: offline"))
    you = next(span for span in sent.spans if sent.plain[span.start : span.end] == "you: ")
    assert you.style == YOU_STYLE and "red" not in str(you.style)
    assert any("red" in str(span.style) for span in failed.spans if "✗" in failed.plain[span.start : span.end])
