"""init-swap: the relay swaps the message inside Alice's INIT for her next one; refused, and said."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from protocol import wire
from scenarios.attacker import Captured, MaliciousRelay, Tactic
from scenarios.registry import Context, scenario


@dataclass
class SwapMessage0(Tactic):
    """Hold Alice's INIT until her next message, then put that message inside the INIT in place of
    message 0 (the INIT's signature does not cover it) and drop the separate copy."""

    sender: str
    to: str
    held: list[Captured] = field(default_factory=list)
    swapped: int = 0

    def send(self, relay: MaliciousRelay, envelope: Captured, payloads: list[bytes]) -> list[bytes]:
        if (envelope.sender, envelope.to) != (self.sender, self.to) or self.swapped:
            return payloads
        if envelope.init is not None and not self.held:
            relay.act("holds Alice's INIT", peer=envelope.to)
            self.held.append(envelope)
            return []
        if self.held and envelope.message is not None:
            init = self.held[0].init
            assert init is not None
            self.swapped += 1
            relay.act(f"puts {envelope.describe()} inside the INIT in place of message 0", peer=envelope.to)
            return [wire.encode(replace(init, message=envelope.payload))]
        return payloads


@scenario(
    "init-swap",
    attack="the relay swaps message 0 inside an INIT for a later message of the same chain",
    expected="the INIT is refused (not message 0) and Bob is told; nothing is shown out of place",
    story="""Message 0 travels inside the INIT, which the initiator signs; the message itself is
    authenticated by its own AES-GCM tag, not by the signature. Alice's second message belongs to
    the same chain and decrypts under the same session, so a relay that puts it into the INIT in
    place of message 0 had Bob accept it as the first, and refuse the real message 0 later as a
    replay: nobody was told. Now an INIT must carry message 0 exactly (header EK, 0, 0): Bob refuses
    the swapped INIT and says so. Alice's messages on the session Bob never got stop authenticating;
    after three, Bob starts a new handshake by himself and the conversation goes on.""",
)
async def init_swap(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        swap = SwapMessage0("alice", "bob")
        evil.use(swap)
        ctx.story("Alice starts a session and writes twice; the relay swaps her second message into the INIT")
        await lab.say(alice, "bob", "first: hello Bob")
        await lab.say(alice, "bob", "second: pay the invoice")
        await lab.until(lambda: bool(bob.refusals()) or bool(bob.texts("alice")), "Bob has the INIT")
        ctx.story("Alice writes on; Bob cannot read her session and starts a new one by himself")
        for i in range(4):
            await lab.say(alice, "bob", f"more {i}")
        await lab.wait_for(lambda: bool(bob.notices("session_reset")), timeout=5)
        await lab.chat(bob, alice, "after: I could not read you")
        await lab.chat(alice, bob, "after: now you can")
        await lab.settle()

        texts = bob.texts("alice")
        ctx.check("INITs swapped by the relay", 1, swap.swapped)
        ctx.check("the swapped INIT refused (not message 0)", 1, len(bob.refusals("handshake_error")))
        ctx.check("the swapped-in message shown to Bob as the first", 0, texts.count("second: pay the invoice"))
        ctx.check("Bob started a new handshake by himself", 1, len(bob.notices("session_reset")))
        ctx.check("the conversation after it", ["after: now you can"], [t for t in texts if t.startswith("after")])
        ctx.conclude(
            f"swapped INIT refused and reported ({len(bob.refusals('handshake_error'))}); "
            f"{texts.count('second: pay the invoice')} messages shown out of place; the conversation recovered"
        )
