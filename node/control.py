"""The home's control socket: how a command reaches the process that already holds the home.

Only one process may write a home (node.homelock). When that process runs a node (`receive
--follow`, `chat`, a `send` in progress), it listens on HOME/control.sock, a Unix domain socket of
mode 0600, and other commands for the same home hand their request to it instead of failing: the
model is signal-cli's daemon mode. This module is the transport only; which requests exist and
what they do is the command line's business (kmsnet.writer).

The conversation is JSON, one object per line:

    holder → client   {"type": "hello", "v": 1, "nonce": HEX}
    client → holder   {"type": "request", "command": NAME, "args": {...}, "proof": HEX}
    holder → client   {"type": "started"}                 the request was authenticated and runs
                      {"type": "emit", "record": {...}, "text": STR}     a result, for --json or for people
                      {"type": "warn", "message": STR}        a warning, for the client's stderr
                      {"type": "note", "message": STR}        a state line (connected, lost), for its stderr
                      {"type": "handover"}                the holder is leaving: take the lock, run it yourself
                      {"type": "end", "exit": INT, "message": STR | null, "code": STR | null}

`proof` is HMAC-SHA256 under `Keystore.derived_key(CONTROL_PURPOSE)` over the nonce and the request:
a client proves it unlocked the keystore (knows its passphrase) as the command would have to if it
ran alone, so the socket gives another local process of the same user nothing it could not do
with the keystore file itself. A client that sees no "started" line may safely try again: nothing
ran. After "started", a lost connection means the outcome is unknown, and the client says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from node.errors import ControlError

log = logging.getLogger("kmsnet.control")

SOCKET_NAME = "control.sock"
CONTROL_PURPOSE = "control-socket"
VERSION = 1
#: Longest line either side accepts (a request carries at most one message's text).
MAX_LINE = 4 * 1024 * 1024
#: Seconds a client waits for the hello, and a holder for the request, before giving up on the other.
HELLO_TIMEOUT = 10.0
_PROOF_LABEL = b"kmsnet-control/1 request"
#: sun_path holds 108 bytes; longer paths are reached through the home's descriptor in /proc.
_MAX_SUN_PATH = 100


class Handover(Exception):
    """Raised by a handler when the holder leaves before the request is done: the client takes over."""


class Reply:
    """What a handler writes its results to; `closing` is set when the holder is about to leave."""

    def __init__(self, writer: asyncio.StreamWriter, closing: asyncio.Event) -> None:
        self._writer = writer
        self.closing = closing

    def emit(self, record: dict[str, Any], text: str) -> None:
        """One result: `record` for --json, `text` for people."""
        _write(self._writer, {"type": "emit", "record": record, "text": text})

    def warn(self, message: str) -> None:
        """One warning line for the client's stderr."""
        _write(self._writer, {"type": "warn", "message": message})

    def note(self, message: str) -> None:
        """One state line for the client's stderr (not a warning: "connected to ...")."""
        _write(self._writer, {"type": "note", "message": message})


Handler = Callable[[dict[str, Any], Reply], Coroutine[Any, Any, None]]
#: Maps a handler's exception to (exit code, message for people, stable error code or None), or None
#: for an unexpected one.
Classifier = Callable[[BaseException], tuple[int, str, str | None] | None]


def _mac(key: bytes, nonce: bytes, command: str, args: dict[str, Any]) -> hmac.HMAC:
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(_PROOF_LABEL + nonce + json.dumps([command, args], sort_keys=True).encode())
    return mac


def _check_proof(key: bytes, nonce: bytes, command: str, args: dict[str, Any], proof: bytes) -> bool:
    try:
        _mac(key, nonce, command, args).verify(proof)  # constant time
    except InvalidSignature:
        return False
    return True


