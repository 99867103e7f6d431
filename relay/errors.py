"""The relay's exception hierarchy."""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error raised by `relay`."""


class QuotaExceeded(RelayError):
    """The recipient's mailbox is full (count or bytes)."""


class StoreUnavailable(RelayError):
    """The store cannot be opened or written."""


class StoreWriteRefused(StoreUnavailable):
    """The store answers but refuses writes (full, read-only): the relay refuses what it cannot
    store, and goes on serving what needs no write."""
