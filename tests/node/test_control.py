"""node.control: the home's control socket, server and client, over a real Unix domain socket."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from node.control import SOCKET_NAME, ControlServer, Handover, NotStarted, Outcome, Reply, request
from node.errors import StorageError

KEY = bytes(range(32))


class Seen:
    def __init__(self) -> None:
        self.emitted: list[tuple[dict[str, Any], str]] = []
        self.warned: list[str] = []
        self.noted: list[str] = []

    async def ask(self, home: Path, command: str, args: dict[str, Any], key: bytes = KEY) -> Outcome:
        def emitted(record: dict[str, Any], text: str) -> None:
            self.emitted.append((record, text))

        return await request(home, key, command, args, emitted, self.warned.append, self.noted.append)


async def echo(args: dict[str, Any], reply: Reply) -> None:
    reply.warn("careful")
    reply.note("connected")
    reply.emit({"type": "echo", **args}, f"echo {args}")


async def refuse(args: dict[str, Any], reply: Reply) -> None:
    raise StorageError("the disk is full")


async def crash(args: dict[str, Any], reply: Reply) -> None:
    raise RuntimeError("internal detail that must not reach the user")


def classify(error: BaseException) -> tuple[int, str, str | None] | None:
    return (3, str(error), "storage") if isinstance(error, StorageError) else None


def server(home: Path, **handlers: Any) -> ControlServer:
    return ControlServer(home, KEY, {"echo": echo, "refuse": refuse, "crash": crash, **handlers}, classify, grace=2)


async def test_a_request_runs_and_its_results_come_back_in_order(tmp_path: Path) -> None:
    async with server(tmp_path):
        assert stat.S_IMODE((tmp_path / SOCKET_NAME).stat().st_mode) == 0o600
        seen = Seen()
        assert await seen.ask(tmp_path, "echo", {"x": 1}) == Outcome(0, None)
        assert seen.emitted == [({"type": "echo", "x": 1}, "echo {'x': 1}")]
        assert seen.warned == ["careful"] and seen.noted == ["connected"]
        assert await seen.ask(tmp_path, "refuse", {}) == Outcome(3, "the disk is full", code="storage")
        # Not one of ours: general words for the user, never the exception's text.
        assert await seen.ask(tmp_path, "crash", {}) == Outcome(
            1, "the running kmsnet process could not handle this request"
        )
    assert not (tmp_path / SOCKET_NAME).exists()


async def test_a_client_that_did_not_unlock_the_keystore_is_refused(tmp_path: Path) -> None:
    ran: list[object] = []

    async def record(args: dict[str, Any], reply: Reply) -> None:
        ran.append(args)

    async with server(tmp_path, record=record):
        seen = Seen()
        outcome = await seen.ask(tmp_path, "record", {"text": "hi"}, key=bytes(32))
        assert outcome == Outcome(1, "wrong passphrase for this home")
        unknown = await seen.ask(tmp_path, "nonsense", {})
        assert unknown == Outcome(2, "the running kmsnet process does not know this request")
    assert ran == []


@pytest.mark.parametrize(
    "line",
    [b"not json\n", b"[1, 2]\n", b'{"type": "request", "command": "echo", "args": [], "proof": "00"}\n',
     b'{"type": "request", "command": "echo", "args": {}, "proof": "zz"}\n', b"\n"],
)  # fmt: skip
async def test_malformed_requests_are_answered_or_dropped_never_run(tmp_path: Path, line: bytes) -> None:
    ran: list[object] = []

    async def record(args: dict[str, Any], reply: Reply) -> None:
        ran.append(args)

    async with server(tmp_path, echo=record):
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / SOCKET_NAME))
        hello = json.loads(await reader.readline())
        assert hello["type"] == "hello" and len(bytes.fromhex(hello["nonce"])) == 32
        writer.write(line)
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert b'"started"' not in rest
        # The server is still there for the next client.
        assert await Seen().ask(tmp_path, "refuse", {}) == Outcome(3, "the disk is full", code="storage")
    assert ran == []


async def test_a_long_request_is_handed_back_when_the_holder_leaves(tmp_path: Path) -> None:
    async def wait_for_closing(args: dict[str, Any], reply: Reply) -> None:
        reply.emit({"n": 1}, "first")
        await reply.closing.wait()
        raise Handover

    holder = server(tmp_path, follow=wait_for_closing)
    await holder.start()
    seen = Seen()
    asking = asyncio.create_task(seen.ask(tmp_path, "follow", {}))
    while not seen.emitted:
        await asyncio.sleep(0.01)
    await holder.close()
    assert await asking == Outcome(0, None, handover=True)
    assert seen.emitted == [({"n": 1}, "first")]
    with pytest.raises(NotStarted):
        await seen.ask(tmp_path, "echo", {})


async def test_a_client_hanging_up_ends_its_request(tmp_path: Path) -> None:
    cancelled = asyncio.Event()

    async def forever(args: dict[str, Any], reply: Reply) -> None:
        reply.emit({}, "started")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with server(tmp_path, forever=forever):
        seen = Seen()
        asking = asyncio.create_task(seen.ask(tmp_path, "forever", {}))
        while not seen.emitted:
            await asyncio.sleep(0.01)
        asking.cancel()
        await asyncio.wait_for(cancelled.wait(), 5)


async def test_a_home_path_longer_than_a_socket_address_still_works(tmp_path: Path) -> None:
    home = tmp_path / ("h" * 60) / ("o" * 60)
    home.mkdir(parents=True)
    assert len(str(home / SOCKET_NAME)) > 108
    async with server(home):
        assert await Seen().ask(home, "echo", {}) == Outcome(0, None)


async def test_no_holder_means_not_started(tmp_path: Path) -> None:
    with pytest.raises(NotStarted):
        await Seen().ask(tmp_path, "echo", {})
    (tmp_path / SOCKET_NAME).write_text("a stale file, not a socket")
    with pytest.raises(NotStarted):
        await Seen().ask(tmp_path, "echo", {})
