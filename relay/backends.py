"""Which store a relay uses, from the `--store` setting: a SQLite path or a Redis URL."""

from __future__ import annotations

from relay.store import Limits, SqliteStore, Store

#: URL schemes that name a Redis server (rediss: over TLS).
REDIS_SCHEMES = ("redis://", "rediss://")


def is_redis(location: str) -> bool:
    """Whether `location` is a Redis URL rather than a SQLite path."""
    return location.startswith(REDIS_SCHEMES)


def make_store(location: str, limits: Limits) -> Store:
    """A SQLite store for a path (or ':memory:'), a Redis store for redis://HOST:PORT/DB or rediss://…"""
    if is_redis(location):
        # Imported here: a relay on SQLite never loads the Redis client.
        from relay.redis_store import RedisStore

        return RedisStore(location, limits)
    return SqliteStore(location, limits)
