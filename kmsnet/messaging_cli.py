"""`kmsnet send`, `kmsnet receive` and `kmsnet status`: a node's everyday commands."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import click

from kmsnet import logs
from kmsnet.exits import EPILOG, TRUST, CliFailure
from kmsnet.options import Output, StoreOptions, json_option, node_failures, read_input, store_options
from node.keystore import Keystore
from node.node import Node
from protocol.errors import ProtocolError

#: Seconds `receive` waits after the last delivery before deciding the mailbox is empty.
QUIET = 0.5

SEND_EXAMPLES = """
Examples:

\b
  kmsnet send --home alice --to bob 'hello bob'
  echo 'from a pipe' | kmsnet send --home alice --to bob -
  kmsnet send --home alice --to bob --json 'hi'    # {"type": "sent", "id": ..., "to": "bob", "queued": false}
"""

RECEIVE_EXAMPLES = """
Examples:

\b
  kmsnet receive --home bob                        # what is waiting, then exit
  kmsnet receive --home bob --follow               # keep printing until Ctrl-C
  kmsnet receive --home bob --json --timeout 10    # {"type": "message", "id", "from", "text", "sent_at"} per line
"""


def relay_option(command: Any) -> Any:
    """--relay URL: overrides the relay stored at `node init`."""
    return click.option("--relay", "relay_url", help="Relay URL (ws:// or wss://); default: the one from node init.")(
        command
    )


@contextlib.contextmanager
def open_node(store: StoreOptions, relay_url: str | None) -> Iterator[Node]:
    """The node of `store.home`, its keystore unlocked; errors become one-line exits."""
    path = store.home / "keystore.db"
    if not path.exists():
        raise CliFailure(f"no node in {store.home} (run `kmsnet node init` first)")
    with node_failures():
        keystore = Keystore.open(path, passphrase=store.passphrase())
    try:
        with node_failures():
            yield Node(keystore, relay_url=relay_url)
    finally:
        keystore.close()


@contextlib.asynccontextmanager
async def online(node: Node) -> AsyncIterator[Node]:
    """The node connected to its relay (exit 3 if it cannot be reached)."""
    with node_failures():
        await node.start()
    try:
        yield node
    finally:
        await node.stop()


@click.command(epilog=SEND_EXAMPLES + "\n" + EPILOG)
@click.option("--to", "peer", required=True, help="Name of the node to send to.")
@click.argument("text")
@relay_option
@json_option
@store_options
def send(peer: str, text: str, relay_url: str | None, out: Output, store: StoreOptions) -> None:
    """Send TEXT ('-' reads stdin) to node --to, end to end encrypted.

    Returns once the relay has stored the message; if the relay stops answering, the message
    stays in the outbox and goes out with the next send or receive.
    """
    if text == "-":
        text = read_input("-").decode("utf-8", errors="replace")
    logs.configure("WARNING")
    with open_node(store, relay_url) as node:
        msg_id = asyncio.run(_send(node, peer, text))
        queued = node.outbox_size() > 0
    out.emit(
        {"type": "sent", "id": msg_id, "to": peer, "queued": queued},
        f"sent {msg_id} to {peer}" + (" (queued: the relay has not confirmed it yet)" if queued else ""),
    )


async def _send(node: Node, peer: str, text: str) -> str:
    async with online(node):
        with node_failures():
            try:
                return await node.send(peer, text)
            except ProtocolError as exc:
                raise CliFailure(f"cannot start a session with {peer}: {exc}", TRUST) from exc


@click.command(epilog=RECEIVE_EXAMPLES + "\n" + EPILOG)
@click.option("--follow", is_flag=True, help="Keep receiving until interrupted (or --timeout).")
@click.option("--timeout", type=click.FloatRange(min=0), help="Stop after this many seconds.")
@relay_option
@json_option
@store_options
def receive(follow: bool, timeout: float | None, relay_url: str | None, out: Output, store: StoreOptions) -> None:
    """Print messages and security events addressed to this node.

    A refused input (tampered, replayed, revoked, stale) is printed as an event, never as a
    message. Without --follow, exits once the mailbox is empty.
    """
    logs.configure("WARNING")
    # --timeout ends the wait; what arrived until then was printed.
    with open_node(store, relay_url) as node, contextlib.suppress(TimeoutError):
        asyncio.run(_receive(node, follow, timeout, out))


async def _receive(node: Node, follow: bool, timeout: float | None, out: Output) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with online(node), asyncio.timeout(timeout):
        _print_all(node.take_inbox(), out)
        while not stop.is_set():
            getter = asyncio.create_task(node.events.get())
            stopper = asyncio.create_task(stop.wait())
            wait = None if follow else QUIET
            done, _ = await asyncio.wait({getter, stopper}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if getter not in done:
                getter.cancel()
                if not follow and node.idle():
                    break
                continue
            getter.result()
            _print_all(node.take_inbox(), out)
    _print_all(node.take_inbox(), out)


def _print_all(items: list[dict[str, Any]], out: Output) -> None:
    for item in items:
        if item.get("type") == "message":
            text = f"[{item['from']}] {item['text']}"
        else:
            who = f" {item['peer']}" if item.get("peer") else ""
            text = f"! {item['event']}{who}: {item['reason']}"
        out.emit(item, text)


@click.command(epilog=EPILOG)
@relay_option
@json_option
@store_options
def status(relay_url: str | None, out: Output, store: StoreOptions) -> None:
    """Identity, certificate, revocation-feed freshness, sessions and safety numbers (offline)."""
    with open_node(store, relay_url) as node:
        info = node.status()
    feed = info["feed"]
    freshness = (
        "no CRL yet: new sessions fail closed"
        if feed["crl_number"] is None
        else f"CRL #{feed['crl_number']}, next update {feed['next_update']}" + (" (STALE)" if feed["stale"] else "")
    )
    lines = [
        f"node        {info['name']}",
        f"fingerprint {info['fingerprint']}",
        f"certificate serial {info['certificate']['serial']}, valid until {info['certificate']['not_after']}",
        f"relay       {info['relay']}",
        f"feed        {freshness}",
        f"outbox      {info['outbox']} waiting",
    ]
    for s in info["sessions"]:
        state = s["state"] + (f" ({s['closed_reason']})" if s["closed_reason"] else "")
        lines.append(f"session     {s['peer']}: {state}; safety number {s['safety_number']}")
    out.emit(info, "\n".join(lines))

