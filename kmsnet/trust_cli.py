"""`kmsnet trust`: mark a contact verified by its safety number (node/trust.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from kmsnet import logs
from kmsnet.exits import EPILOG, USAGE, CliFailure
from kmsnet.options import Output, StoreOptions, json_option, node_failures, store_options
from kmsnet.writer import LocalSink, Sink, dispatch, open_node
from node.homelock import HomeLock
from node.node import Node
from node.trust import TrustState
from protocol.safety import safety_number

TRUST_EXAMPLES = """
Examples:

\b
  kmsnet trust --home alice bob                                  # bob's state and the safety number
  kmsnet trust --home alice bob --safety-number '12345 67890 ...'  # compared out of band: verified
  kmsnet trust --home alice bob --forget                         # back to unverified
"""


def trust_words(peer: str, state: TrustState) -> str:
    """A peer's trust state in words (the chat says the same)."""
    if state is TrustState.VERIFIED:
        return f"{peer} is verified"
    if state is TrustState.CHANGED:
        return f"{peer}'s identity key CHANGED since you verified it: sending is held until you verify the new one"
    return f"{peer} is not verified (trusted on first use)"


async def trust_work(node: Node, args: dict[str, Any], sink: Sink) -> None:
    """The work of `kmsnet trust`, here or in the process that holds the home (node.control)."""
    peer, number = args["peer"], args.get("number")
    known = record.identity if (record := node.peer(peer)) is not None else None
    with node_failures():
        if args.get("forget"):
            node.trust.forget(peer)
        elif number is not None:
            node.trust.verify(peer, number, known, node.clock())
        held = node.trust.record(peer)
    key = held.held if held is not None and held.held is not None else known
    state = node.trust.state(peer, key)
    shown = safety_number(node.identity.public_bytes, key) if key is not None else None
    record_json = {"type": "trust", "peer": peer, "trust": state.value, "safety_number": shown}
    text = trust_words(peer, state) + (f"; safety number {shown}" if shown else "; no session with it yet")
    sink.emit(record_json, text)


@click.command(epilog=TRUST_EXAMPLES + "\n" + EPILOG)
@click.argument("peer", metavar="NAME")
@click.option("--safety-number", "number", help="The safety number NAME sees: if it is ours, NAME is verified.")
@click.option("--forget", is_flag=True, help="Forget that NAME was verified.")
@json_option
@store_options
def trust(peer: str, number: str | None, forget: bool, out: Output, store: StoreOptions) -> None:
    """Show whether contact NAME is verified, or mark it verified with the safety number you
    compared with NAME out of band (in person, by phone). Once verified, a change of NAME's
    identity key holds every send to NAME (exit 4) until you verify the new safety number.
    A number that does not match exits 4.
    """
    if number is not None and forget:
        raise CliFailure("give --safety-number or --forget, not both", USAGE)
    logs.configure("WARNING")
    args = {"peer": peer, "number": number, "forget": forget}

    def run_here(lock: HomeLock | None, passphrase: str) -> None:
        with open_node(store, None, passphrase) as node:
            asyncio.run(trust_work(node, args, LocalSink(out)))

    dispatch(store, out, "trust", args, run_here, read_only=number is None and not forget)
