"""stale-init: the relay holds a valid INIT back and delivers it after a newer session exists; refused."""

from __future__ import annotations

from dataclasses import dataclass, field

from node.hazmat import live_session
from scenarios.attacker import Captured, MaliciousRelay, Tactic
from scenarios.registry import Context, scenario

KEPT = "hello Bob (kept by the relay)"


@dataclass
class Withhold(Tactic):
    """Keep the first INIT from `sender` to `to` instead of storing it (the sender is told it was)."""

    sender: str
    to: str
    kept: list[Captured] = field(default_factory=list)

    def send(self, relay: MaliciousRelay, envelope: Captured, payloads: list[bytes]) -> list[bytes]:
        if self.kept or (envelope.sender, envelope.to) != (self.sender, self.to) or envelope.init is None:
            return payloads
        relay.act(f"keeps {envelope.describe()} for later", peer=envelope.to)
        self.kept.append(envelope)
        return []


@scenario(
    "stale-init",
    attack="the relay keeps a valid INIT and delivers it after a newer session exists, to replace it",
    expected="refused as stale; the live session goes on",
    story="""Alice starts a session with Bob; the relay keeps her INIT instead of delivering it. Bob
    starts his own session with Alice a moment later and they talk. Then the relay delivers Alice's
    old INIT: it is valid, signed by Alice, its one-time prekey unused. Before, any verified INIT
    replaced the live session, so the relay chose which session Bob used. Now every INIT carries its
    signed creation time: one older than a session Bob already confirmed is refused before it
    consumes anything, and the conversation goes on untouched.""",
)
async def stale_init(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        withhold = Withhold("alice", "bob")
        evil.use(withhold)
        ctx.story("Alice starts a session; the relay keeps her INIT")
        await lab.say(alice, "bob", KEPT)
        ctx.story("Bob starts his own session a moment later; they talk")
        await lab.chat(bob, alice, "hello Alice")
        await lab.chat(alice, bob, "hi Bob")
        await lab.chat(bob, alice, "how are you?")
        live = live_session(bob.node, "alice")
        ctx.story("the relay delivers Alice's old INIT to Bob")
        for kept in withhold.kept:
            evil.inject("bob", "alice", kept.payload)
        await lab.chat(alice, bob, "fine, thanks")
        await lab.until(
            lambda: bool(bob.refusals()) or KEPT in bob.texts("alice") or live_session(bob.node, "alice") is not live,
            "Bob has the old INIT",
        )
        await lab.chat(bob, alice, "good")
        await lab.chat(alice, bob, "bye")
        await lab.settle()

        ours, theirs = live_session(alice.node, "bob"), live_session(bob.node, "alice")
        ctx.check("INITs the relay kept", 1, len(withhold.kept))
        ctx.check("old INIT refused as stale", 1, len(bob.refusals("stale_init")))
        ctx.check("Bob's session replaced by the old INIT", False, theirs is not live)
        ctx.check("the old INIT's message shown to Bob, late", 0, bob.texts("alice").count(KEPT))
        ctx.check("other refusals", 0, len(alice.refusals()) + len(bob.refusals()) - len(bob.refusals("stale_init")))
        ctx.check(
            "conversation after the attack (Bob has, Alice has)",
            (["hi Bob", "fine, thanks", "bye"], ["hello Alice", "how are you?", "good"]),
            (bob.texts("alice"), alice.texts("bob")),
        )
        ctx.check(
            "both sides on one session",
            True,
            ours is not None and theirs is not None and ours.transcript == theirs.transcript,
        )
        ctx.conclude(
            f"the kept INIT was refused as stale ({len(bob.refusals('stale_init'))}); the live session went on "
            f"({len(bob.texts('alice')) + len(alice.texts('bob'))} messages, none refused)"
        )
