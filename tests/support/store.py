"""Helpers and fixtures of tests/relay/test_store.py that other test modules use too."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import RedisCluster

from protocol.messages import OneTimePrekey
from relay.redis_store import RedisStore
from relay.store import SqliteStore, Store

BACKENDS = ["sqlite", "redis", "redis-cluster"]
Opener = Callable[..., Store]


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Builds a store of the backend under test (a second one shares the same data)."""
    if request.param == "sqlite":
        return lambda limits=None: SqliteStore(tmp_path / "relay.db", limits)
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")
    return lambda limits=None: RedisStore(url, limits)


@pytest.fixture
async def store(opener: Opener, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    opened = opener()
    await opened.open()
    if isinstance(opened, RedisStore):
        # The URL names one node; the store finds out whether it is a cluster.
        assert isinstance(opened.client, RedisCluster) == request.node.callspec.params["opener"].endswith("cluster")
    yield opened
    await opened.close()


def msg_id() -> bytes:
    return os.urandom(16)


def prekey(key_id: int) -> OneTimePrekey:
    """A one-time prekey value for the store tests (the store keeps it as it is, never checks it)."""
    return OneTimePrekey(key_id, key_id.to_bytes(32, "big"), bytes(64))


async def put(store: Store, m: bytes, sender: str, recipient: str, payload: bytes, at: int = 1000) -> None:
    """Store one envelope and wait until it is durable (QuotaExceeded however the store reports it)."""
    _, durable = store.put_nowait(m, sender, recipient, payload, at)
    await durable
