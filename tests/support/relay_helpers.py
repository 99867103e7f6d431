"""Helpers and fixtures of tests/relay/test_relay.py that other test modules use too."""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosed

from protocol import wire
from protocol.link import Error, ErrorCode, PublishBundle
from tests.support.lab import recv_frame
from tests.support.pki import make_prekeys


async def publish_bundle(ws, who, onetime: int = 2) -> None:
    prekeys = make_prekeys(who, onetime=onetime)
    upload = [[o.key_id, o.public, o.signature] for o in prekeys.onetime.values()]
    await ws.send(wire.encode_link(PublishBundle(wire.encode(prekeys.bundle), upload, 1)))


async def expect_error(ws, code: ErrorCode) -> Error:
    frame = await recv_frame(ws)
    assert isinstance(frame, Error), frame
    assert frame.code == code, frame
    return frame


async def expect_closed(ws) -> None:
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(5):
            while True:
                await ws.recv()
