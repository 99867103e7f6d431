"""OCSP lookups run off the node's frame read loop (issue #13 part 4): while a slow responder (a real
HTTP server on 127.0.0.1 that waits) is asked about a new peer, that peer's INIT is held and every
other peer's messages are delivered; a forged INIT costs no request and is held by nothing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.x509 import ocsp

from node.node import Node, NodeOptions
from node.ocsp import MAX_HELD, PEER_INTERVAL, OcspChecker, OcspGate
from protocol import handshake, wire
from protocol.link import Deliver, Send
from protocol.revocation import OcspAnswer, build_ocsp_response
from relay.server import Relay
from tests.support.lab import clock, next_event, next_message, provision, publish_crl, raw_client, relay_config, running
from tests.support.pki import ALICE, BOB, CA, MALLORY, NOW, ROGUE_CA, establish, make_prekeys

CAROL = CA.enrol("carol", 0x1004)
#: The longest a held lookup waits for the test to let it go (below the checker's own timeout).
HOLD = 4.0


@contextlib.contextmanager
def slow_responder(held: dict[int, threading.Event]) -> Iterator[str]:
    """An OCSP responder answering good for every serial; about a serial in `held` it answers only
    once that event is set (a slow responder, as seen from the node)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request = self.rfile.read(int(self.headers["Content-Length"]))
            gate = held.get(ocsp.load_der_ocsp_request(request).serial_number)
            if gate is not None:
                gate.wait(HOLD)
            body = build_ocsp_response(
                request,
                ca_key=CA.key,
                ca_cert=CA.root,
                lookup=lambda _serial: OcspAnswer("good"),
                now=NOW,
                validity=timedelta(hours=1),
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/ocsp-response")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ocsp"
    finally:
        for gate in held.values():
            gate.set()
        server.shutdown()
        server.server_close()


def gate_of(node: Node) -> OcspGate:
    gate = node._ocsp_gate
    assert gate is not None
    return gate


async def until(condition: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_a_slow_responder_holds_only_the_new_peer(tmp_path: Path) -> None:
    bob_asked = threading.Event()
    with slow_responder({BOB.serial: bob_asked}) as url:
        async with Relay(relay_config(CA, tmp_path)) as relay:
            await publish_crl(relay, CA, CA.crl())
            alice = Node(provision(CA, ALICE, relay.url), options=NodeOptions(ocsp_url=url), clock=clock)
            bob = Node(provision(CA, BOB, relay.url), clock=clock)
            carol = Node(provision(CA, CAROL, relay.url), clock=clock)
            async with running(alice, bob, carol):
                await carol.send("alice", "first from carol")
                assert (await next_message(alice)).text == "first from carol"
                gate = gate_of(alice)
                asked = gate.checker.requests

                await bob.send("alice", "hello from bob")  # an INIT: alice asks the responder, which waits
                await until(lambda: "bob" in gate._held)
                await bob.send("alice", "bob again")  # held behind bob's INIT, in order
                await carol.send("alice", "carol while bob waits")
                # Carol's message arrives while the responder still has not answered about bob.
                assert (await next_message(alice)).text == "carol while bob waits"
                assert "bob" in gate._held and not bob_asked.is_set()

                bob_asked.set()
                assert (await next_message(alice)).text == "hello from bob"
                assert (await next_message(alice)).text == "bob again"
                assert gate.checker.requests == asked + 1  # one lookup for bob, none for his second frame
                assert not gate._held


async def test_a_forged_init_costs_no_request_and_is_not_held(tmp_path: Path) -> None:
    """An enrolled mallory sends alice an INIT carrying a lookalike CA's certificate for bob."""
    with slow_responder({}) as url:
        async with Relay(relay_config(CA, tmp_path)) as relay:
            await publish_crl(relay, CA, CA.crl())
            alice = Node(provision(CA, ALICE, relay.url), options=NodeOptions(ocsp_url=url), clock=clock)
            async with running(alice):
                initiated, _ = establish(CA, MALLORY, make_prekeys(ALICE))
                forged_cert = ROGUE_CA.enrol("bob", BOB.serial).cert
                init = dataclasses.replace(handshake.decode_init(initiated.frame), certificate=forged_cert)
                forged = wire.encode(init)
                ws, _ = await raw_client(relay, MALLORY, ca=CA)
                async with ws:
                    for _ in range(20):
                        await ws.send(wire.encode_link(Send(os.urandom(16), "alice", forged)))
                    await next_event(alice, "untrusted_issuer")
                assert gate_of(alice).checker.requests == 0
                assert not gate_of(alice)._held


async def test_held_frames_are_bounded_and_lookups_rate_limited_per_peer() -> None:
    """Past MAX_HELD frames behind one lookup the newest are dropped unacknowledged (the relay sends
    them again); a second certificate of the same peer name is not asked about within PEER_INTERVAL."""
    release = threading.Event()
    handled: list[bytes] = []

    async def handle(deliver: Deliver) -> None:
        handled.append(deliver.msg_id)

    with slow_responder({BOB.serial: release}) as url:
        checker = OcspChecker(url, CA.root)
        tasks: set[asyncio.Task[None]] = set()
        gate = OcspGate(checker, handle, clock, tasks)
        initiated, _ = establish(CA, BOB, make_prekeys(ALICE))
        frames = [Deliver(i.to_bytes(16, "big"), "bob", initiated.frame, 0) for i in range(MAX_HELD + 5)]
        assert all(gate.holds(frame) for frame in frames)
        assert gate.dropped == 5
        release.set()
        await asyncio.gather(*tasks)
        assert handled == [frame.msg_id for frame in frames[:MAX_HELD]]
        assert checker.requests == 1

        renewed = CA.enrol("bob", 0x2002)  # another serial, same peer name
        renewed_init = dataclasses.replace(handshake.decode_init(initiated.frame), certificate=renewed.cert)
        later = Deliver(b"\xff" * 16, "bob", wire.encode(renewed_init), 0)
        assert not gate.holds(later)  # asked about bob less than PEER_INTERVAL ago: no request now
        gate._clock = lambda: NOW + PEER_INTERVAL
        assert gate.holds(later)
        release.set()
        await asyncio.gather(*tasks)
        assert checker.requests == 2 and handled[-1] == later.msg_id
