"""tamper: the relay flips bits in envelopes; every tampered message is refused and reported, the rest arrive."""

from __future__ import annotations

from scenarios.attacker import Captured, FlipBit, MaliciousRelay, messages
from scenarios.registry import Context, scenario

COUNT = 20
#: Message numbers (1-based) whose ciphertext the relay flips a bit in.
TAMPERED = frozenset({3, 7, 11, 15, 19})


@scenario(
    "tamper",
    attack="the relay flips one bit in some envelopes",
    expected="every tampered message refused and reported; the rest delivered",
    story="""Alice and Bob have a session. Alice sends Bob 20 numbered messages. The relay flips a
    single bit in the ciphertext of messages 3, 7, 11, 15 and 19. AES-256-GCM authenticates every
    byte of the ciphertext and of the header (with the session transcript) under a key used once,
    so Bob's node must refuse exactly those five, report each as a security event, and still take
    every other message: a refused frame leaves the ratchet as it was.""",
)
async def tamper(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        await lab.open_session(alice, bob)

        ctx.story(f"the relay flips a bit in messages {sorted(TAMPERED)} of the {COUNT} Alice sends")
        alice_to_bob = messages("alice", "bob")

        def chosen(envelope: Captured) -> bool:
            # Read off the clear header: Bob's "hi" made Alice step her ratchet, so message k of
            # this fresh chain has n = k - 1.
            return alice_to_bob(envelope) and envelope.message is not None and envelope.message.n + 1 in TAMPERED

        evil.use(FlipBit(chosen))
        texts = [f"message {i} of {COUNT}" for i in range(1, COUNT + 1)]
        for text in texts:
            await lab.say(alice, "bob", text, detail=True)
        intact = [t for i, t in enumerate(texts, 1) if i not in TAMPERED]
        await lab.until(lambda: len(bob.refusals()) >= len(TAMPERED) and set(intact) <= set(bob.texts("alice")),
                        "Bob has handled all 20")  # fmt: skip
        evil.honest()
        await lab.chat(bob, alice, "still here?")
        await lab.settle()

        refused = bob.refusals()
        ctx.check("tampered messages refused", len(TAMPERED), len(refused))
        ctx.check("refused as failed authentication", len(TAMPERED), len(bob.refusals("authentication_failed")))
        received = bob.texts("alice")[1:]
        ctx.check("untampered messages delivered, in order", intact, received)
        ctx.check("tampered messages that reached Bob's application", 0, len(set(received) - set(intact)))
        ctx.check("the session survives (Bob's reply arrives)", True, "still here?" in alice.texts("bob"))
        ctx.conclude(
            f"{len(refused)} of {len(TAMPERED)} tampered messages refused and reported; "
            f"{len(received)} of {COUNT - len(TAMPERED)} intact ones delivered"
        )
