"""The store on Redis (single server or Redis Cluster), shared by every relay of a cluster.

Layout: every key of one node carries its name as a hash tag, `kmsnet:{alice}:...`, so that on a
Redis Cluster one node's mailbox, prekeys and connection counter live on one shard and each
operation is one atomic script on that shard:

- `kmsnet:{n}:mail`  a Stream: one entry per envelope, kept until the recipient ACKs it
- `kmsnet:{n}:ids`   msg_id -> stream ids (a retransmission is stored once; an ACK finds its entries)
- `kmsnet:{n}:bytes` payload bytes waiting (the quota)
- `kmsnet:{n}:bundle`, `kmsnet:{n}:otpk` the signed bundle and a list of one-time prekeys (LPOP: each once)
- `kmsnet:{n}:gen`   connection counter (the newest connection wins, across relays; `relay.redis_bus`)
- `kmsnet:{n}:identity`, `kmsnet:{n}:epoch` the identity key it last logged in with, and its signed
  rollback epoch of that login (echoed at the next one)
- `kmsnet:{crl}:crl` the newest CRL, replaced only by a higher number (compare-and-set script)

Every write is a Lua script, atomic on its shard; the scripts that store something also announce
it on the node's shard channel `kmsnet:{n}:live` (SPUBLISH, in the same script: nothing is announced
that is not stored, and announcements come in stream order). Writes are grouped into pipelines
(`relay.batching`); a future completes only once Redis answered, which under `appendonly yes` +
`appendfsync always` means the write is on its disk. A sequence number is the stream id as an
integer, `(milliseconds << 64) | counter`, ordered as the stream is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import msgpack
from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster

from protocol.messages import OneTimePrekey
from relay.batching import BatchWriter
from relay.errors import QuotaExceeded, StoreUnavailable, StoreWriteRefused
from relay.store import (
    MAX_ONETIME_STORED,
    Envelope,
    Limits,
    Store,
    TakenBundle,
    pack_onetime,
    share_full,
    unpack_onetime,
)

log = logging.getLogger("kmsnet.relay.redis")

#: What a Redis client raises when the server cannot be reached or answers with an error.
REDIS_ERRORS = (redis_errors.RedisError, OSError)
#: Seconds to wait for Redis to answer one command (or one pipeline).
COMMAND_TIMEOUT = 10.0
#: Commands outside the write pipeline in flight at once (the client's pool holds 100 connections).
READS_AT_ONCE = 32
#: Keys of the cluster-wide CRL feed (one shard).
CRL_KEY = "kmsnet:{crl}:crl"
CRL_CHANNEL = "kmsnet:{crl}:live"
#: Announcement kinds on a node's channel: an envelope stored for it, a newer connection.
NEWS_ENVELOPE = b"E"
NEWS_CONNECTED = b"C"

Client = Redis | RedisCluster


def key(name: str, what: str) -> str:
    """The key (or shard channel) `what` of node `name`, hash-tagged to the node's shard."""
    return f"kmsnet:{{{name}}}:{what}"


def seq_of(stream_id: bytes | str) -> int:
    """A stream id ("ms-counter") as an ordered integer."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, counter = text.partition("-")
    return (int(ms) << 64) | int(counter)


def stream_id(seq: int) -> str:
    """The stream id of a sequence number (`seq_of` reversed)."""
    return f"{seq >> 64}-{seq & ((1 << 64) - 1)}"


def pack_envelope(msg_id: bytes, sender: str, payload: bytes, stored_at: int) -> bytes:
    """An envelope as stored in its stream entry and announced: msgpack [msg_id, sender, payload, stored_at]."""
    return msgpack.packb([msg_id, sender, payload, stored_at])


def unpack_envelope(seq: int, recipient: str, blob: bytes) -> Envelope:
    """`pack_envelope` reversed."""
    msg_id, sender, payload, stored_at = msgpack.unpackb(blob)
    return Envelope(seq, msg_id, sender, recipient, payload, stored_at)


# Shared by the mailbox scripts. A mailbox's `ids` hash maps a msg_id to the stream ids stored
# under it, space-separated: one, unless two senders used the same msg_id (as SQLite, the store
# keeps one envelope per (sender, msg_id), and an ACK of a msg_id deletes all of them).
_MAILBOX = """
local function field(entry, name)
  for i = 1, #entry[2], 2 do
    if entry[2][i] == name then return entry[2][i + 1] end
  end
