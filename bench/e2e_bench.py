"""End-to-end benchmark: a bare websockets forwarder against the kmsnet relay with kmsnet nodes.

Same harness shape for both, in the same run: the server in its own process on 127.0.0.1, the
clients in this process. Figures: messages per second with 1 and 50 pairs (1 KiB messages,
WINDOW messages in flight per sender), light-load latency p50/p99 (one message at a time),
and server memory per connected idle client with 1,000 clients (RSS growth / clients).

kmsnet's figures include everything a real message costs: end-to-end encryption, the
relay's durable store (SQLite, synchronous=FULL, grouped commits) and acknowledgements, and
each node committing its ratchet state before sending and after receiving. The relay's
per-connection rate limit (a policy, 1,000 frames/s by default) is raised above the offered
load: the bare forwarder has none, and this measures capacity.

Output: a table, then one JSON line per figure: {"name", "value", "unit", "floor", "ratio"}
where the floor is the bare forwarder's figure. With 50 pairs it also gives the CPU time each
message cost the server process (relay or forwarder, all its threads) and this process (the
nodes or the bare clients): where the time goes. `python bench/e2e_bench.py [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from node.keystore import ARGON2_PROFILES, Keystore
from node.node import Node, NodeOptions
from protocol import certs, revocation, wire
from protocol.identity import IdentityKey
from protocol.link import Auth, Challenge, PublishCrl, Welcome, auth_signed_bytes

PAYLOAD = "x" * 1024
WINDOW = 8
ROOT = Path(__file__).resolve().parent.parent


# --- the bare forwarder (runs in its own process) -------------------------------------------------


async def forwarder_main(port_file: str) -> None:
    """Forward [to, payload] frames to the client registered as `to`. No crypto, no storage."""
    clients: dict[str, ServerConnection] = {}

    async def handler(ws: ServerConnection) -> None:
        name = str(await ws.recv())
        clients[name] = ws
        try:
            async for raw in ws:
                to, payload = msgpack.unpackb(raw)
                peer = clients.get(to)
                if peer is not None:
                    await peer.send(msgpack.packb([name, payload]))
        finally:
            clients.pop(name, None)

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=2**20) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        Path(port_file).write_text(str(port))
        await asyncio.Future()


# --- processes and memory -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@contextlib.asynccontextmanager
async def process(*args: str, url_from_stdout: bool) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if url_from_stdout:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env
        )
        assert proc.stdout is not None
        url = (await proc.stdout.readline()).decode().strip()
    else:
        with tempfile.NamedTemporaryFile(delete=False) as f:
            port_file = f.name
        Path(port_file).write_text("")
        proc = await asyncio.create_subprocess_exec(*args, port_file, env=env)
        while not Path(port_file).read_text():
            await asyncio.sleep(0.05)
        url = f"ws://127.0.0.1:{Path(port_file).read_text()}"
        os.unlink(port_file)
    try:
        yield proc, url
    finally:
        proc.terminate()
        await proc.wait()


# --- the kmsnet world: a CA, enrolled nodes on disk -----------------------------------------------


class World:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.now = datetime.now(UTC)
        self.ca_key = Ed25519PrivateKey.generate()
        self.root = certs.make_root(
            key=self.ca_key, name="bench-ca", serial=1, not_before=self.now - timedelta(days=1),
            not_after=self.now + timedelta(days=30),
        )  # fmt: skip
        (workdir / "ca.pem").write_bytes(certs.certificate_pem(self.root))
        self.serial = 100

    def enrol(self, name: str) -> tuple[IdentityKey, bytes]:
        self.serial += 1
        key = IdentityKey.generate()
        cert = certs.issue(
            ca_key=self.ca_key, ca_cert=self.root, subject_name=name, public_key=key.public, serial=self.serial,
            not_before=self.now - timedelta(hours=1), not_after=self.now + timedelta(days=7),
        )  # fmt: skip
        return key, cert.public_bytes(certs.serialization.Encoding.DER)

    def node(self, name: str, relay_url: str, **options: object) -> Node:
        key, cert = self.enrol(name)
        store = Keystore.open(self.dir / f"{name}.db", passphrase="bench", create=True, argon2=ARGON2_PROFILES["test"])
        with store.transaction():
            store.put("node", "identity", key.private_bytes())
            store.put("node", "certificate", cert)
            store.put("node", "root", certs.certificate_pem(self.root))
            store.put("node", "relay", relay_url.encode())
        settings: dict[str, object] = {"send_timeout": 60, "inbox": False, **options}
        return Node(store, options=NodeOptions(**settings))  # type: ignore[arg-type]

    def crl(self) -> bytes:
        return revocation.issue_crl(
            ca_key=self.ca_key, ca_cert=self.root, number=1, this_update=self.now - timedelta(minutes=1),
            next_update=self.now + timedelta(days=1), revoked=[],
        )  # fmt: skip

    async def raw(self, url: str, name: str) -> object:
        key, cert = self.enrol(name)
        ws = await connect(url, compression=None, max_size=None)
        challenge = wire.decode_link(await ws.recv())  # type: ignore[arg-type]
        assert isinstance(challenge, Challenge)
        await ws.send(wire.encode_link(Auth(cert, key.sign(auth_signed_bytes(challenge.nonce, challenge.relay, url)))))
        assert isinstance(wire.decode_link(await ws.recv()), Welcome)  # type: ignore[arg-type]
        return ws


# --- workloads ------------------------------------------------------------------------------------

Sender = Callable[[int, int], Awaitable[None]]  # (pair, seq) -> sends one message
Receiver = Callable[[int], Awaitable[None]]  # (pair) -> waits for the next message


async def throughput(pairs: int, seconds: float, send: Sender, receive: Receiver) -> tuple[float, int]:
    """Messages per second received within a window of `seconds`, each sender keeping WINDOW
    messages in flight, and how many arrived in all (the window's and those in flight at its end).
    Only what arrives inside the window counts for the rate, and the window is closed by the
    clock, not by the last receiver (which may be waiting for a message that will never come)."""
    received = 0
    total = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def pair_loop(p: int) -> None:
        credits = asyncio.Semaphore(WINDOW)
        sends: set[asyncio.Task[None]] = set()

        async def sender() -> None:
            seq = 0
            while True:
                await credits.acquire()
                seq += 1
                task = asyncio.create_task(send(p, seq))
                sends.add(task)
                task.add_done_callback(sends.discard)

        async def receiver() -> None:
            nonlocal received, total
            while True:
                await receive(p)
                total += 1
                if time.perf_counter() <= deadline:
                    received += 1
                credits.release()

        loops = [asyncio.create_task(sender()), asyncio.create_task(receiver())]
        await asyncio.sleep(deadline - time.perf_counter())
        loops[0].cancel()
        if sends:  # let the sends in flight finish (a kmsnet send waits for the relay's answer)
            await asyncio.wait(set(sends), timeout=seconds + 5)
        loops[1].cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    await asyncio.gather(*(pair_loop(p) for p in range(pairs)))
    return received / seconds, total


async def measure(
    figures: dict[str, float], pairs: int, seconds: float, samples: int, send: Sender, receive: Receiver, server: int
) -> None:
    """With one pair, latency; then messages per second, and (with several pairs) the CPU time each
    message cost the server process and this one."""
    if pairs == 1:
        lat = await latency(samples, send, receive)
        figures["latency_p50_ms"] = statistics.median(lat)
        figures["latency_p99_ms"] = statistics.quantiles(lat, n=100)[98]
    server_before, clients_before = cpu_seconds(server), cpu_seconds(os.getpid())
    figures[f"msgs_per_s_{pairs}_pairs"], total = await throughput(pairs, seconds, send, receive)
    if pairs > 1:
        figures[f"server_cpu_us_per_msg_{pairs}_pairs"] = (cpu_seconds(server) - server_before) / total * 1e6
        figures[f"clients_cpu_us_per_msg_{pairs}_pairs"] = (cpu_seconds(os.getpid()) - clients_before) / total * 1e6


async def latency(samples: int, send: Sender, receive: Receiver) -> list[float]:
    """Milliseconds from the send call to the receiving application having the message, one at a
    time (pair 0). The send runs as its own task: a kmsnet send returns only once the relay has
    stored the message durably, which may be after the recipient already has it."""
    out = []
    for i in range(samples):
        start = time.perf_counter()
        sending = asyncio.create_task(send(0, i))
        await receive(0)
        out.append((time.perf_counter() - start) * 1000)
        await sending
    return out


# --- bare -----------------------------------------------------------------------------------------


async def bare_figures(pairs: int, seconds: float, samples: int, idle: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    async with process(sys.executable, __file__, "--forwarder", url_from_stdout=False) as (proc, url):
        for n in (1, pairs):
            conns = []
            for p in range(n):
                a = await connect(url, compression=None, max_size=None)
                b = await connect(url, compression=None, max_size=None)
                await a.send(f"a{p}")
                await b.send(f"b{p}")
                conns.append((a, b))
            await asyncio.sleep(0.2)

            async def send(p: int, seq: int, conns: list = conns) -> None:  # type: ignore[type-arg]
                await conns[p][0].send(msgpack.packb([f"b{p}", PAYLOAD.encode()]))

            async def receive(p: int, conns: list = conns) -> None:  # type: ignore[type-arg]
                await conns[p][1].recv()

            await measure(figures, n, seconds, samples, send, receive, proc.pid)
            for a, b in conns:
                await a.close()
                await b.close()
        figures["rss_kib_per_idle_client"] = await idle_memory(proc.pid, url, idle, bare=True)
    return figures


async def idle_memory(pid: int, url: str, count: int, *, bare: bool, world: World | None = None) -> float:
    await asyncio.sleep(0.5)
    before = rss_kib(pid)
    conns = []
    for i in range(count):
        if bare:
            ws = await connect(url, compression=None, max_size=None)
            await ws.send(f"idle{i}")
        else:
            assert world is not None
            ws = await world.raw(url, f"idle{i}")  # type: ignore[assignment]
        conns.append(ws)
    await asyncio.sleep(1.0)
    after = rss_kib(pid)
    for ws in conns:
        await ws.close()
    return (after - before) / count


# --- kmsnet ---------------------------------------------------------------------------------------


async def kmsnet_figures(pairs: int, seconds: float, samples: int, idle: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp))
        relay_args = (
            sys.executable, "-m", "kmsnet", "relay", "--port", "0", "--store", str(Path(tmp) / "relay.db"),
            "--ca-cert", str(Path(tmp) / "ca.pem"), "--rate", "1000000", "--burst", "1000000",
        )  # fmt: skip
        async with process(*relay_args, url_from_stdout=True) as (proc, url):
            ca = await world.raw(url, "ca")
            await ca.send(wire.encode_link(PublishCrl(world.crl())))  # type: ignore[attr-defined]
            for n in (1, pairs):
                nodes = [(world.node(f"s{n}-{p}", url), world.node(f"r{n}-{p}", url)) for p in range(n)]
                for a, b in nodes:
                    await a.start()
                    await b.start()
                for p, (a, _) in enumerate(nodes):  # sessions exist before the clock starts
                    await a.send(f"r{n}-{p}", "hello")
                for _, b in nodes:
                    await b.events.get()
                    await b.events.get()

                async def send(p: int, seq: int, nodes: list = nodes, n: int = n) -> None:  # type: ignore[type-arg]
                    await nodes[p][0].send(f"r{n}-{p}", PAYLOAD)

                async def receive(p: int, nodes: list = nodes) -> None:  # type: ignore[type-arg]
                    await nodes[p][1].events.get()

                await measure(figures, n, seconds, samples, send, receive, proc.pid)
                for a, b in nodes:
                    await a.stop()
                    await b.stop()
                    a.keystore.close()
                    b.keystore.close()
            figures["rss_kib_per_idle_client"] = await idle_memory(proc.pid, url, idle, bare=False, world=world)
            await ca.close()  # type: ignore[attr-defined]
    return figures


async def main_async(quick: bool) -> None:
    pairs, seconds, samples, idle = (50, 3.0, 100, 1000) if not quick else (10, 1.0, 30, 100)
    bare = await bare_figures(pairs, seconds, samples, idle)
    ours = await kmsnet_figures(pairs, seconds, samples, idle)
    print(f"{'figure':28} {'kmsnet':>12} {'bare':>12} {'ratio':>7}")
    for name, value in ours.items():
        print(f"{name:28} {value:12.2f} {bare[name]:12.2f} {value / bare[name]:7.2f}")
    for name, value in ours.items():
        unit = "msg/s" if name.startswith("msgs") else "ms" if "latency" in name else "us" if "cpu" in name else "KiB"
        line = {"name": name, "value": round(value, 3), "unit": unit, "floor": round(bare[name], 3)}
        line["ratio"] = round(value / bare[name], 3)
        print(json.dumps(line))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--forwarder":
        asyncio.run(forwarder_main(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 pairs, 1 s, 100 idle clients: a smoke run")
    args = parser.parse_args()
    asyncio.run(main_async(args.quick))


if __name__ == "__main__":
    main()
