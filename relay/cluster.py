"""How the relays of a cluster tell each other what happened: the cluster bus.

A relay on its own (SQLite) has nobody to tell: `Solo` does nothing. Relays sharing a Redis use
`relay.redis_bus.RedisBus`: an envelope stored for a node is announced on that node's channel,
and the relay the node is connected to pushes it at once; a node that connects anywhere claims a
new connection number there, and every relay holding an older connection of it closes that one
(the newest connection wins, across relays); the CRL feed announces a newer CRL; each relay
announces itself with a heartbeat. Nothing a relay holds is owned in Redis: a relay that dies
leaves its nodes' mail in their mailboxes, and their next connection, anywhere, picks it up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from relay.store import Envelope, Store


class Listener(Protocol):
    """What a relay does with news from the bus (called on the event loop, must not block)."""

    def on_envelope(self, envelope: Envelope) -> None:
        """An envelope was stored for a node this relay listens for."""

    def on_replaced(self, name: str, generation: int) -> None:
        """`name` connected somewhere with connection number `generation`."""

    def on_crl(self) -> None:
        """A newer CRL is in the store."""

    def on_resync(self) -> None:
        """News may have been missed (the bus reconnected): read every mailbox from the store again."""


class Bus(ABC):
    """The cluster bus of one relay."""

    @abstractmethod
    async def start(self, listener: Listener) -> None:
        """Start listening (the store is open); StoreUnavailable if the bus cannot be reached."""

    @abstractmethod
    async def close(self) -> None:
        """Stop listening."""

    @abstractmethod
    async def join(self, name: str) -> int:
        """Listen for `name`'s news (returning once that holds) and claim its newest connection:
        its connection number, higher than any before it anywhere in the cluster."""

    @abstractmethod
    async def leave(self, name: str) -> None:
        """Stop listening for `name` (its connection here ended)."""

    @abstractmethod
    def newest(self, name: str) -> int:
        """The highest connection number of `name` heard of (0: none)."""

    @abstractmethod
    async def heartbeat(self, name: str, url: str, connected: int) -> None:
        """Announce relay `name` as alive (StoreUnavailable if that fails)."""


class Solo(Bus):
    """A relay alone: nobody to tell, connection numbers of its own."""

    def __init__(self) -> None:
        self._count = 0

    async def start(self, listener: Listener) -> None:
        return None

    async def close(self) -> None:
        return None

    async def join(self, name: str) -> int:
        self._count += 1
        return self._count

    async def leave(self, name: str) -> None:
        return None

    def newest(self, name: str) -> int:
        return 0

    async def heartbeat(self, name: str, url: str, connected: int) -> None:
        return None


def make_bus(store: Store) -> Bus:
    """The bus that goes with `store`: Redis for a Redis store, else none."""
    from relay.redis_store import RedisStore

    if isinstance(store, RedisStore):
        from relay.redis_bus import RedisBus

        return RedisBus(store)
    return Solo()
