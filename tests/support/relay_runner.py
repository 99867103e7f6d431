"""A relay in its own process, for crash tests (SIGKILL it: its nodes fail over to another relay).

    python tests/support/relay_runner.py STORE

The test CA and the fixed test clock, as `lab.relay_config`; prints its URL once it listens.
"""

from __future__ import annotations

import asyncio
import sys

from relay.server import Relay
from tests.support.lab import relay_config
from tests.support.pki import CA


async def main(store: str) -> None:
    async with Relay(relay_config(CA, store_path=store)) as relay:
        print(relay.url, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
