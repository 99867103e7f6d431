"""The relay's exception hierarchy."""

from __future__ import annotations

from protocol.link import ErrorCode


class RelayError(Exception):
    """Base of every error raised by `relay`."""


class QuotaExceeded(RelayError):
    """The recipient's mailbox is full (count or bytes)."""


class StoreUnavailable(RelayError):
    """The store cannot be opened or written."""


class StoreWriteRefused(StoreUnavailable):
    """The store answers but refuses writes (full, read-only): the relay refuses what it cannot
    store, and goes on serving what needs no write."""


class LinkRefused(RelayError):
    """What a node sent ends its connection: the ERROR frame it is told (`code`, the message), then
    the WebSocket close code `close`."""

    def __init__(self, code: ErrorCode, text: str, close: int) -> None:
        super().__init__(text)
        self.code = code
        self.close = close
