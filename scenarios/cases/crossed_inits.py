"""crossed-inits: both sides start a session at once and talk before either INIT lands; nothing is lost."""

from __future__ import annotations

from dataclasses import dataclass, field

from node.hazmat import live_session
from scenarios.attacker import Captured, MaliciousRelay, Tactic
from scenarios.registry import Context, scenario


@dataclass
class HoldUntil(Tactic):
    """Hold back every envelope from `sender` to `to` until the `release`-th one arrives, then store
    the held ones first, in order: a slow network, not a forgery."""

    sender: str
    to: str
    release: int
    _held: list[bytes] = field(default_factory=list, init=False)

    def send(self, relay: MaliciousRelay, envelope: Captured, payloads: list[bytes]) -> list[bytes]:
        if (envelope.sender, envelope.to) != (self.sender, self.to):
            return payloads
        if len(self._held) + 1 < self.release:
            relay.act(f"holds back {envelope.describe()}", peer=envelope.to)
            self._held.extend(payloads)
            return []
        held, self._held = self._held, []
        if held:
            relay.act(f"releases {len(held)} held envelope(s) ahead of {envelope.describe()}", peer=envelope.to)
        return [*held, *payloads]


@scenario(
    "crossed-inits",
    attack="both sides start a session at once; the network holds one side's INIT until the other's is through",
    expected="both settle on one session; every message arrives once",
    story="""Alice writes to Bob twice; the network holds her INIT and her second message back. Bob,
    who has not heard from her, starts his own session and writes twice: his INIT crosses hers.
    Both INITs are valid. Each session carries the signed creation time of its INIT; the fresher
    one (Bob's) becomes both sides' current session, the other is archived, not thrown away: Alice's
    messages on her own session still decrypt at Bob, exactly once, and from then on both talk on
    Bob's. Before, a 30-second tie-break refused one INIT and the messages in it and after it were
    lost; after a restart both sides could end up on each other's sessions for good.""",
)
async def crossed_inits(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        evil.use(HoldUntil("alice", "bob", release=3))
        ctx.story("Alice starts a session and writes twice; the network holds both envelopes")
        for text in ("a1: are you there?", "a2: the meeting is at 10"):
            await lab.say(alice, "bob", text)
        ctx.story("Bob has heard nothing: he starts his own session and writes twice")
        for text in ("b1: hello Alice", "b2: call me"):
            await lab.chat(bob, alice, text)
        ctx.story("Alice writes again: the network lets her held envelopes through first")
        await lab.say(alice, "bob", "a3: see you")
        await lab.until(lambda: len(bob.texts("alice")) >= 3 or bool(bob.refusals()), "Bob has Alice's three")
        await lab.chat(bob, alice, "b3: see you")
        await lab.settle()

        ours, theirs = live_session(alice.node, "bob"), live_session(bob.node, "alice")
        same = ours is not None and theirs is not None and ours.transcript == theirs.transcript
        ctx.check("Alice's messages Bob received, in order, once", ["a1", "a2", "a3"], _tags(bob.texts("alice")))
        ctx.check("Bob's messages Alice received, in order, once", ["b1", "b2", "b3"], _tags(alice.texts("bob")))
        ctx.check("messages refused on either side", 0, len(alice.refusals()) + len(bob.refusals()))
        ctx.check("both sides on the same current session", True, same)
        ctx.conclude(
            f"INITs crossed; {len(bob.texts('alice'))} + {len(alice.texts('bob'))} messages delivered once each, "
            f"{len(alice.refusals()) + len(bob.refusals())} refused; one session both ways"
        )


def _tags(texts: list[str]) -> list[str]:
    return [text.split(":", 1)[0] for text in texts]
