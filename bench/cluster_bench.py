"""Cluster benchmark: two relays sharing one Redis, light clients connected across them.

Everything on this machine: one `redis-server` (appendonly yes, appendfsync always: what
"nothing acknowledged is lost" costs), two `kmsnet relay` processes on it, and in this process
NODES light clients, half on each relay. A light client authenticates like a node (certificate
+ signed challenge) and sends pre-encrypted envelopes (opaque 1 KiB payloads: no end-to-end
crypto on the client side, so the figures are the relays' and Redis's); each sends to a client
on the *other* relay, so every message crosses relays (stored by one, announced through Redis
pub/sub, pushed by the other), and is acknowledged by its recipient.

Figures: memory per idle connection of each relay (RSS growth / connections); light-load
latency (one message at a time, sender to recipient across relays); latency at a paced
PACED_RATE msg/s; then MESSAGES messages with WINDOW in flight per sender (a closed loop: as
fast as it goes): messages per second, latency p50/p99 under that load (mostly queueing: NODES
x WINDOW messages in flight), CPU time per message of each relay process, of redis-server and
of this process (the clients), and Redis commands per message (scripts' inner commands
included). Every message is checked to arrive exactly once.

`python bench/cluster_bench.py [--quick] [--nodes N] [--messages M]` (default 2,000 nodes and
20,000 messages; --quick: 200 and 2,000). Output: a table, then one JSON line per figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from e2e_bench import World, cpu_seconds, process, rss_kib
from redis.asyncio import Redis

from protocol import wire
from protocol.link import Accepted, Ack, Deliver, Error, PublishCrl, Send
from relay.redis_store import key

PAD = b"\x00" * (1024 - 8)
WINDOW = 4
PACED_RATE = 1000
PACED_SECONDS = 3
CONNECT_AT_ONCE = 50


# --- redis-server and the relays ------------------------------------------------------------------


def progress(text: str) -> None:
    print(f"[cluster_bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
         "--appendonly", "yes", "--appendfsync", "always"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(10)


# --- light clients --------------------------------------------------------------------------------


class Client:
    """An authenticated link connection that sends opaque envelopes and acknowledges deliveries."""

    def __init__(self, name: str, ws: object, received: Counter[bytes], latencies: list[float]) -> None:
        self.name = name
        self.ws = ws
        self.received = received
        self.latencies = latencies
        self.accepted: dict[bytes, asyncio.Future[None]] = {}
        self.refused = 0
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:  # type: ignore[attr-defined]
                now = time.perf_counter()
                acks = []
                for frame in wire.decode_link_frames(raw):
                    if isinstance(frame, Deliver):
                        self.received[frame.msg_id] += 1
                        self.latencies.append(now - struct.unpack("d", frame.payload[:8])[0])
                        acks.append(wire.encode_link(Ack(frame.msg_id)))
                    elif isinstance(frame, Accepted):
                        fut = self.accepted.pop(frame.msg_id, None)
                        if fut is not None and not fut.done():
                            fut.set_result(None)
                    elif isinstance(frame, Error) and frame.msg_id is not None:
                        self.refused += 1
                        fut = self.accepted.pop(frame.msg_id, None)
                        if fut is not None and not fut.done():
                            fut.set_exception(RuntimeError(frame.text))
                for message in wire.pack_link_frames(acks):
                    await self.ws.send(message)  # type: ignore[attr-defined]
        except Exception as exc:
            progress(f"client {self.name} stopped reading: {exc!r}")

    async def send(self, to: str) -> bytes:
        """Send one envelope and wait for ACCEPTED (retrying a refusal); its msg_id."""
        msg_id = os.urandom(16)
        while True:
            fut = asyncio.get_running_loop().create_future()
            self.accepted[msg_id] = fut
            payload = struct.pack("d", time.perf_counter()) + PAD
            await self.ws.send(wire.encode_link(Send(msg_id, to, payload)))  # type: ignore[attr-defined]
            try:
                await fut
                return msg_id
            except RuntimeError:
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.ws.close()  # type: ignore[attr-defined]
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else (values[0] if values else 0.0)


async def command_calls(redis: Redis) -> tuple[int, int]:
    """Redis commands run so far (scripts' inner commands included), and EVALs among them."""
    stats = await redis.info("commandstats")
    calls = sum(int(v["calls"]) for v in stats.values())
    evals = int(stats.get("cmdstat_eval", {}).get("calls", 0))
    return calls, evals


@contextlib.asynccontextmanager
async def cluster(tmp: Path) -> AsyncIterator[tuple[list[tuple[asyncio.subprocess.Process, str]], int, int]]:
    """redis-server and two relays on it: the relays (process, URL), Redis's port and pid."""
    with redis_server(tmp) as (redis_proc, port):
        url = f"redis://127.0.0.1:{port}/0"
        async with contextlib.AsyncExitStack() as stack:
            relays = []
            for name in ("relay-a", "relay-b"):
                args = (
                    sys.executable, "-m", "kmsnet", "relay", "--port", "0", "--store", url, "--name", name,
                    "--ca-cert", str(tmp / "ca.pem"), "--rate", "1000000", "--burst", "1000000",
                )  # fmt: skip
                relays.append(await stack.enter_async_context(process(*args, url_from_stdout=True)))
            yield relays, port, redis_proc.pid


async def run(nodes: int, messages: int, samples: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    received: Counter[bytes] = Counter()
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        world = World(tmp)
        async with cluster(tmp) as (relays, port, redis_pid):
            redis = Redis(host="127.0.0.1", port=port)
            ca = await world.raw(relays[0][1], "ca")
            await ca.send(wire.encode_link(PublishCrl(world.crl())))  # type: ignore[attr-defined]
            names = [f"n{i}" for i in range(nodes)]
            # The prekey directory, filled through Redis directly (what PUBLISH_BUNDLE would store):
            # a recipient must be known, and bundles are not what this measures.
            pipe = redis.pipeline(transaction=False)
            for name in names:
                pipe.set(key(name, "bundle"), b"bench")
            await pipe.execute()

            await asyncio.sleep(0.5)
            rss_before = [rss_kib(proc.pid) for proc, _ in relays]
            clients: list[Client] = []
            gate = asyncio.Semaphore(CONNECT_AT_ONCE)

            async def join(i: int) -> Client:
                async with gate:
                    ws = await world.raw(relays[i % 2][1], names[i])
                    return Client(names[i], ws, received, latencies)

            progress(f"connecting {nodes} clients")
            started = time.perf_counter()
            clients = list(await asyncio.gather(*(join(i) for i in range(nodes))))
            figures["connect_seconds"] = time.perf_counter() - started
            await asyncio.sleep(1.0)
            for (proc, _), before, label in zip(relays, rss_before, "ab", strict=True):
                figures[f"relay_{label}_rss_kib_per_connection"] = (rss_kib(proc.pid) - before) / (nodes / 2)

            def partner(i: int) -> str:
                return names[(i + 1) % nodes]  # n0 on relay A sends to n1 on relay B, and so on

            # Light load: one message at a time, across relays.
            progress(f"light load: {samples} messages one at a time")
            for _ in range(samples):
                async with asyncio.timeout(30):
                    msg_id = await clients[0].send(partner(0))
                    while not received[msg_id]:
                        await asyncio.sleep(0.0005)
            light = latencies[:]
            figures["light_latency_p50_ms"] = percentile(light, 50) * 1000
            figures["light_latency_p99_ms"] = percentile(light, 99) * 1000
            latencies.clear()

            # Paced: PACED_RATE messages per second offered for PACED_SECONDS, spread over the clients.
            progress(f"paced load: {PACED_RATE} msg/s for {PACED_SECONDS} s")
            sends: list[asyncio.Task[bytes]] = []
            start = time.perf_counter()
            for k in range(PACED_RATE * PACED_SECONDS):
                due = start + k / PACED_RATE
                if (wait := due - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
                i = k % nodes
                sends.append(asyncio.create_task(clients[i].send(partner(i))))
            paced_ids = await asyncio.gather(*sends)
            async with asyncio.timeout(60):
                while not all(received[m] for m in paced_ids):
                    await asyncio.sleep(0.01)
            figures["paced_latency_p50_ms"] = percentile(latencies, 50) * 1000
            figures["paced_latency_p99_ms"] = percentile(latencies, 99) * 1000
            latencies.clear()

            # Load: every client sends its share, WINDOW in flight, to its partner on the other relay.
            per_client = max(1, messages // nodes)
            total = per_client * nodes
            pids = [proc.pid for proc, _ in relays] + [redis_pid, os.getpid()]
            cpu_before = [cpu_seconds(pid) for pid in pids]
            calls_before = await command_calls(redis)
            received.clear()
            sent: list[bytes] = []

            async def sender(i: int) -> None:
                window = asyncio.Semaphore(WINDOW)

                async def one() -> None:
                    async with window:
                        sent.append(await clients[i].send(partner(i)))

                await asyncio.gather(*(one() for _ in range(per_client)))

            progress(f"load: {total} messages, {WINDOW} in flight per sender")
            started = time.perf_counter()

            async def watch() -> None:
                while True:
                    await asyncio.sleep(5)
                    waiting = sum(len(c.accepted) for c in clients)
                    progress(f"sent {len(sent)}, received {sum(received.values())}, awaiting ACCEPTED {waiting}")

            watching = asyncio.create_task(watch())
            await asyncio.gather(*(sender(i) for i in range(nodes)))
            watching.cancel()
            deadline = time.monotonic() + 120
            while sum(received.values()) < total and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - started
            cpu_after = [cpu_seconds(pid) for pid in pids]
            calls_after = await command_calls(redis)
            figures["messages"] = total
            figures["msgs_per_s"] = total / elapsed
            figures["load_latency_p50_ms"] = percentile(latencies, 50) * 1000
            figures["load_latency_p99_ms"] = percentile(latencies, 99) * 1000
            labels = ("relay_a", "relay_b", "redis", "clients")
            for label, spent_before, spent_after in zip(labels, cpu_before, cpu_after, strict=True):
                figures[f"{label}_cpu_us_per_msg"] = (spent_after - spent_before) / total * 1e6
            figures["redis_commands_per_msg"] = (calls_after[0] - calls_before[0]) / total
            figures["redis_evals_per_msg"] = (calls_after[1] - calls_before[1]) / total
            missing = len(set(sent) - set(received))
            duplicated = sum(1 for count in received.values() if count > 1)
            figures["missing"] = missing
            figures["duplicated"] = duplicated
            figures["refusals"] = sum(c.refused for c in clients)
            for client in clients:
                await client.close()
            await ca.close()  # type: ignore[attr-defined]
            await redis.aclose()
    if missing or duplicated:
        raise SystemExit(f"not exactly once: {missing} missing, {duplicated} delivered twice")
    return figures


def unit(name: str) -> str:
    if name.endswith("_ms"):
        return "ms"
    if name.endswith("per_s"):
        return "msg/s"
    if "cpu_us" in name:
        return "us"
    if "kib" in name:
        return "KiB"
    if name.endswith("seconds"):
        return "s"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 nodes, 2,000 messages: a smoke run")
    parser.add_argument("--nodes", type=int, help="connected light clients (default 2,000)")
    parser.add_argument("--messages", type=int, help="messages across relays (default 20,000)")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("cluster_bench: redis-server is not installed (apt-get install redis-server)")
    nodes = args.nodes or (200 if args.quick else 2000)
    messages = args.messages or (2000 if args.quick else 20000)
    # Every client is a socket here and at a relay: allow what the hard limit allows.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    figures = asyncio.run(run(nodes, messages, samples=100 if args.quick else 200))
    print(f"cluster: 2 relays, 1 redis-server (appendfsync always), {nodes} light clients")
    for name, value in figures.items():
        print(f"{name:36} {value:12.2f} {unit(name)}")
    for name, value in figures.items():
        print(json.dumps({"name": f"cluster_{name}", "value": round(value, 3), "unit": unit(name)}))


if __name__ == "__main__":
    main()
