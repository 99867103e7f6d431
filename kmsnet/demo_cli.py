"""`kmsnet demo`: the whole system in one command (`make demo`); kmsnet.demo does the work."""

from __future__ import annotations

from pathlib import Path

import click

from kmsnet.colour import color
from kmsnet.demo import MAX_NODES, MIN_NODES, DemoFailure, DemoOptions, run_demo
from kmsnet.exits import EPILOG, CliFailure
from kmsnet.options import json_flag

EXAMPLES = """
Examples:

\b
  kmsnet demo                            # alice, bob and carol
  kmsnet demo --nodes 10 --no-color
  kmsnet demo --keep ~/kmsnet-demo       # then continue by hand: the commands are printed
"""


@click.command(epilog=EXAMPLES + "\n" + EPILOG)
@click.option(
    "--nodes",
    type=click.IntRange(MIN_NODES, MAX_NODES),
    default=3,
    show_default=True,
    help="How many nodes: alice, bob, carol, then node4, node5, ...",
)
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Build the workspace in DIR (new or empty) and leave it there, with the commands to go on by hand.",
)
@json_flag("Print the transcript as one JSON object per line.")
@click.option("--no-color", is_flag=True, help="No colours (by default a terminal has them, unless NO_COLOR is set).")
def demo(nodes: int, keep: Path | None, as_json: bool, no_color: bool) -> None:
    """Run a CA, a relay and N nodes on 127.0.0.1 and show them at work.

    Every part is a real `kmsnet` process in a temporary workspace: the CA is created and an
    administrator logs in with a TOTP code, the nodes enrol, chat (one of them offline for a
    while, catching up later), the CA revokes that node and its peers refuse it. The transcript
    shows each message and security event as the nodes report it. Every process is stopped at
    the end, also after a failure or Ctrl-C; the workspace is removed unless --keep.
    """
    options = DemoOptions(nodes=nodes, keep=keep, as_json=as_json, color=color(False if no_color else None))
    try:
        run_demo(options)
    except DemoFailure as exc:
        raise CliFailure(f"demo: {exc}", exc.code) from exc
