"""`kmsnet chat`: the chat UI (kmsnet.chat_app) on a node's home."""

from __future__ import annotations

import contextlib
import logging
import sys

import click

from kmsnet import logs
from kmsnet.exits import EPILOG, USAGE, CliFailure
from kmsnet.messaging_cli import control_handlers, relay_option
from kmsnet.options import StoreOptions, node_failures, store_options
from kmsnet.writer import exclusive, open_node, require_node, serving
from node.homelock import HomeLock
from node.link import check_url
from node.node import Node

# "\b" keeps click from re-wrapping the example lines into one paragraph.
CHAT_EXAMPLES = """
Examples:

\b
  kmsnet chat --home alice                          # then: /msg bob, type, Enter
  kmsnet chat --home alice --relay ws://127.0.0.1:8765
"""


@click.command(epilog=CHAT_EXAMPLES + "\n" + EPILOG)
@relay_option
@store_options
def chat(relay_url: str | None, store: StoreOptions) -> None:
    """Chat in the terminal: contacts with their certificate status, conversations with delivery
    state, banners for security events, /verify NAME for safety numbers, /help for the rest.

    The UI starts even when the relay is down: it shows "offline", keeps retrying, and messages
    wait in the outbox until the relay takes them. While it runs, `kmsnet send|receive|status`
    for the same home from another terminal go through it.
    """
    require_node(store)
    passphrase = store.passphrase()
    with exclusive(store, serves=True) as lock, open_node(store, relay_url, passphrase) as node:
        # A malformed URL is the one relay problem worth refusing before the screen is taken over.
        with node_failures():
            check_url(node.relay_url)
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise CliFailure("kmsnet chat needs a terminal (scripts use send and receive)", USAGE)
        # Textual is imported here, not at the top: it costs every other kmsnet command ~0.3 s to load.
        from kmsnet.chat_app import ChatApp

        _log_into_textual()
        ChatApp(node, serve=lambda node: _answering(node, lock)).run()


def _answering(node: Node, lock: HomeLock) -> contextlib.AbstractAsyncContextManager[None]:
    """The chat shows what arrives itself: another terminal's `receive` prints what the chat took."""
    return serving(node, lock, control_handlers(node, reads_inbox=True))


def _log_into_textual() -> None:
    """While the UI owns the terminal, kmsnet's warnings go to Textual's log (`textual console`):
    a line written to stderr would land in the middle of the screen."""
    logs.configure("WARNING")
    root = logging.getLogger("kmsnet")
    from textual.logging import TextualHandler

    handler = TextualHandler()
    handler.setFormatter(root.handlers[0].formatter)
    root.handlers[:] = [handler]
