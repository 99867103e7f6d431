"""Helpers and fixtures of tests/cli/test_home_writer.py that other test modules use too."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from node.clock import utcnow as now
from node.homelock import read_holder
from relay.server import Relay
from tests.support.durability import NonceWatch
from tests.support.lab import provision, publish_crl, relay_config
from tests.support.pki import CA

ROOT = Path(__file__).resolve().parent.parent.parent
PASSPHRASE = "test"  # what lab.provision seals the keystores under


UNLOCKED: list[Path] = []  # a directory holding WITHOUT_LOCK as sitecustomize.py, when a test sets it


def env(passphrase: str = PASSPHRASE) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}
    if UNLOCKED:
        base["PYTHONPATH"] = str(UNLOCKED[0])
    return {**base, "KMSNET_PASSPHRASE": passphrase, "KMSNET_ARGON2_PROFILE": "test"}


@dataclass
class Result:
    code: int
    out: str
    err: str


async def kmsnet(*args: str, passphrase: str = PASSPHRASE, timeout: float = 60) -> Result:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kmsnet", *args, cwd=ROOT, env=env(passphrase), start_new_session=True,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


@dataclass
class Follower:
    """A `kmsnet receive --follow --json` process and every JSON line it printed."""

    proc: asyncio.subprocess.Process
    items: list[dict[str, object]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def texts(self, sender: str) -> list[str]:
        return [str(i["text"]) for i in self.items if i.get("type") == "message" and i.get("from") == sender]

    def events(self) -> list[str]:
        return [str(i["event"]) for i in self.items if i.get("type") == "event"]

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        async with asyncio.timeout(30):
            code = await self.proc.wait()
        if self.reader is not None:
            await self.reader
        return code


async def follow(home: Path) -> Follower:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kmsnet", "receive", "--home", str(home), "--follow", "--json",
        cwd=ROOT, env=env(), start_new_session=True,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    follower = Follower(proc)

    async def read() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            follower.items.append(json.loads(line))

    follower.reader = asyncio.create_task(read())
    return follower


async def eventually(check: object, what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def serving_pid(home: Path, timeout: float = 30.0) -> int:
    """The pid of the process that holds `home` once it answers on the control socket."""
    await eventually(lambda: (h := read_holder(home)) is not None and h.serving, f"a writer serving {home}", timeout)
    holder = read_holder(home)
    assert holder is not None
    return holder.pid


class Logins(logging.Handler):
    """Counts the relay's `node_connected` log events, per node: a second writer logs in again."""

    def __init__(self) -> None:
        super().__init__()
        self.count: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "node_connected":
            self.count[record.fields["node"]] += 1  # type: ignore[attr-defined]


@dataclass
class World:
    relay: Relay
    watch: NonceWatch
    alice: Path
    bob: Path
    logins: Logins


@contextlib.asynccontextmanager
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """A relay on 127.0.0.1 (real clock), a fresh CRL on its feed, and homes for alice and bob."""
    watch, logins = NonceWatch(), Logins()
    relay_log = logging.getLogger("kmsnet.relay")
    relay_log.addHandler(logins)
    level = relay_log.level
    relay_log.setLevel(logging.INFO)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(relay_log.setLevel, level)
        stack.callback(relay_log.removeHandler, logins)
        relay = await stack.enter_async_context(Relay(relay_config(CA, tmp_path, clock=now), interceptor=watch))
        homes = await provision_homes(relay, tmp_path)
        yield World(relay, watch, homes[0], homes[1], logins)


async def provision_homes(relay: Relay, tmp_path: Path) -> list[Path]:
    """A fresh CRL on the relay's feed, and homes for alice and bob enrolled now (real clock)."""
    t = now()
    await publish_crl(relay, CA, CA.crl(this_update=t - timedelta(minutes=5), next_update=t + timedelta(days=1)))
    homes = []
    for serial, name in ((0x501, "alice"), (0x502, "bob")):
        who = CA.enrol(name, serial, not_before=t - timedelta(days=1), not_after=t + timedelta(days=30))
        home = tmp_path / name
        provision(CA, who, relay.url, home / "keystore.db").close()
        homes.append(home)
    return homes


async def send(home: Path, to: str, text: str, passphrase: str = PASSPHRASE) -> Result:
    return await kmsnet("send", "--home", str(home), "--to", to, "--json", text, passphrase=passphrase)
