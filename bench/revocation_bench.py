"""How long a revocation takes to reach a connected node: from `kmsnet ca revoke` returning to the
node holding the new CRL. Everything runs as a user runs it — `kmsnet ca init/login/token/serve/
revoke`, `kmsnet relay`, `kmsnet node init` as processes — and the watching node in this process.

Output: a table, then one JSON line per figure ({"name", "value", "unit", "floor", "ratio"}; the
floor is the issue's target, 2 s). `python bench/revocation_bench.py [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from ca.admin import code_at, secret_from_uri
from node.keystore import Keystore
from node.node import Node

ROOT = Path(__file__).resolve().parent.parent
TARGET = 2.0
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")},
    "KMSNET_PASSPHRASE": "bench",
    "KMSNET_ARGON2_PROFILE": "test",
    "PYTHONPATH": str(ROOT),
}


async def kmsnet(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kmsnet", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ENV
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"kmsnet {' '.join(args)}: {err.decode().strip()}")
    return out.decode()


async def serving(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kmsnet", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    assert proc.stdout is not None
    return proc, (await proc.stdout.readline()).decode().strip()


async def main_async(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        ca = str(ws / "ca")
        created = json.loads(await kmsnet("ca", "init", "--home", ca, "--json"))
        code = code_at(secret_from_uri(created["admin"]["otpauth"]), datetime.now(UTC))
        await kmsnet("ca", "login", "--home", ca, "--otp", code)
        relay, relay_url = await serving(
            "relay", "--port", "0", "--store", str(ws / "relay.db"), "--ca-cert", str(ws / "ca" / "ca.pem")
        )
        serve, ca_url = await serving("ca", "serve", "--home", ca, "--http", "127.0.0.1:0", "--relay", relay_url)
        names = ["watcher", *(f"target{i}" for i in range(count))]
        try:
            for name in names:
                token = (await kmsnet("ca", "token", "--home", ca, name)).strip()
                await kmsnet("node", "init", name, "--home", str(ws / name), "--ca", ca_url, "--token", token,
                             "--relay", relay_url, "--ca-fingerprint", created["fingerprint"])  # fmt: skip
            watcher = Node(Keystore.open(ws / "watcher" / "keystore.db", passphrase="bench"))
            await watcher.start()
            while watcher.revocation.highest_number is None:
                await asyncio.sleep(0.01)
            latencies = []
            for name in names[1:]:
                before = watcher.revocation.highest_number
                await kmsnet("ca", "revoke", "--home", ca, name, "--reason", "key-compromise")
                returned = time.perf_counter()
                while watcher.revocation.highest_number == before:
                    await asyncio.sleep(0.005)
                latencies.append(time.perf_counter() - returned)
            await watcher.stop()
            watcher.keystore.close()
        finally:
            for proc in (serve, relay):
                proc.terminate()
                await proc.wait()
    figures = {"revocation_to_node_p50_s": statistics.median(latencies), "revocation_to_node_max_s": max(latencies)}
    print(f"{'figure':30} {'seconds':>8} {'target':>7} {'ratio':>6}")
    for name, value in figures.items():
        print(f"{name:30} {value:8.3f} {TARGET:7.1f} {value / TARGET:6.2f}")
    for name, value in figures.items():
        print(json.dumps({"name": name, "value": round(value, 4), "unit": "s", "floor": TARGET,
                          "ratio": round(value / TARGET, 3)}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two revocations instead of five")
    args = parser.parse_args()
    asyncio.run(main_async(2 if args.quick else 5))


if __name__ == "__main__":
    main()
