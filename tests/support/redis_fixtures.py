"""Real Redis servers for the tests: a single `redis-server` and a 3-shard Redis Cluster, each on
127.0.0.1 with free ports and a temporary directory, durable as documented (`appendonly yes`,
`appendfsync always`, no RDB snapshots). Import the fixtures into a test module to use them.

Without `redis-server` the tests that need it are skipped with the reason, except under CI=true,
where they fail: `.ci/run` installs it.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DURABLE = ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]


def require_redis() -> None:
    """Skip (locally) or fail (under CI=true) when redis-server is not installed."""
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        return
    reason = "redis-server is not installed (.ci/run installs it: apt-get install redis-server)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A free port on 127.0.0.1 (for a cluster node, its bus port, +10000, free too)."""
    for _ in range(200):
        port = random.randint(20000, 50000) if cluster else 0
        if port == 0:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                return int(sock.getsockname()[1])
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair")


def redis_cli(port: int, *args: str, timeout: float = 10.0) -> str:
    """Run redis-cli against 127.0.0.1:port; its output."""
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout + done.stderr


class RedisServer:
    """One redis-server process on 127.0.0.1; kill() (SIGKILL) and start() again keep its data dir."""

    def __init__(self, directory: Path, *extra: str, port: int | None = None) -> None:
        self.directory = directory
        self.extra = list(extra)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                *DURABLE,
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while "PONG" not in redis_cli(self.port, "ping", timeout=2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync: only what it had acknowledged under appendfsync always."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.process = None


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """A running single redis-server, stopped afterwards."""
    require_redis()
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def redis_cluster(directory: Path, shards: int = 3) -> Iterator[list[RedisServer]]:
    """A running Redis Cluster of `shards` primaries and no replicas, stopped afterwards."""
    require_redis()
    servers = [
        RedisServer(
            directory / f"shard{i}",
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            "5000",
            port=free_port(cluster=True),
        )
        for i in range(shards)
    ]
    try:
        for server in servers:
            server.start()
        addresses = [f"127.0.0.1:{s.port}" for s in servers]
        created = redis_cli(
            servers[0].port, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes", timeout=60
        )
        if "[OK] All 16384 slots covered" not in created:
            raise RuntimeError(f"redis-cli --cluster create failed: {created[-500:]}")
        deadline = time.monotonic() + 30
        while not all("cluster_state:ok" in redis_cli(s.port, "cluster", "info") for s in servers):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not become ready")
            time.sleep(0.1)
        yield servers
    finally:
        for server in servers:
            server.stop()


def flush_all(*servers: RedisServer) -> None:
    """Empty every server (between tests sharing a session-wide Redis)."""
    for server in servers:
        redis_cli(server.port, "flushall")


@pytest.fixture(scope="session")
def redis_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """One 3-shard Redis Cluster for the whole session."""
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as servers:
        yield servers


@pytest.fixture
def redis_url(redis_single: RedisServer) -> str:
    """The URL of the session's redis-server, emptied for this test."""
    flush_all(redis_single)
    return redis_single.url


@pytest.fixture
def redis_cluster_url(redis_shards: list[RedisServer]) -> str:
    """The URL of one node of the session's Redis Cluster, emptied for this test."""
    flush_all(*redis_shards)
    return redis_shards[0].url
