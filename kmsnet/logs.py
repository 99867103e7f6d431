"""Structured logs on stderr: one line per event, `event key=value ...` (or JSON with KMSNET_LOG_JSON=1).

Library code logs `log.info("event_name", extra={"fields": {...}})`; this formatter renders it.
Fields never hold secrets: the layers below never put a key or a plaintext there.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime


class EventFormatter(logging.Formatter):
    """`2026-11-28T18:00:00Z relay_started url=ws://127.0.0.1:8765`."""

    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        when = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = record.getMessage()
        if self.as_json:
            return json.dumps({"time": when, "level": record.levelname.lower(), "event": event, **fields})
        pairs = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{when} {event} {pairs}".rstrip()


def configure(level: str = "INFO") -> None:
    """Send kmsnet's logs to stderr (websockets' own chatter only from WARNING up)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EventFormatter(os.environ.get("KMSNET_LOG_JSON") == "1"))
    root = logging.getLogger("kmsnet")
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("KMSNET_LOG_LEVEL", level).upper())
    root.propagate = False
    logging.getLogger("websockets").setLevel(logging.WARNING)
