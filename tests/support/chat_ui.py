"""Helpers and fixtures of tests/cli/test_chat_ui.py that other test modules use too."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from textual.pilot import Pilot
from textual.widgets import OptionList, Static

from kmsnet.chat_app import ChatApp

SIZE = (110, 32)


def shown(app: ChatApp, selector: str) -> str:
    """The plain text a Static widget shows."""
    return str(app.query_one(selector, Static).content)


def contacts(app: ChatApp) -> str:
    """The contact list, one contact a line."""
    return "\n".join(str(option.prompt) for option in app.query_one("#contacts", OptionList).options)


async def until(pilot: Pilot[None], ready: Callable[[], bool], what: str, timeout: float = 8.0) -> None:
    """Let the app run until `ready()` holds (network results arrive asynchronously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not ready():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def type_line(pilot: Pilot[None], text: str) -> None:
    """Type `text` into the input line and press Enter."""
    await pilot.press(*text, "enter")
