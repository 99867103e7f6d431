"""`kmsnet history`: the conversations kept in a node's keystore, with each message's delivery state."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import click

from kmsnet import logs
from kmsnet.exits import EPILOG, USAGE, CliFailure
from kmsnet.options import Output, StoreOptions, json_option, node_failures, store_options
from kmsnet.writer import LocalSink, Sink, dispatch, open_node
from node.history import Entry, State
from node.homelock import HomeLock
from node.node import Node

HISTORY_EXAMPLES = """
Examples:

\b
  kmsnet history --home alice                      # one line per conversation
  kmsnet history --home alice --with bob --limit 20
  kmsnet history --home alice --with bob --json    # {"type": "history", "id", "peer", "direction", "state", ...}
  kmsnet history --home alice --retention 30       # keep 30 days from now on (older records go at once)
  kmsnet history --home alice --clear --with bob   # forget the conversation with bob
"""

#: How a delivery state reads after a message we sent (the chat shows the same marks).
MARKS = {
    State.SENDING: "… sending",
    State.STORED: "✓ stored at relay",
    State.DELIVERED: "✓✓ delivered",
    State.FAILED: "✗ failed",
    State.RECEIVED: "",
}


def entry_line(entry: Entry) -> str:
    """One history record as a line for people."""
    stamp = datetime.fromtimestamp(entry.sent_at).strftime("%Y-%m-%d %H:%M")
    if entry.direction == "in":
        return f"{stamp}  {entry.peer}: {entry.text}"
    mark = MARKS[entry.state] + (f": {entry.reason}" if entry.reason else "")
    return f"{stamp}  you → {entry.peer}: {entry.text}  [{mark}]"


async def history_work(node: Node, args: dict[str, Any], sink: Sink) -> None:
    """The work of `kmsnet history`, here or in the process that holds the home (node.control)."""
    history = node.history
    peer, retention = args.get("peer"), args.get("retention")
    if args.get("clear"):
        count = history.clear(peer)
        whose = f"with {peer}" if peer else "with everyone"
        sink.emit({"type": "history_cleared", "peer": peer, "records": count}, f"forgot {count} message(s) {whose}")
        return
    if retention is not None:
        days = None if retention == "forever" else int(retention)
        with node_failures():
            gone = history.set_retention(days)
        said = "until cleared" if days is None else f"{days} day(s)"
        sink.emit(
            {"type": "history_retention", "days": days, "removed": gone},
            f"history kept {said}; {gone} older record(s) removed",
        )
        return
    if peer is None:
        for name in history.peers():
            entries = history.conversation(name)
            last = entries[-1] if entries else None
            record = {"type": "conversation", "peer": name, "messages": len(entries)}
            when = datetime.fromtimestamp(last.sent_at).strftime("%Y-%m-%d %H:%M") if last else "-"
            sink.emit(record, f"{name:<20} {len(entries):>6} message(s), last {when}")
        return
    for entry in history.conversation(peer, args.get("limit")):
        sink.emit(entry.to_json(), entry_line(entry))


def _retention(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None or value == "forever" or (value.isdigit() and int(value) >= 1):
        return value
    raise click.BadParameter("a number of days (1 or more), or 'forever'")


@click.command(epilog=HISTORY_EXAMPLES + "\n" + EPILOG)
@click.option("--with", "peer", metavar="NAME", help="The peer whose conversation to show (or to --clear).")
@click.option("--limit", type=click.IntRange(min=0), help="Only the newest N messages.")
@click.option("--clear", is_flag=True, help="Forget the conversation with --with (without --with: every one).")
@click.option("--retention", callback=_retention, metavar="DAYS|forever", help="Keep messages this many days.")
@json_option
@store_options
def history(
    peer: str | None, limit: int | None, clear: bool, retention: str | None, out: Output, store: StoreOptions
) -> None:
    """Messages sent and received, kept sealed in this node's keystore, with the delivery state of
    each one sent: sending, stored (at the relay), delivered (the peer's node has it), failed (with
    why). Without --with, one line per conversation.

    Forward secrecy protects messages on the wire, not on this device: whoever has the keystore
    and its passphrase reads the history. Set a --retention, or --clear what you do not want kept.
    While another kmsnet process uses this home, it answers.
    """
    if clear and retention is not None:
        raise CliFailure("give --clear or --retention, not both", USAGE)
    if limit is not None and (peer is None or clear):
        raise CliFailure("--limit goes with --with NAME (and not with --clear)", USAGE)
    logs.configure("WARNING")
    args = {"peer": peer, "limit": limit, "clear": clear, "retention": retention}
    writes = clear or retention is not None

    def run_here(lock: HomeLock | None, passphrase: str) -> None:
        with open_node(store, None, passphrase) as node:
            asyncio.run(history_work(node, args, LocalSink(out)))

    dispatch(store, out, "history", args, run_here, read_only=not writes)
