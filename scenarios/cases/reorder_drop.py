"""reorder-drop: the relay reorders and drops; out-of-order messages decrypt, gaps are reported."""

from __future__ import annotations

from node.hazmat import stored_sessions
from scenarios.attacker import MaliciousRelay, Shuffle, messages
from scenarios.registry import Context, scenario

COUNT = 30
DROPPED = frozenset({5, 12, 20})
#: Message i is held back and released right after message j.
HELD = {3: 6, 10: 11, 25: 30}


@scenario(
    "reorder-drop",
    attack="the relay reorders and drops envelopes",
    expected="out-of-order messages decrypt; gaps are reported",
    story="""Alice sends Bob 30 numbered messages. The relay acknowledges all of them to Alice but
    drops messages 5, 12 and 20, and holds back 3 until after 6, 10 until after 11, and 25 until
    the end. The Double Ratchet derives the keys of skipped message numbers and keeps them (up to
    a bound), so late messages still decrypt; the keys kept for numbers that never arrive are the
    gaps, which Bob's session reports. Nothing else is lost and nothing is accepted twice.""",
)
async def reorder_drop(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        await lab.open_session(alice, bob)

        ctx.story(
            f"the relay drops messages {sorted(DROPPED)} and delays "
            f"{', '.join(f'{i} past {j}' for i, j in HELD.items())}"
        )
        evil.use(Shuffle(messages("alice", "bob"), drop=DROPPED, hold=dict(HELD)))
        texts = [f"#{i}" for i in range(1, COUNT + 1)]
        for text in texts:
            await lab.say(alice, "bob", text, detail=True)
        arriving = COUNT - len(DROPPED)
        await lab.until(lambda: len(bob.texts("alice")) >= 1 + arriving, f"Bob has the {arriving} messages that arrive")
        await lab.settle()

        received = bob.texts("alice")[1:]
        order = [int(t[1:]) for t in received]
        late = [i for k, i in enumerate(order) if any(j > i for j in order[:k])]
        gaps = stored_sessions(bob.keystore)["alice"].ratchet.skipped_count
        missing = sorted(set(range(1, COUNT + 1)) - set(order))
        ctx.check("messages that arrived and decrypted", arriving, len(received))
        ctx.check("late messages accepted out of order", sorted(HELD), sorted(late))
        ctx.check("missing messages (the gaps)", sorted(DROPPED), missing)
        ctx.check("gaps Bob's session reports (skipped keys kept)", len(DROPPED), gaps)
        ctx.check("messages accepted twice", 0, len(received) - len(set(received)))
        ctx.check("refusals (nothing was forged)", 0, len(bob.refusals()))
        ctx.figure("arrival order", order)
        ctx.conclude(
            f"{len(received)} of {COUNT} delivered, {len(late)} of them out of order and decrypted; "
            f"gaps at {', '.join(map(str, missing))} reported ({gaps} skipped keys held)"
        )