def _write(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")


async def _read(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at the end of the stream; ControlError on a malformed line."""
    try:
        line = await reader.readline()
    except (ValueError, asyncio.LimitOverrunError) as exc:
        raise ControlError("the control socket sent a line that is too long") from exc
    if not line:
        return None
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise ControlError("the control socket sent something that is not JSON") from exc
    if not isinstance(message, dict):
        raise ControlError("the control socket sent something that is not a message")
    return message


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """A name `bind`/`connect` accept for `path`, even when it is longer than sun_path allows."""
    if len(os.fsencode(path)) < _MAX_SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _require_unix_sockets() -> None:
    if not hasattr(socket, "AF_UNIX"):
        raise ControlError("this system has no Unix domain sockets: run one kmsnet command per home at a time")


class ControlServer:
    """Takes requests on HOME/control.sock for the process that holds the home's lock.

    `async with ControlServer(...)`: listening inside the block; on the way out it stops
    listening, hands long requests (a followed `receive`) back to their clients, and lets the
    short ones (a `send`) finish, within `grace` seconds.
    """

    def __init__(
        self, home: Path, key: bytes, handlers: dict[str, Handler], classify: Classifier, *, grace: float = 15.0
    ) -> None:
        self.path = Path(home) / SOCKET_NAME
        self._key = key
        self._handlers = handlers
        self._classify = classify
        self._grace = grace
        self._server: asyncio.Server | None = None
        self._closing = asyncio.Event()
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen (any socket file left by a crashed holder is replaced: we hold the lock)."""
        _require_unix_sockets()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.path.unlink(missing_ok=True)
            with _address(self.path) as address:
                # Mode 0600 from the start: no instant in which another user could connect.
                old = os.umask(0o177)
                try:
                    sock.bind(address)
                finally:
                    os.umask(old)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot listen on {self.path}: {exc.strerror or exc}") from exc

    async def close(self) -> None:
        """Stop listening, hand over or finish what runs, remove the socket file."""
        self._closing.set()
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        if self._clients:
            _, late = await asyncio.wait(self._clients, timeout=self._grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._conversation(reader, writer)
        except (ConnectionError, ControlError, TimeoutError) as exc:
            log.info("control_client_lost", extra={"fields": {"error": str(exc)}})
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _conversation(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonce = secrets.token_bytes(32)
        _write(writer, {"type": "hello", "v": VERSION, "nonce": nonce.hex()})
        async with asyncio.timeout(HELLO_TIMEOUT):
            request = await _read(reader)
        if request is None:
            return
        command, args = request.get("command"), request.get("args")
        handler = self._handlers.get(command) if isinstance(command, str) else None
        try:
            proof = bytes.fromhex(str(request.get("proof")))
        except ValueError:
            proof = b""
        if request.get("type") != "request" or handler is None or not isinstance(args, dict):
            refusal = "the running kmsnet process does not know this request"
            _write(writer, {"type": "end", "exit": 2, "message": refusal})
            return
        assert isinstance(command, str)
        if not _check_proof(self._key, nonce, command, args, proof):
            log.warning("control_refused", extra={"fields": {"command": command, "reason": "bad proof"}})
            _write(writer, {"type": "end", "exit": 1, "message": "wrong passphrase for this home"})
            return
        if self._closing.is_set():
            _write(writer, {"type": "handover"})
            return
        _write(writer, {"type": "started"})
        log.info("control_request", extra={"fields": {"command": command}})
        await self._run(handler, args, reader, writer)

    async def _run(
        self, handler: Handler, args: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        work = asyncio.create_task(handler(args, Reply(writer, self._closing)))
        # The client hanging up (Ctrl-C on a followed receive) ends its request.
        hangup = asyncio.create_task(reader.read())
        try:
            await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if work.cancelled():
            return
        error = work.exception()
        if error is None:
            end: dict[str, Any] = {"type": "end", "exit": 0, "message": None}
        elif isinstance(error, Handover):
            end = {"type": "handover"}
        else:
            known = self._classify(error)
            if known is None:
                log.error("control_request_failed", extra={"fields": {"error": repr(error)}})
                known = (1, "the running kmsnet process could not handle this request", None)
            end = {"type": "end", "exit": known[0], "message": known[1], "code": known[2]}
        _write(writer, end)
        await writer.drain()


@dataclass(frozen=True)
class Outcome:
    """How a request through the control socket ended."""

    exit: int
    message: str | None
    #: The holder left before the request was done: take the lock and run it here.
    handover: bool = False
    #: The failure's stable code (`--json` errors carry it), when the holder named one.
    code: str | None = None


class NotStarted(ControlError):
    """The holder could not be reached, or hung up before it ran the request: trying again is safe."""


async def request(
    home: Path,
    key: bytes,
    command: str,
    args: dict[str, Any],
    on_emit: Callable[[dict[str, Any], str], None],
    on_warn: Callable[[str], None],
    on_note: Callable[[str], None] | None = None,
) -> Outcome:
    """Hand `command` to the holder of `home`; results go to `on_emit`, `on_warn`, `on_note` as they come."""
    _require_unix_sockets()
    path = Path(home) / SOCKET_NAME
    try:
        with _address(path) as address:
            reader, writer = await asyncio.open_unix_connection(address, limit=MAX_LINE)
    except OSError as exc:
        raise NotStarted(f"cannot reach the process holding {home}: {exc.strerror or exc}") from exc
    started = False
    try:
        async with asyncio.timeout(HELLO_TIMEOUT):
            hello = await _read(reader)
        if hello is None or hello.get("type") != "hello" or hello.get("v") != VERSION:
            raise NotStarted("the process holding the home did not greet us")
        nonce = bytes.fromhex(str(hello.get("nonce")))
        proof = _mac(key, nonce, command, args).finalize()
        _write(writer, {"type": "request", "command": command, "args": args, "proof": proof.hex()})
        await writer.drain()
        while True:
            message = await _read(reader)
            if message is None:
                if not started:
                    raise NotStarted("the process holding the home hung up before it ran the request")
                return Outcome(3, "the running kmsnet process stopped before it finished; the outcome is unknown")
            kind = message.get("type")
            if kind == "started":
                started = True
            elif kind == "emit":
                on_emit(message.get("record") or {}, str(message.get("text", "")))
            elif kind == "warn":
                on_warn(str(message.get("message", "")))
            elif kind == "note" and on_note is not None:
                on_note(str(message.get("message", "")))
            elif kind == "handover":
                return Outcome(0, None, handover=True)
            elif kind == "end":
                exit_code, text, code = message.get("exit"), message.get("message"), message.get("code")
                return Outcome(
                    exit_code if isinstance(exit_code, int) else 1,
                    str(text) if text else None,
                    code=str(code) if code else None,
                )
    except (ConnectionError, TimeoutError, ValueError) as exc:
        if started:
            return Outcome(3, "lost the running kmsnet process before it finished; the outcome is unknown")
        raise NotStarted(f"lost the process holding {home}") from exc
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