end

local function remove(mail, ids, bytes, shares, id, msg_id)
  local entry = redis.call('XRANGE', mail, id, id)[1]
  if not entry then return 0 end
  redis.call('XDEL', mail, id)
  local sender = field(entry, 's')
  if redis.call('HINCRBY', shares, 'c:' .. sender, -1) <= 0 then
    redis.call('HDEL', shares, 'c:' .. sender, 'b:' .. sender)
  else
    redis.call('HINCRBY', shares, 'b:' .. sender, -tonumber(field(entry, 'n')))
  end
  local left = {}
  for other in string.gmatch(redis.call('HGET', ids, msg_id) or '', '%S+') do
    if other ~= id then left[#left + 1] = other end
  end
  if #left == 0 then redis.call('HDEL', ids, msg_id) else redis.call('HSET', ids, msg_id, table.concat(left, ' ')) end
  if redis.call('DECRBY', bytes, tonumber(field(entry, 'n'))) <= 0 then redis.call('DEL', bytes) end
  return 1
end
"""

# KEYS: mail, ids, bytes, shares. ARGV: msg_id, envelope, payload size, stored_at, max count, max
# bytes, channel, sender, max count and max bytes per sender. Returns [0, id] for a retransmission,
# [1, id] once stored, [-1] / [-2] over the count / bytes quota, [-3] / [-4] over the sender's share.
_PUT = (
    _MAILBOX
    + """
local held = redis.call('HGET', KEYS[2], ARGV[1])
for id in string.gmatch(held or '', '%S+') do
  local entry = redis.call('XRANGE', KEYS[1], id, id)[1]
  if entry and field(entry, 's') == ARGV[8] then return {0, id} end
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[5]) then return {-1} end
local size = tonumber(redis.call('GET', KEYS[3]) or '0')
if size + tonumber(ARGV[3]) > tonumber(ARGV[6]) then return {-2} end
local share = redis.call('HMGET', KEYS[4], 'c:' .. ARGV[8], 'b:' .. ARGV[8])
if tonumber(share[1] or '0') >= tonumber(ARGV[9]) then return {-3} end
if tonumber(share[2] or '0') + tonumber(ARGV[3]) > tonumber(ARGV[10]) then return {-4} end
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[2], 'n', ARGV[3], 't', ARGV[4], 'm', ARGV[1], 's', ARGV[8])
redis.call('HINCRBY', KEYS[4], 'c:' .. ARGV[8], 1)
redis.call('HINCRBY', KEYS[4], 'b:' .. ARGV[8], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], held and (held .. ' ' .. id) or id)
redis.call('INCRBY', KEYS[3], ARGV[3])
redis.call('SPUBLISH', ARGV[7], 'E' .. id .. ' ' .. ARGV[2])
return {1, id}
"""
)

# KEYS: mail, ids, bytes, shares. ARGV: msg_id. Returns how many envelopes were deleted.
_DELETE = (
    _MAILBOX
    + """
local deleted = 0
for id in string.gmatch(redis.call('HGET', KEYS[2], ARGV[1]) or '', '%S+') do
  deleted = deleted + remove(KEYS[1], KEYS[2], KEYS[3], KEYS[4], id, ARGV[1])
end
return deleted
"""
)

# KEYS: mail, ids, bytes, shares. ARGV: cutoff (ms). Drops the oldest entries stored before the cutoff
# (entries are in arrival order, so it stops at the first younger one); returns how many.
_PURGE = (
    _MAILBOX
    + """
local dropped = 0
while true do
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
  if not first then return dropped end
  if tonumber(field(first, 't')) >= tonumber(ARGV[1]) then return dropped end
  remove(KEYS[1], KEYS[2], KEYS[3], KEYS[4], first[1], field(first, 'm'))
  dropped = dropped + 1
