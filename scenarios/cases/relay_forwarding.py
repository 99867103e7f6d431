"""relay-forwarding: a relay the node dialled passes an honest relay's CHALLENGE on, to log in there as
the node and eat its mail; the node refuses a CHALLENGE naming another relay than the one it dialled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from node.errors import NodeError, RelayImpostor
from protocol import wire
from protocol.link import MAX_LINK_FRAME, Ack, Deliver, Welcome
from scenarios.lab import Lab, LabNode
from scenarios.registry import Context, scenario
from scenarios.timeline import RELAY, Kind

MESSAGES = 3


class ForwardingRelay:
    """A relay on 127.0.0.1 that hands every connection on to the honest relay at `upstream`, frame for
    frame, except that it acknowledges each DELIVER itself (the honest relay deletes it) and never
    passes it on: if the node answers the honest relay's CHALLENGE, its mail is gone."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.welcomed: list[str] = []
        self.eaten = 0
        self._server: Server | None = None

    @property
    def url(self) -> str:
        """Where nodes dial it."""
        assert self._server is not None
        return f"ws://127.0.0.1:{next(iter(self._server.sockets)).getsockname()[1]}"

    async def __aenter__(self) -> ForwardingRelay:
        self._server = await serve(self._handle, "127.0.0.1", 0, compression=None, max_size=2 * MAX_LINK_FRAME)
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()

    async def _handle(self, node: ServerConnection) -> None:
        # Each direction closes the other's connection as it ends, so the other ends too.
        upstream = connect(self.upstream, compression=None, max_size=2 * MAX_LINK_FRAME)
        async with upstream as honest, asyncio.TaskGroup() as pipes:
            pipes.create_task(self._pipe(self._down(honest, node), node))
            pipes.create_task(self._pipe(self._up(node, honest), honest))

    @staticmethod
    async def _pipe(direction: Coroutine[Any, Any, None], then_close: ServerConnection | ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await direction
        await then_close.close()

    async def _up(self, node: ServerConnection, honest: ClientConnection) -> None:
        async for raw in node:
            await honest.send(raw)

    async def _down(self, honest: ClientConnection, node: ServerConnection) -> None:
        async for raw in honest:
            assert isinstance(raw, bytes)
            passed = []
            for frame in wire.decode_link_frames(raw):
                if isinstance(frame, Welcome):
                    self.welcomed.append(frame.name)
                if isinstance(frame, Deliver):
                    await honest.send(wire.encode_link(Ack(frame.msg_id)))
                    self.eaten += 1
                else:
                    passed.append(wire.encode_link(frame))
            for message in wire.pack_link_frames(passed):
                await node.send(message)


@scenario(
    "relay-forwarding",
    attack="a relay Bob dials passes the honest relay's CHALLENGE on, logs in there as Bob and ACKs his mail",
    expected="the node refuses a CHALLENGE naming another relay: no login, no mail lost",
    story="""Alice writes to Bob while he is offline; the honest relay stores her messages. Bob is
    then pointed at a forwarding relay on 127.0.0.1, which connects to the honest relay and passes its
    CHALLENGE (naming the honest relay) on to Bob. Bob's node checks the name against the relay it
    dialled, refuses to answer, and the forwarder never gets in: the messages wait at the honest
    relay until Bob connects there. The insecure variant (the old behaviour: sign whichever name the
    CHALLENGE gives) shows what the check stops: the honest relay welcomes the forwarder as Bob, the
    forwarder ACKs his mail away, and messages Alice was told were stored never reach him.""",
)
async def relay_forwarding(ctx: Context) -> None:
    async with ctx.lab() as lab:
        assert lab.relay is not None
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        await lab.open_session(alice, bob)
        async with ForwardingRelay(lab.url) as forwarder:
            ctx.story(f"Bob is offline; Alice writes {MESSAGES} messages, stored at the honest relay")
            await lab.stop_node(bob)
            first = await _write(lab, alice, "first")
            ctx.story(f"Bob dials the forwarding relay at {forwarder.url}; it passes the honest relay's CHALLENGE on")
            refused = await _dial(lab, bob, forwarder.url)
            got_in = forwarder.welcomed.count("bob")
            waiting = await lab.relay.store.waiting("bob")
            ctx.story("Bob connects to the honest relay itself")
            await lab.restart_node(bob)
            await lab.until(lambda: set(first) <= set(bob.texts("alice")), "Bob has Alice's messages")

            ctx.story("INSECURE variant: Bob signs whichever relay name a CHALLENGE gives (the old behaviour)")
            await lab.stop_node(bob)
            second = await _write(lab, alice, "second")
            await lab.restart_node(bob, relay_url=forwarder.url, check_relay_name=False)
            await lab.wait_for(lambda: forwarder.eaten >= MESSAGES, timeout=5)
            await lab.restart_node(bob, check_relay_name=True)
            await lab.settle(0.3)
            lost = [text for text in second if text not in bob.texts("alice")]
            ctx.timeline.add(Kind.FAULT, RELAY, f"the forwarder ACKed {forwarder.eaten} envelopes of Bob's away")

        ctx.check("Bob refused the forwarded CHALLENGE (names another relay)", True, refused)
        ctx.check("logins the forwarder got as Bob while he checked the name", 0, got_in)
        ctx.check("messages still waiting for Bob at the honest relay after the attempt", MESSAGES, waiting)
        ctx.check("messages of the first batch Bob received", MESSAGES, len(set(first) & set(bob.texts("alice"))))
        ctx.check("INSECURE variant: the forwarder got in as Bob", 1, forwarder.welcomed.count("bob"))
        ctx.check("INSECURE variant: messages lost (ACKed by the forwarder)", MESSAGES, len(lost))
        ctx.figure("envelopes the forwarder ACKed in the insecure variant", forwarder.eaten)
        ctx.conclude(
            f"forwarded CHALLENGE refused, {MESSAGES} of {MESSAGES} messages kept; without the check "
            f"the forwarder got in and {len(lost)} of {MESSAGES} were lost"
        )


async def _write(lab: Lab, alice: LabNode, batch: str) -> list[str]:
    texts = [f"{batch} #{i} for bob" for i in range(1, MESSAGES + 1)]
    for text in texts:
        await lab.say(alice, "bob", text)
    return texts


async def _dial(lab: Lab, bob: LabNode, url: str) -> bool:
    """Start Bob on `url`; True if his node refused the relay there for giving another relay's name."""
    try:
        await lab.restart_node(bob, relay_url=url)
    except RelayImpostor as exc:
        lab.timeline.add(Kind.REFUSE, bob.lane, f"bob REFUSED the relay at {url}: {exc}", peer=RELAY)
        return True
    except NodeError:
        return False
    return False
