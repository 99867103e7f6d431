"""One writer per home, on the command line: hold the home's lock, or go through the process that does.

Every command that may change a node's state holds the home's lock (node.homelock) while it runs:

- `exclusive(store)`: `node init|renew|rekey`, `kms ...` and `chat` take the lock, or fail at once
  naming the process that has it ("alice is in use by `kmsnet chat` (pid 4242)"), exit 1.
- `dispatch(...)`: `send`, `receive` and `status`. With the lock free, the command takes it and
  runs here; while it runs a node it also answers on the home's control socket (node.control),
  so a second terminal's `send` goes through it. With the lock held by such a process, the
  command hands its request to it and prints the answer exactly as if it had run alone (same
  lines, same --json, same exit code). A holder that is starting or leaving is waited for, up to
  `WAIT_FOR_HOLDER` seconds; a holder leaving in the middle of a followed `receive` hands it back,
  and the command goes on here.

`status` only reads: it asks a running holder (which knows whether it is connected), and otherwise
reads the keystore itself, without the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, Protocol

import click

from kmsnet.exits import CliFailure
from kmsnet.options import Output, StoreOptions, node_failures
from kmsnet.pkcs11_options import PinSource
from node.control import CONTROL_PURPOSE, ControlServer, Handler, NotStarted, Outcome, request
from node.errors import ControlError
from node.home import KEYSTORE_FILE
from node.homelock import HomeLock, in_use, read_holder
from node.keystore import Keystore
from node.node import Node, NodeOptions

#: Seconds a command waits for a holder that is starting up (not listening yet) or leaving.
WAIT_FOR_HOLDER = 15.0
_POLL = 0.05


class Sink(Protocol):
    """Where a command's results go: this terminal (`LocalSink`) or a client of the control socket."""

    closing: asyncio.Event

    def emit(self, record: dict[str, Any], text: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def note(self, message: str) -> None: ...


class LocalSink:
    """Results printed here; `closing` is set by SIGINT/SIGTERM."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.closing = asyncio.Event()

    def emit(self, record: dict[str, Any], text: str) -> None:
        self.out.emit(record, text)

    def warn(self, message: str) -> None:
        self.out.warn(message)

    def note(self, message: str) -> None:
        self.note_line(message)

    @staticmethod
    def note_line(message: str) -> None:
        """A state line ("connected to ...") on stderr: stdout is for results, which scripts read."""
        click.echo(message, err=True)


#: A command's work on a running node: (node, arguments, where results go).
Work = Callable[[Node, dict[str, Any], Sink], Coroutine[Any, Any, None]]


def command_line(*extra: str) -> str:
    """The command being run, as a person would type it ("kmsnet receive --follow"), for lock messages."""
    return " ".join([click.get_current_context().command_path, *extra])


@contextlib.contextmanager
def exclusive(store: StoreOptions, *extra: str, serves: bool = False) -> Iterator[HomeLock]:
    """Hold the home's lock for the block; fail at once (exit 1) if another process holds it.

    `serves`: the block will answer other commands on the control socket (see `serving`).
    """
    with node_failures():
        lock = HomeLock.acquire(store.home, command_line(*extra), serves=serves)
    with lock:
        yield lock


def require_node(store: StoreOptions) -> None:
    """Before any passphrase prompt: no passphrase can help a home without a node."""
    if not (store.home / KEYSTORE_FILE).exists():
        raise CliFailure(f"no node in {store.home} (run `kmsnet node init` first)")


@contextlib.contextmanager
def open_node(store: StoreOptions, relay_url: str | None, passphrase: str) -> Iterator[Node]:
    """The node of `store.home`, its keystore unlocked; errors become one-line exits."""
    with node_failures():
        keystore = Keystore.open(store.home / KEYSTORE_FILE, passphrase=passphrase)
    try:
        with node_failures():
            # A token-backed identity asks for its PIN (file, environment or prompt) only when used.
            yield Node(keystore, relay_url=relay_url, options=NodeOptions(pin=PinSource()))
    finally:
        keystore.close()


def classify(error: BaseException) -> tuple[int, str, str | None] | None:
    """For the control socket: a handler's failure as (exit code, message, code), as this terminal shows it."""
    if isinstance(error, CliFailure):
        return error.exit_code, error.format_message(), error.name
    try:
        with node_failures():
            raise error
    except CliFailure as failure:
        return failure.exit_code, failure.format_message(), failure.name
    except BaseException:  # noqa: BLE001 - not one of ours: the server logs it and answers in general words
        return None


@contextlib.asynccontextmanager
async def serving(node: Node, lock: HomeLock, handlers: dict[str, Handler]) -> AsyncIterator[None]:
    """While inside: take other commands' requests for this home on its control socket.

    A home whose socket cannot be made (no Unix sockets, a path we may not write) still works:
    other commands then find it in use, as before there was a socket.
    """
    server = ControlServer(lock.home, node.keystore.derived_key(CONTROL_PURPOSE), handlers, classify)
    try:
        await server.start()
    except ControlError as exc:
        Output.warn(f"other commands cannot reach this one ({exc})")
        yield
        return
    lock.set_serving(True)
    try:
        yield
    finally:
        lock.set_serving(False)
        await server.close()


def dispatch(
    store: StoreOptions,
    out: Output,
    command: str,
    args: dict[str, Any],
    run_here: Callable[[HomeLock | None, str], None],
    *,
    read_only: bool = False,
    extra: tuple[str, ...] = (),
) -> None:
    """Run `command` through the home's running writer, or here: `run_here(lock, passphrase)`.

    `run_here` gets the lock it runs under; with `read_only` it gets None, as the lock is never taken.
    """
    require_node(store)
    passphrase = store.passphrase()
    key: bytes | None = None
    deadline = time.monotonic() + WAIT_FOR_HOLDER
    while True:
        lock = None
        if not read_only:
            with node_failures():
                lock = HomeLock.try_acquire(store.home, command_line(*extra), serves=True)
        if lock is not None:
            with lock:
                run_here(lock, passphrase)
            return
        holder = read_holder(store.home)
        if read_only and (holder is None or not holder.serving):
            run_here(None, passphrase)
            return
        if holder is not None and not holder.serves:
            # Renewing, re-keying, a KMS command: nothing to hand the request to.
            with node_failures():  # as `exclusive` refuses: exit 1, code home_in_use
                raise in_use(store.home)
        if holder is not None and holder.serving:
            key = key or _control_key(store, passphrase)
            with node_failures():  # a holder that speaks out of turn, or no Unix sockets here: exit 3
                outcome = _through_holder(store, key, command, args, out)
            if outcome is not None and not outcome.handover:
                if outcome.exit != 0:
                    refused = outcome.message or "the running kmsnet process refused the request"
                    raise CliFailure(refused, outcome.exit, name=outcome.code)
                return
            if outcome is None and read_only:
                # A description left by a holder that is gone: read the keystore ourselves.
                run_here(None, passphrase)
                return
            if outcome is not None:
                # Handed back: the holder is leaving, and we take its place as soon as it is gone.
                deadline = time.monotonic() + WAIT_FOR_HOLDER
        if time.monotonic() > deadline:
            with node_failures():
                raise in_use(store.home, answering=False)
        time.sleep(_POLL)


def _control_key(store: StoreOptions, passphrase: str) -> bytes:
    """The key that proves to the holder that we unlocked the keystore (a wrong passphrase fails here)."""
    with node_failures(), Keystore.open(store.home / KEYSTORE_FILE, passphrase=passphrase) as keystore:
        return keystore.derived_key(CONTROL_PURPOSE)


def _through_holder(store: StoreOptions, key: bytes, command: str, args: dict[str, Any], out: Output) -> Outcome | None:
    """Hand the request to the holder; None if it could not be reached or hung up before running it."""

    async def call() -> Outcome:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        # Ctrl-C ends a followed receive here as it would if it ran here: quietly, exit 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await request(store.home, key, command, args, out.emit, out.warn, LocalSink.note_line)
        except asyncio.CancelledError:
            return Outcome(0, None)

    try:
        return asyncio.run(call())
    except NotStarted:
        return None