end
"""
)

# KEYS: bundle, otpk. ARGV: bundle, replace (0/1), max kept, prekeys...
# KEYS: identity, otpk. ARGV: identity key. Records it; drops the one-time prekeys if another key was
# recorded. Returns 1 if it dropped some.
_NOTE_IDENTITY = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
if not held then return 0 end
return redis.call('DEL', KEYS[2])
"""

# KEYS: one key. ARGV: its new value. Returns the value it held (or nil): SET … GET, as a script so
# that it goes through the writer like every other write.
_SWAP = """
local held = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
return held
"""

_PUT_BUNDLE = """
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then redis.call('DEL', KEYS[2]) end
if #ARGV > 3 then redis.call('RPUSH', KEYS[2], unpack(ARGV, 4)) end
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
return 1
"""

# KEYS: bundle, otpk. Returns nil, or [bundle, prekey or nil, left]: the prekey is gone for good.
_TAKE_BUNDLE = """
local bundle = redis.call('GET', KEYS[1])
if not bundle then return nil end
local prekey = redis.call('LPOP', KEYS[2])
return {bundle, prekey, redis.call('LLEN', KEYS[2])}
"""

# KEYS: crl. ARGV: number (decimal text), der, channel. Compare-and-set: a lower number is never
# stored. Numbers run to 2**159, beyond Lua's doubles: compared as decimal text (length first).
_PUT_CRL = """
local held = redis.call('HGET', KEYS[1], 'n')
if held and (#held > #ARGV[1] or (#held == #ARGV[1] and held > ARGV[1])) then return 0 end
redis.call('HSET', KEYS[1], 'n', ARGV[1], 'der', ARGV[2])
if held ~= ARGV[1] then redis.call('SPUBLISH', ARGV[3], ARGV[1]) end
return 1
"""

# One write of a group: (script, keys, args), and how to read its answer.
_Write = tuple[str, list[str], list[Any]]


#: Options of every command client (a subscriber waits for news without a read timeout).
CLIENT_OPTIONS: dict[str, Any] = {"socket_timeout": COMMAND_TIMEOUT, "socket_connect_timeout": COMMAND_TIMEOUT}


async def connect(url: str) -> Client:
    """A client for redis://HOST:PORT/DB or rediss://HOST:PORT/DB: a Redis Cluster client when the
    server there is a cluster node (any node of it will do), else a plain one."""
    plain = Redis.from_url(url, **CLIENT_OPTIONS)
    try:
        info = await plain.info("cluster")
    except BaseException:  # closed whatever the failure (even a cancel), then raised as it came
        await plain.aclose()
        raise
    if not info.get("cluster_enabled"):
        return plain
    await plain.aclose()
    parts = urlsplit(url)
    return RedisCluster(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        username=parts.username,
        password=parts.password,
        ssl=parts.scheme == "rediss",
        **CLIENT_OPTIONS,
    )


