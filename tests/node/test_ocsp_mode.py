"""Nodes that check peers by OCSP instead of the CRL feed: a real HTTP responder on 127.0.0.1
answers with protocol.ocsp's responder; revoked or unreachable means no session."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from node.node import Node, NodeOptions
from node.ocsp import MIN_INTERVAL, OcspChecker
from protocol.errors import CertificateRevoked, NoRevocationData, UntrustedIssuer
from protocol.ocsp import OcspAnswer, build_ocsp_response
from relay.server import Relay
from tests.support.lab import clock, next_event, next_message, provision, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA, NOW, ROGUE_CA


@contextlib.contextmanager
def responder(revoked: set[int]) -> Iterator[str]:
    """An OCSP responder for the test CA: good for every serial except those in `revoked`."""

    def lookup(serial: int) -> OcspAnswer:
        if serial in revoked:
            return OcspAnswer("revoked", NOW - timedelta(minutes=1), "key-compromise")
        return OcspAnswer("good")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request = self.rfile.read(int(self.headers["Content-Length"]))
            body = build_ocsp_response(
                request, ca_key=CA.key, ca_cert=CA.root, lookup=lookup, now=NOW, validity=timedelta(hours=1)
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/ocsp-response")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass  # quiet: the test output is the story

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ocsp"
    finally:
        server.shutdown()
        server.server_close()


async def test_peers_are_checked_by_ocsp(tmp_path: Path) -> None:
    revoked: set[int] = set()
    with responder(revoked) as url:
        async with Relay(relay_config(CA, tmp_path)) as relay:
            await publish_crl(relay, CA, CA.crl())  # bob uses the feed; alice asks the responder
            alice = Node(provision(CA, ALICE, relay.url), options=NodeOptions(ocsp_url=url), clock=clock)
            bob = Node(provision(CA, BOB, relay.url), clock=clock)
            async with running(alice, bob):
                await alice.send("bob", "checked by OCSP")
                assert (await next_message(bob)).text == "checked by OCSP"
                revoked.add(BOB.serial)  # the CRL feed says nothing; OCSP says revoked
                await alice.revocations.recheck_by_ocsp()
                event = await next_event(alice, "peer_revoked")
                assert event.peer == "bob" and "key-compromise" in event.reason
                alice._ocsp._answers.clear()  # type: ignore[union-attr]
                with pytest.raises(CertificateRevoked):
                    await alice.send("bob", "again?")


async def test_an_unreachable_responder_fails_closed(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        dead = "http://127.0.0.1:9/ocsp"  # discard port: nothing answers
        alice = Node(provision(CA, ALICE, relay.url), options=NodeOptions(ocsp_url=dead), clock=clock)
        bob = Node(provision(CA, BOB, relay.url), clock=clock)
        async with running(alice, bob):
            with pytest.raises(NoRevocationData):
                await alice.send("bob", "nobody vouches for bob")
            event = await next_event(alice, "session_refused")
            assert event.error == "no_revocation_data"


async def test_a_forged_certificate_costs_no_ocsp_request_and_answers_are_kept_until_next_update() -> None:
    """Issue #13 part 4: the certificate is verified before the responder is asked, the answer is
    kept until its nextUpdate, and a failing responder is not asked again at once."""
    forged = ROGUE_CA.enrol("bob", BOB.serial)  # the right issuer name, another key
    with responder(set()) as url:
        checker = OcspChecker(url, CA.root)
        for _ in range(100):
            await checker.ensure(forged.cert, NOW)
        with pytest.raises(UntrustedIssuer):
            await checker.refresh(forged.cert, NOW)
        assert checker.requests == 0
        await checker.ensure(BOB.cert, NOW)
        await checker.ensure(BOB.cert, NOW + timedelta(minutes=59))  # the answer is valid for an hour
        assert checker.requests == 1
        checker.check(BOB.serial, NOW + timedelta(minutes=59))
        await checker.ensure(BOB.cert, NOW + timedelta(minutes=61))
        assert checker.requests == 2
    dead = OcspChecker("http://127.0.0.1:9/ocsp", CA.root)  # nothing answers
    for _ in range(10):
        await dead.ensure(BOB.cert, NOW)
    assert dead.requests == 1
    await dead.ensure(BOB.cert, NOW + MIN_INTERVAL)
    assert dead.requests == 2
