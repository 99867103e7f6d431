"""The rollback detector's counter kept outside the sealed records (PROTOCOL.md §8.2).

Each sealed record authenticates on its own, so a keystore restored from a backup (or a copied
`keystore.db`) looks valid, and its sessions would encrypt again under message numbers that already
left: the same AES-GCM (key, nonce) for other plaintexts. The node therefore keeps a counter in two
places: the record `node/epoch` inside the keystore, committed with every fsynced session state,
and the file `keystore.db.epoch` next to the keystore, written after each such commit. A keystore whose counter is
below the file's is older than the last state the node made durable: it has been rolled back.

Restoring the whole home (file included), as a VM snapshot does, is not seen here; that needs a
copy held elsewhere: the signed epoch the relay echoes at login (node/epochecho.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger("kmsnet.node")

#: What the file's name adds to the keystore's (one counter per keystore, even in a shared directory).
EPOCH_SUFFIX = ".epoch"


def epoch_path(keystore_path: Path | None) -> Path | None:
    """Where the counter of the keystore at `keystore_path` lives (None for an in-memory keystore)."""
    return keystore_path.with_name(keystore_path.name + EPOCH_SUFFIX) if keystore_path is not None else None


class EpochFile:
    """`HOME/keystore.db.epoch`: a decimal counter, replaced atomically and fsynced. No file (or no home): 0."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._written = self.read()
        self._wanted = self._written
        self._writer: asyncio.Task[None] | None = None

    def read(self) -> int:
        """The counter on disk (0 when there is none or it is unreadable: never a false alarm)."""
        if self.path is None:
            return 0
        try:
            return int(self.path.read_text(encoding="ascii").strip() or 0)
        except (OSError, ValueError):
            return 0

    def write(self, value: int) -> None:
        """Replace the counter (write a temporary file, fsync, rename, fsync the directory)."""
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="ascii") as out:
            out.write(f"{value}\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):  # not every platform can fsync a directory
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._written = max(self._written, value)

    def advance(self, value: int) -> None:
        """Write `value` soon, off the event loop, in order (call once the keystore holds it)."""
        self._wanted = max(self._wanted, value)
        if self.path is not None and (self._writer is None or self._writer.done()):
            self._writer = asyncio.create_task(self._write_pending(), name="node-epoch")

    async def _write_pending(self) -> None:
        while self._written < self._wanted:
            try:
                await asyncio.to_thread(self.write, self._wanted)
            except OSError as exc:
                # The file stays behind the keystore: a later rollback may go unseen, but no false
                # alarm is possible; the next commit tries again.
                log.error("epoch_not_written", extra={"fields": {"path": str(self.path), "error": exc.strerror}})
                return

    async def close(self) -> None:
        """Finish the pending write."""
        if self._writer is not None:
            await self._writer
            self._writer = None
