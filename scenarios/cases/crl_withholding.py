"""crl-withholding: the relay withholds the CRL that revokes Bob; Alice fetches it from the CA herself
once her newest CRL is 20 minutes old, so the relay delays the revocation by at most that."""

from __future__ import annotations

from datetime import timedelta
from http import HTTPStatus
from types import TracebackType

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from node.crlfetch import DEFAULT_MAX_AGE
from node.home import NS_NODE
from scenarios.attacker import FeedControl, MaliciousRelay
from scenarios.lab import LabCA
from scenarios.registry import Context, scenario
from scenarios.timeline import Kind

HOUR = timedelta(hours=1)


class CaEndpoint:
    """The CA's HTTP `GET /crl` (as `kmsnet ca serve` answers it): the newest CRL the lab CA issued."""

    def __init__(self, ca: LabCA) -> None:
        self.ca = ca
        self.crl: bytes | None = None
        self.fetches = 0
        self._server: Server | None = None

    @property
    def url(self) -> str:
        """Where the nodes reach it."""
        assert self._server is not None
        return f"http://127.0.0.1:{next(iter(self._server.sockets)).getsockname()[1]}"

    async def __aenter__(self) -> CaEndpoint:
        self._server = await serve(self._never, "127.0.0.1", 0, process_request=self._http)
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _never(self, ws: ServerConnection) -> None:
        await ws.close()

    def _http(self, connection: ServerConnection, request: Request) -> Response:
        if request.path != "/crl" or self.crl is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        self.fetches += 1
        headers = Headers([("Content-Type", "application/pkix-crl"), ("Content-Length", str(len(self.crl)))])
        return Response(HTTPStatus.OK, "OK", headers, self.crl)


@scenario(
    "crl-withholding",
    attack="the relay withholds the CRL that revokes Bob from Alice, to keep her talking to him",
    expected="Alice fetches the CRL from the CA herself once hers is 20 minutes old: revocation delayed at most that",
    story="""Alice and Bob are in a session. The CA revokes Bob (key compromise) and publishes CRL #2,
    valid for an hour; the relay, colluding with whoever holds Bob's key, withholds it from Alice and
    lets Bob stay. Ten minutes on, Alice's newest CRL (#1) is ten minutes old: she has no reason to
    ask, and Bob's messages still reach her — the window a relay can open. At twenty minutes her CRL
    is old enough (the node's `crl_max_age`): her node fetches /crl from the CA over HTTP, verifies
    CRL #2 itself, and tears her session with Bob down; what Bob sends after that is refused.""",
)
async def crl_withholding(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab, CaEndpoint(lab.ca) as ca:
        ca.crl = await lab.publish_crl(valid_for=HOUR)
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        with alice.keystore.transaction():  # what `kmsnet node init --ca URL` records
            alice.keystore.put(NS_NODE, "ca_url", ca.url.encode())
        await lab.open_session(alice, bob)

        ctx.story("the relay withholds every new CRL from Alice; the CA revokes Bob in CRL #2")
        evil.use(FeedControl(withhold=True, recipients=frozenset({"alice"})))
        lab.ca.revoke(bob.enrolled.serial, "key-compromise")
        ca.crl = await lab.publish_crl(valid_for=HOUR)
        await lab.settle()

        lab.advance(timedelta(minutes=10))
        fetched_early = await alice.node.refresh_crl()  # the node's maintenance tick
        held_early = alice.node.revocation.highest_number
        await lab.chat(bob, alice, "still me, 10 minutes on")
        inside_window = "still me, 10 minutes on" in alice.texts("bob")

        lab.advance(DEFAULT_MAX_AGE - timedelta(minutes=10))
        ctx.story(f"{DEFAULT_MAX_AGE.seconds // 60} minutes after CRL #1: Alice's node asks the CA itself")
        fetched = await alice.node.refresh_crl()
        held = alice.node.revocation.highest_number
        ctx.timeline.add(Kind.NOTICE, "alice", f"alice fetched /crl from the CA: CRL #{held}")
        await lab.until(lambda: bool(alice.notices("peer_revoked")), "Alice tears down her session with Bob")
        await lab.say(bob, "alice", "still me, 20 minutes on")
        await lab.settle()

        ctx.check("at 10 minutes Alice had no reason to ask the CA (CRL #1 still young)", (False, 1),
                  (fetched_early, held_early))  # fmt: skip
        ctx.check("inside the window, Bob's message still reached Alice (the bound is honest)", True, inside_window)
        ctx.check("at 20 minutes Alice fetched CRL #2 from the CA directly", (True, 2),
                  (fetched, alice.node.revocation.highest_number))  # fmt: skip
        ctx.check("Alice tore down her session with Bob", 1, len(alice.notices("peer_revoked")))
        ctx.check("Bob's message after the fetch accepted", False, "still me, 20 minutes on" in alice.texts("bob"))
        ctx.check("requests Alice made to the CA", 1, ca.fetches)
        ctx.figure("revocation delayed by the relay at most (minutes)", DEFAULT_MAX_AGE.seconds // 60)
        ctx.conclude(
            f"CRL #2 withheld by the relay; Alice fetched it from the CA at {DEFAULT_MAX_AGE.seconds // 60} min "
            f"({ca.fetches} request) and refused Bob from then on"
        )
