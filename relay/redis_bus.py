"""The cluster bus on Redis sharded pub/sub (`SSUBSCRIBE`), on a single Redis or a Redis Cluster.

Each node has a shard channel, `kmsnet:{name}:live`, on the shard of its mailbox: the store's
write script announces every envelope there (`E<stream id> <envelope>`) in the same atomic step
as the XADD, and a new connection claims its number there (`C<number>`). A relay subscribes to the
channels of the nodes connected to it, on the node (shard) that owns each channel, one
subscriber connection per shard. When a subscriber connection breaks (Redis restarted), it
reconnects with backoff and jitter, subscribes again, and tells the relay to re-read every
mailbox from the store: announcements made meanwhile are lost, envelopes are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import msgpack
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import PubSub

from relay.cluster import Bus, Listener
from relay.errors import StoreUnavailable
from relay.redis_store import (
    CRL_CHANNEL,
    NEWS_CONNECTED,
    NEWS_ENVELOPE,
    REDIS_ERRORS,
    RedisStore,
    describe,
    key,
    seq_of,
    unpack_envelope,
)

log = logging.getLogger("kmsnet.relay.redis")

#: Seconds to wait for Redis to confirm a subscription.
SUBSCRIBE_TIMEOUT = 10.0
#: Reconnection backoff of a subscriber connection: first delay and cap (seconds).
BACKOFF_START = 0.05
BACKOFF_MAX = 5.0
#: A relay's heartbeat key lives this long (seconds): it announces itself well within it.
HEARTBEAT_TTL = 15

# KEYS: gen. ARGV: channel. A new connection number, announced to every relay listening.
_CLAIM = """
local generation = redis.call('INCR', KEYS[1])
redis.call('SPUBLISH', ARGV[1], 'C' .. generation)
return generation
"""

_LIVE_PREFIX = b"kmsnet:{"
_LIVE_SUFFIX = b"}:live"


class _Shard:
    """This relay's subscriptions on one Redis node, and the task reading them."""

    def __init__(self, client: Redis, on_message: Callable[[bytes, bytes], None], on_resync: Callable[[], None]):
        self.client = client
        self.on_message = on_message
        self.on_resync = on_resync
        self.channels: set[bytes] = set()
        self.confirmed: set[bytes] = set()
        self.waiting: dict[bytes, asyncio.Future[None]] = {}
        self.pubsub: PubSub | None = None
        #: The subscriber connection broke and is not back yet: subscribing now would only wait.
        self.down = False
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name="relay-redis-subscriber")

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe and return once Redis confirmed it (StoreUnavailable if it does not)."""
        if self.down:
            raise StoreUnavailable("Redis is unreachable")
        self.channels.add(channel)
        if channel in self.confirmed:
            return
        fut = self.waiting.get(channel)
        if fut is None:
            fut = self.waiting[channel] = asyncio.get_running_loop().create_future()
            if self.pubsub is not None:
                # If this fails the connection is broken: the reader reconnects and subscribes all.
                with contextlib.suppress(*REDIS_ERRORS):
                    await self.pubsub.ssubscribe(channel)
            self.wake.set()
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await asyncio.shield(fut)
        except TimeoutError as exc:
            self.waiting.pop(channel, None)
            raise StoreUnavailable("Redis did not confirm a subscription") from exc

    async def unsubscribe(self, channel: bytes) -> None:
        self.channels.discard(channel)
        self.confirmed.discard(channel)
        if self.pubsub is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.pubsub.sunsubscribe(channel)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.client.aclose()

    async def _run(self) -> None:
        delay = BACKOFF_START
        reconnected = False
        while True:
            while not self.channels:
                self.wake.clear()
                await self.wake.wait()
            pubsub = self.client.pubsub()
            try:
                self.confirmed.clear()
                unconfirmed = set(self.channels)
                await pubsub.ssubscribe(*unconfirmed)
                # From here on subscribe() sends its own SSUBSCRIBE; those asked for meanwhile are sent now.
                self.pubsub = pubsub
                self.down = False
                if missing := self.channels - unconfirmed:
                    unconfirmed |= missing
                    await pubsub.ssubscribe(*missing)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    kind, channel = message["type"], message["channel"]
                    if kind == "smessage":
                        self.on_message(channel, message["data"])
                    elif kind == "ssubscribe":
                        self._confirm(channel)
                        unconfirmed.discard(channel)
                        if reconnected and not unconfirmed:
                            # Listening again everywhere: what was announced meanwhile is read from the store.
                            reconnected = False
                            delay = BACKOFF_START
                            log.info("redis_subscriber_back", extra={"fields": {"channels": len(self.channels)}})
                            self.on_resync()
            except REDIS_ERRORS as exc:
                log.warning("redis_subscriber_down", extra={"fields": {"reason": describe(exc)}})
            finally:
                self.pubsub = None
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            self.down = reconnected = True
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(BACKOFF_MAX, delay * 2)

    def _confirm(self, channel: bytes) -> None:
        if channel not in self.channels:
            return
        self.confirmed.add(channel)
        fut = self.waiting.pop(channel, None)
        if fut is not None and not fut.done():
            fut.set_result(None)


class RedisBus(Bus):
    """The bus of one relay of a cluster sharing `store`'s Redis."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        #: The relay's name, known once it listens (its first heartbeat).
        self.relay_name = ""
        #: This process among relays that may share a name (its heartbeat key).
        self.instance = os.urandom(6).hex()
        self._listener: Listener | None = None
        self._shards: dict[tuple[str, int], _Shard] = {}
        self._joined: dict[str, int] = {}
        self._newest: dict[str, int] = {}

    async def start(self, listener: Listener) -> None:
        self._listener = listener
        await self._shard(CRL_CHANNEL).subscribe(CRL_CHANNEL.encode())

    async def close(self) -> None:
        shards, self._shards = self._shards, {}
        for shard in shards.values():
            await shard.close()
        with contextlib.suppress(*REDIS_ERRORS, StoreUnavailable):
            await self.store.client.delete(self._heartbeat_key)

    def _shard(self, channel: str) -> _Shard:
        """The subscriber of the Redis node that owns `channel` (the shard of its hash tag)."""
        client = self.store.client
        if isinstance(client, RedisCluster):
            node = client.get_node_from_key(channel)
            if node is None:
                raise StoreUnavailable("the Redis Cluster has no node for a channel (slots not covered)")
            where = (str(node.host), int(node.port))
        else:
            where = ("", 0)
        shard = self._shards.get(where)
        if shard is None:
            if isinstance(client, RedisCluster):
                parts = urlsplit(self.store.url)
                subscriber = Redis(
                    host=where[0],
                    port=where[1],
                    username=parts.username,
                    password=parts.password,
                    ssl=parts.scheme == "rediss",
                    socket_connect_timeout=SUBSCRIBE_TIMEOUT,
                )
            else:
                subscriber = Redis.from_url(self.store.url, socket_connect_timeout=SUBSCRIBE_TIMEOUT)
            shard = self._shards[where] = _Shard(subscriber, self._on_message, self._on_resync)
        return shard

    async def join(self, name: str) -> int:
        channel = key(name, "live")
        self._joined[name] = self._joined.get(name, 0) + 1
        try:
            await self._shard(channel).subscribe(channel.encode())
            claim = self.store.call(lambda: self.store.client.eval(_CLAIM, 1, key(name, "gen"), channel))
            generation = int(await claim)
        except BaseException:
            await self.leave(name)
            raise
        self._newest[name] = max(self._newest.get(name, 0), generation)
        return generation

    async def leave(self, name: str) -> None:
        count = self._joined.get(name, 0) - 1
        if count > 0:
            self._joined[name] = count
            return
        self._joined.pop(name, None)
        self._newest.pop(name, None)
        channel = key(name, "live")
        await self._shard(channel).unsubscribe(channel.encode())

    def newest(self, name: str) -> int:
        return self._newest.get(name, 0)

    @property
    def _heartbeat_key(self) -> str:
        return f"kmsnet:relay:{self.relay_name}:{self.instance}"

    async def heartbeat(self, name: str, url: str, connected: int) -> None:
        self.relay_name = name
        info = msgpack.packb({"name": self.relay_name, "url": url, "connected": connected, "at": int(time.time())})
        await self.store.call(lambda: self.store.client.set(self._heartbeat_key, info, ex=HEARTBEAT_TTL))

    def _on_resync(self) -> None:
        if self._listener is not None:
            self._listener.on_resync()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        listener = self._listener
        if listener is None:
            return
        if channel == CRL_CHANNEL.encode():
            listener.on_crl()
            return
        if not (channel.startswith(_LIVE_PREFIX) and channel.endswith(_LIVE_SUFFIX)):
            return
        name = channel[len(_LIVE_PREFIX) : -len(_LIVE_SUFFIX)].decode()
        kind, body = data[:1], data[1:]
        try:
            if kind == NEWS_ENVELOPE:
                sid, _, blob = body.partition(b" ")
                listener.on_envelope(unpack_envelope(seq_of(sid), name, blob))
            elif kind == NEWS_CONNECTED:
                generation = int(body)
                if generation > self._newest.get(name, 0) and name in self._joined:
                    self._newest[name] = generation
                listener.on_replaced(name, generation)
        except (ValueError, msgpack.UnpackException) as exc:
            # Only relays write there; still, one bad announcement must not stop the others.
            log.warning("redis_bad_announcement", extra={"fields": {"channel": channel.decode(), "error": str(exc)}})
