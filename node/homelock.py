"""One writer per home: an OS-level exclusive lock held by every process that may change a node's state.

Two processes encrypting from one ratchet state send two different plaintexts under the same
(message key, nonce): AES-GCM's worst failure, and each newer connection evicts the other at the
relay. So any process that may write a home (`send`, `receive`, `chat`, `node init|renew|rekey`,
`kms`) first takes `HomeLock.acquire(home, ...)` and holds it for as long as it runs; read-only
commands do not need it.

The lock is `flock(2)` on HOME/lock. The kernel drops it when the holding process ends, however it
ends (`kill -9` included), so a crash never leaves a home locked and a stale file is simply taken
over. The file's content, a `Holder` (pid, command, whether it answers on the control socket), only
describes the holder for the message another process prints: the flock alone decides who writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from node.errors import HomeInUse, StorageError

LOCK_NAME = "lock"

#: How long a reader retries a holder description that is being written at that very moment.
_READ_RETRY = 0.2


@dataclass(frozen=True)
class Holder:
    """Who holds a home's lock, as it said when it took it."""

    pid: int
    #: What the holder runs, as a person would type it ("kmsnet receive --follow").
    command: str
    #: The holder runs a node and takes requests on HOME/control.sock (see node.control) once `serving`.
    serves: bool
    serving: bool = False

    def describe(self) -> str:
        """`kmsnet chat` (pid 4242): for messages to people."""
        return f"`{self.command}` (pid {self.pid})"


class HomeLock:
    """The exclusive writer lock of one home; release it with `release()` or a `with` block."""

    def __init__(self, home: Path, fd: int, holder: Holder) -> None:
        """Internal: use `acquire` or `try_acquire`."""
        self.home = home
        self.holder = holder
        self._fd: int | None = fd
        self._created = False

    @classmethod
    def try_acquire(cls, home: Path | str, command: str, *, serves: bool = False) -> HomeLock | None:
        """Take the lock of `home` (created 0700 if missing), or None at once if another process holds it."""
        home = Path(home)
        created = not home.exists()
        while True:
            try:
                home.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise StorageError(f"cannot lock {home}: {exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A holder that made the home for nothing removes the file on release (see `release`):
                # the flock we got may be on that removed file, which locks nobody out.
                current = os.stat(home / LOCK_NAME, follow_symlinks=False).st_ino
            except BlockingIOError:
                os.close(fd)
                return None
            except FileNotFoundError:
                os.close(fd)
                continue
            except OSError as exc:
                os.close(fd)
                raise StorageError(f"cannot lock {home}: {exc.strerror or exc}") from exc
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        lock = cls(home, fd, Holder(os.getpid(), command, serves))
        lock._created = created
        lock._describe()
        return lock

    @classmethod
    def acquire(cls, home: Path | str, command: str, *, serves: bool = False) -> HomeLock:
        """Take the lock of `home`; raise `HomeInUse` naming the holder if another process has it."""
        lock = cls.try_acquire(home, command, serves=serves)
        if lock is None:
            raise in_use(Path(home))
        return lock

    def set_serving(self, serving: bool) -> None:
        """Say whether the control socket takes requests now (other processes wait for it or hand over)."""
        self.holder = Holder(self.holder.pid, self.holder.command, self.holder.serves, serving)
        self._describe()

    def _describe(self) -> None:
        if self._fd is None:
            return
        data = json.dumps(asdict(self.holder)).encode()
        # Readers retry a torn read: there is no lock-free way to replace a file's content in place,
        # and renaming a new file over it would leave our flock on the old inode.
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Give the lock up (closing the descriptor releases the flock). Idempotent.

        A home this lock created and nothing else used (a `node init` that failed) is removed
        again, so that a failed command leaves nothing behind.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # If someone else's file appears meanwhile, rmdir fails and the home stays, as it should.
            with contextlib.suppress(OSError):
                if self._created and [p.name for p in self.home.iterdir()] == [LOCK_NAME]:
                    (self.home / LOCK_NAME).unlink()  # while still holding it: see try_acquire
                    self.home.rmdir()
        finally:
            os.close(fd)

    def __enter__(self) -> HomeLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def read_holder(home: Path | str) -> Holder | None:
    """The description the current (or last) holder wrote; None if there is none or it cannot be read."""
    path = Path(home) / LOCK_NAME
    deadline = time.monotonic() + _READ_RETRY
    while True:
        try:
            fields = json.loads(path.read_bytes())
            return Holder(int(fields["pid"]), str(fields["command"]), bool(fields["serves"]), bool(fields["serving"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # Being written right now (see HomeLock._describe), or damaged: try again briefly.
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)


def in_use(home: Path, *, answering: bool = True) -> HomeInUse:
    """The error for a home whose lock another process holds, naming that process when it can.

    `answering=False`: the holder should take requests on the control socket but does not.
    """
    holder = read_holder(home)
    who = holder.describe() if holder is not None else "another kmsnet process"
    silent = "" if answering else ", which does not answer"
    return HomeInUse(f"{home} is in use by {who}{silent}: wait until it ends, or stop it", holder)
