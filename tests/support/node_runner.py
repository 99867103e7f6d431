"""A node in its own process, for crash tests: send numbered messages, one per line of output.

    python tests/support/node_runner.py KEYSTORE RELAY_URL PEER FIRST LAST NOW_ISO

Prints `sending I` before and `sent I` after each send, flushed, so the parent can SIGKILL it at
any point and know which sends had returned.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime

from node.keystore import Keystore
from node.node import Node, NodeOptions


async def main(path: str, relay: str, peer: str, first: int, last: int, now: str) -> None:
    when = datetime.fromisoformat(now)
    store = Keystore.open(path, passphrase="test")
    node = Node(store, relay_url=relay, options=NodeOptions(send_timeout=2.0), clock=lambda: when)
    await node.start()
    for i in range(first, last):
        print(f"sending {i}", flush=True)
        await node.send(peer, f"m{i}")
        print(f"sent {i}", flush=True)
    await node.flush(10)
    await node.stop()
    print("done", flush=True)


if __name__ == "__main__":
    path, relay, peer, first, last, now = sys.argv[1:]
    asyncio.run(main(path, relay, peer, int(first), int(last), now))