class RedisStore(Store):
    """Mailboxes as Redis Streams, prekeys as lists, the CRL feed under compare-and-set."""

    def __init__(self, url: str, limits: Limits | None = None) -> None:
        self.url = url
        self.limits = limits or Limits()
        self._client: Client | None = None
        self._writer: BatchWriter[_Write] = BatchWriter(self._commit, "relay-redis-writer")
        # A bundle is never withdrawn: once seen, a name stays routable without asking again.
        self._known: set[str] = set()
        self._reads = asyncio.Semaphore(READS_AT_ONCE)

    @property
    def client(self) -> Client:
        """The Redis client (once open)."""
        if self._client is None:
            raise StoreUnavailable("store is not open")
        return self._client

    async def open(self) -> None:
        try:
            self._client = await connect(self.url)
            durability = await self._durability()
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"cannot reach Redis at {_where(self.url)}: {describe(exc)}") from exc
        log.info("redis_store_opened", extra={"fields": {"url": _where(self.url), **durability}})
        if durability.get("appendfsync") != "always" or durability.get("appendonly") != "yes":
            log.warning("redis_not_fully_durable", extra={"fields": durability})
        self._writer.start()

    async def _durability(self) -> dict[str, str]:
        """appendonly and appendfsync as Redis reports them (empty where CONFIG is not allowed)."""
        settings: dict[str, str] = {}
        for name in ("appendonly", "appendfsync"):
            try:
                answer = await self.client.config_get(name)
            except redis_errors.ResponseError:
                continue  # managed Redis often forbids CONFIG: nothing to report then
            values = answer if isinstance(answer, dict) else {}
            # A cluster client answers per node; one node's answer stands for all (they share a config).
            for value in values.values():
                if isinstance(value, dict):
                    value = next(iter(value.values()), "")
                settings[name] = value.decode() if isinstance(value, bytes) else str(value)
                break
        return settings

    async def close(self) -> None:
        await self._writer.close()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def healthy(self) -> bool:
        try:
            return bool(await self.client.ping())
        except REDIS_ERRORS:
            return False

    async def _commit(self, writes: list[_Write]) -> list[tuple[Any, BaseException | None]]:
        pipe = self.client.pipeline(transaction=False)
        for script, keys, args in writes:
            pipe.eval(script, len(keys), *keys, *args)
        async with asyncio.timeout(COMMAND_TIMEOUT):
            answers = await pipe.execute(raise_on_error=False)
        return [(None, _refusal(a)) if isinstance(a, Exception) else (a, None) for a in answers]

    async def _write(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return await self._writer.queue((script, keys, args))

    async def flush(self) -> None:
        await self._writer.flush()

    def put_nowait(
        self, msg_id: bytes, sender: str, recipient: str, payload: bytes, stored_at: int
    ) -> tuple[Envelope | None, asyncio.Future[None]]:
        blob = pack_envelope(msg_id, sender, payload, stored_at)
        keys = _mailbox_keys(recipient)
        args = [
            msg_id,
            blob,
            len(payload),
            stored_at,
            self.limits.max_pending,
            self.limits.max_pending_bytes,
            key(recipient, "live"),
            sender,
            self.limits.max_pending_per_sender,
            self.limits.max_pending_bytes_per_sender,
        ]

        def settle(answer: list[Any] | None, error: BaseException | None) -> None:
            if error is not None or answer is None:
                return
            if answer[0] == -1:
                raise QuotaExceeded(f"mailbox of {recipient} holds {self.limits.max_pending} envelopes")
            if answer[0] == -2:
                raise QuotaExceeded(f"mailbox of {recipient} is over {self.limits.max_pending_bytes} bytes")
            if answer[0] == -3:
                raise QuotaExceeded(share_full(sender, recipient, f"{self.limits.max_pending_per_sender} envelopes"))
            if answer[0] == -4:
                limit = f"{self.limits.max_pending_bytes_per_sender} bytes"
                raise QuotaExceeded(share_full(sender, recipient, limit))

        return None, self._writer.queue((_PUT, keys, args), settle)

    async def pending(self, recipient: str, after: int = 0, limit: int = 256) -> list[Envelope]:
        start = f"({stream_id(after)}" if after else "-"
        entries = await self.call(lambda: self.client.xrange(key(recipient, "mail"), start, "+", count=limit))
        return [unpack_envelope(seq_of(sid), recipient, fields[b"e"]) for sid, fields in entries]

    def delete_nowait(self, recipient: str, msg_id: bytes) -> asyncio.Future[bool]:
        keys = _mailbox_keys(recipient)
        return self._writer.queue((_DELETE, keys, [msg_id]), lambda n, error: error is None and bool(n))

    async def purge_expired(self, now_ms: int) -> int:
        cutoff = now_ms - int(self.limits.max_age * 1000)
        dropped = 0
        try:
            # Every relay purges: the script is idempotent, and a mailbox is purged by whoever comes first.
            async for mail in self.client.scan_iter(match="kmsnet:{*}:mail", count=1000, _type="stream"):
                name = _name_of(mail)
                keys = _mailbox_keys(name)
                dropped += int(await self.client.eval(_PURGE, len(keys), *keys, cutoff))
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis purge failed: {describe(exc)}") from exc
        return dropped

    async def note_identity(self, name: str, identity: bytes) -> bool:
        return bool(await self._write(_NOTE_IDENTITY, [key(name, "identity"), key(name, "otpk")], [identity]))

    async def swap_epoch(self, name: str, epoch: bytes | None) -> bytes | None:
        if epoch is None:
            held = await self.call(lambda: self.client.get(key(name, "epoch")))
        else:
            held = await self._write(_SWAP, [key(name, "epoch")], [epoch])
        return bytes(held) if held is not None else None

    async def put_bundle(self, name: str, bundle: bytes, onetime: Sequence[OneTimePrekey], replace: bool) -> None:
        keys = [key(name, "bundle"), key(name, "otpk")]
        prekeys = [pack_onetime(prekey) for prekey in onetime]
        await self._write(_PUT_BUNDLE, keys, [bundle, int(replace), MAX_ONETIME_STORED, *prekeys])
        self._known.add(name)

    async def take_bundle(self, name: str) -> TakenBundle | None:
        # A write, atomic on the node's shard: two relays asking at once get two different prekeys.
        answer = await self._write(_TAKE_BUNDLE, [key(name, "bundle"), key(name, "otpk")], [])
        if answer is None:
            return None
        bundle, prekey, left = answer
        return bundle, unpack_onetime(prekey) if prekey is not None else None, int(left)

    async def onetime_left(self, name: str) -> int:
        return int(await self.call(lambda: self.client.llen(key(name, "otpk"))))

    async def known(self, name: str) -> bool:
        if name in self._known:
            return True
        if await self.call(lambda: self.client.exists(key(name, "bundle"))):
            self._known.add(name)
            return True
        return False

    async def put_crl(self, number: int, der: bytes) -> bool:
        return bool(await self._write(_PUT_CRL, [CRL_KEY], [str(number), der, CRL_CHANNEL]))

    async def get_crl(self) -> tuple[int, bytes] | None:
        held = await self.call(lambda: self.client.hmget(CRL_KEY, ["n", "der"]))
        number, der = held
        return None if number is None else (int(number), der)

    async def waiting(self, recipient: str) -> int:
        return int(await self.call(lambda: self.client.xlen(key(recipient, "mail"))))

    async def call(self, command: Callable[[], Awaitable[Any]]) -> Any:
        """Run one command of `client`, at most READS_AT_ONCE at a time (a burst of connecting nodes
        queues here rather than opening a Redis connection each): StoreUnavailable if Redis does not answer."""
        try:
            async with self._reads, asyncio.timeout(COMMAND_TIMEOUT):
                return await command()
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis read failed: {describe(exc)}") from exc


#: How Redis says it answers but will not write: out of memory (maxmemory, noeviction), a read-only
#: replica, or a failed background save that stops writes.
_WRITE_REFUSALS = ("OOM", "READONLY", "MISCONF")


def _refusal(exc: BaseException) -> StoreUnavailable:
    """A write Redis answered with an error: refused for want of room or permission, or failed."""
    words = f"Redis refused a write: {describe(exc)}"
    if isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(_WRITE_REFUSALS):
        return StoreWriteRefused(words)
    return StoreUnavailable(words)


def _mailbox_keys(recipient: str) -> list[str]:
    """KEYS of the mailbox scripts: the stream, the msg_id index, the byte count, the senders' shares."""
    return [key(recipient, "mail"), key(recipient, "ids"), key(recipient, "bytes"), key(recipient, "shares")]


def describe(exc: BaseException) -> str:
    """A failure to talk to Redis in words for a log or a user (no errno, no class name)."""
    if isinstance(exc, redis_errors.AuthenticationError):
        return "authentication refused"
    if isinstance(exc, redis_errors.ResponseError):
        return str(exc)  # the server's own words
    if isinstance(exc, TimeoutError | redis_errors.TimeoutError):
        return "no answer in time"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause).lower():
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    text = str(exc).lower()
    if "name or service" in text or "resolve" in text:
        return "unknown host"
    return "connection failed"


def _name_of(mail_key: bytes | str) -> str:
    text = mail_key.decode() if isinstance(mail_key, bytes) else mail_key
    return text[len("kmsnet:{") : -len("}:mail")]


def _where(url: str) -> str:
    """The URL without its password (for logs and errors)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path}"
