"""The files of a home (a node's or the CA's): made all at once or not at all, never overwritten."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

from node.keystore import Argon2Params, Keystore

__all__ = ["create_keystore", "remove_database", "write_new_files"]


def create_keystore(path: Path, *, passphrase: str, argon2: Argon2Params, fill: Callable[[Keystore], None]) -> None:
    """Create a keystore at `path` and `fill` it, all at once or not at all.

    It is built under a temporary name and hard-linked into place, so a failure or a crash
    leaves nothing at `path`, and a file that appeared there meanwhile is kept as it is
    (`FileExistsError`), never opened or overwritten.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.new")
    try:
        with Keystore.open(tmp, passphrase=passphrase, create=True, argon2=argon2) as keystore:
            fill(keystore)
            keystore.scrub()  # everything into the main file: the link below must carry it all
        os.link(tmp, path)
    finally:
        remove_database(tmp)


def remove_database(path: Path) -> None:
    """Delete an SQLite file and its -wal and -shm side files (missing ones are fine)."""
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)


def write_new_files(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write `(path, data, mode)` files that must not exist yet, all or none.

    Each is created with O_EXCL, so an existing file is never overwritten (`FileExistsError`);
    if one write fails, the files written before it are removed.
    """
    written: list[Path] = []
    try:
        for path, data, mode in files:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            written.append(path)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
