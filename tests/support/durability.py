"""Helpers and fixtures of tests/node/test_durability.py that other test modules use too."""

from __future__ import annotations

from protocol import wire
from protocol.link import Send
from protocol.messages import RatchetMessage
from relay.interceptor import Interceptor


class NonceWatch(Interceptor):
    """Records every MESSAGE the relay routes: (ratchet key, number) must always mean one ciphertext."""

    def __init__(self) -> None:
        self.seen: dict[tuple[bytes, int], bytes] = {}
        self.reused: list[tuple[bytes, int]] = []

    async def on_send(self, sender: str, send: Send) -> list[Send]:
        frame = wire.decode(send.payload)
        messages = [frame] if isinstance(frame, RatchetMessage) else []
        if not messages and hasattr(frame, "message"):
            messages = [wire.decode_message(frame.message)]  # message 0 inside an INIT
        for m in messages:
            assert isinstance(m, RatchetMessage)
            key = (m.dh, m.n)
            if self.seen.setdefault(key, m.ciphertext) != m.ciphertext:
                self.reused.append(key)
        return [send]
