"""skip-flood: headers claim huge message numbers; the node refuses with bounded work and stays up."""

from __future__ import annotations

import os
import time
from dataclasses import replace

from node.eventbudget import BURST
from protocol import wire
from protocol.keyschedule import kdf_ck
from protocol.messages import MAX_U32, RatchetMessage
from protocol.ratchet import MAX_SKIP
from scenarios.attacker import Captured, MaliciousRelay, Rewrite, messages
from scenarios.registry import Context, scenario
from scenarios.timeline import Kind

#: Forged frames of each kind the relay sends.
EACH = 40
#: Ceiling on Bob's average time per forged frame (milliseconds), network and disk included.
BOUND_MS = 25.0


def floods(msg: RatchetMessage) -> list[RatchetMessage]:
    """Four kinds of lie, EACH of every kind, from one genuine frame of the current chain."""
    random_dh = [os.urandom(32) for _ in range(EACH)]
    return [
        *(replace(msg, n=MAX_U32 - i) for i in range(EACH)),  # the current chain, 2^32-1 ahead
        *(replace(msg, dh=dh, n=MAX_U32) for dh in random_dh),  # a "new chain" starting at 2^32-1
        *(replace(msg, dh=dh, pn=MAX_U32, n=0) for dh in random_dh),  # the old chain "was" 2^32-1 long
        *(replace(msg, n=msg.n + MAX_SKIP - i) for i in range(EACH)),  # just inside the bound: the worst allowed
    ]


def flood(envelope: Captured) -> list[bytes]:
    """The genuine frame, then the flood."""
    msg = envelope.message
    assert msg is not None
    return [envelope.payload, *(wire.encode(m) for m in floods(msg))]


@scenario(
    "skip-flood",
    attack="the relay rewrites headers to claim huge message numbers (up to 2^32-1)",
    expected="bounded work; the node stays up",
    story="""A message header says which message of which chain it is, in clear. To decrypt message n
    a receiver must step the chain n times, keeping the skipped keys for late messages, so a header
    claiming n = 4,294,967,295 would have a naive receiver hash for hours and store billions of keys.
    The relay sends Bob 160 such frames: huge numbers on the current chain, on a made-up new chain,
    in the previous-chain length, and 40 that skip exactly the allowed maximum of 1,000. Bob refuses
    each after at most 1,001 chain steps, before any state changes, and then reads Alice's next
    message as usual.""",
)
async def skip_flood(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        await lab.open_session(alice, bob)
        total = 4 * EACH
        ctx.story(f"behind Alice's next message the relay sends {total} frames with forged headers")
        evil.use(Rewrite(messages("alice", "bob"), flood, f"sent {total} forged headers behind"))
        started = time.monotonic()
        await lab.say(alice, "bob", "one genuine message")
        evil.honest()
        # Bob records at most a few refusals per kind and minute (node/eventbudget.py) and counts the rest.
        budget = bob.node.event_budget

        def refused() -> int:
            return len(bob.refusals()) + budget.left_out

        await lab.until(lambda: refused() >= total, f"Bob has refused all {total} forged frames")
        spent = time.monotonic() - started
        await lab.chat(alice, bob, "still there?")
        await lab.settle()

        too_many = len(bob.refusals("too_many_skipped")) + budget.left_out_by.get("too_many_skipped", 0)
        bounded = len(bob.refusals("authentication_failed")) + budget.left_out_by.get("authentication_failed", 0)
        per_frame_ms = 1000 * spent / total
        steps = 100_000
        clock = time.perf_counter()
        chain = bytes(32)
        for _ in range(steps):
            chain, _ = kdf_ck(chain)
        naive_hours = (time.perf_counter() - clock) / steps * MAX_U32 / 3600
        ctx.timeline.add(
            Kind.STORY, "lab",
            f"Bob refused {total} frames in {spent * 1000:.0f} ms ({per_frame_ms:.2f} ms each); honouring one "
            f"header of 2^32-1 would take about {naive_hours:.1f} h of hashing",
        )  # fmt: skip
        ctx.check("huge skips refused before any work (too many skipped)", 3 * EACH, too_many)
        ctx.check("maximal allowed skips refused after bounded work (authentication failed)", EACH, bounded)
        ctx.check("refusals Bob recorded (the rest counted, coalesced)", True, len(bob.refusals()) <= 2 * BURST)
        ctx.check(f"average time per forged frame under {BOUND_MS:g} ms", True, per_frame_ms < BOUND_MS)
        ctx.check("genuine messages delivered", ["one genuine message", "still there?"], bob.texts("alice")[1:])
        ctx.check("Bob's node still connected", True, bob.node.connected)
        ctx.figure("forged frames", total)
        ctx.figure("ms per forged frame", round(per_frame_ms, 3))
        ctx.figure("hours a naive receiver would hash for one header", round(naive_hours, 1))
        ctx.conclude(
            f"{too_many + bounded} of {total} forged headers refused in {spent * 1000:.0f} ms "
            f"({per_frame_ms:.2f} ms each, bound {BOUND_MS:g}); the node stayed up"
        )
