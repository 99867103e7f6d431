"""replay: the relay re-delivers old envelopes and the initial message; all refused as duplicates."""

from __future__ import annotations

from scenarios.attacker import Captured, MaliciousRelay, Replay, messages
from scenarios.registry import Context, scenario

COUNT = 5


@scenario(
    "replay",
    attack="the relay re-delivers old envelopes and the initial message",
    expected="refused as duplicates",
    story="""Alice opens a session with Bob and sends five messages. The relay keeps copies. After
    Alice's next message it stores again, as brand-new envelopes, her INIT and all five messages;
    and it re-delivers two envelopes under their original ids, as a relay recovering from a crash
    would. A redelivery under a known id is acknowledged silently (the node remembers ids it has
    processed); a replay under a fresh id reaches the protocol, which refuses it: the INIT named a
    one-time prekey that is consumed, and each message key was used once and deleted. Bob's
    application must see each message exactly once.""",
)
async def replay(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        await lab.open_session(alice, bob)
        for i in range(1, COUNT + 1):
            await lab.chat(alice, bob, f"transfer {i}: 100 EUR to Carol")

        ctx.story("the relay replays Alice's INIT and her five messages behind her next one, under fresh ids")
        alice_to_bob = messages("alice", "bob")

        def old_traffic(recorded: list[Captured]) -> list[Captured]:
            return [c for c in recorded if c.sender == "alice" and c.to == "bob"]

        evil.use(Replay(lambda e: e.sender == "alice" and e.to == "bob", old_traffic))
        ctx.story("…and re-delivers two of them under their original ids")
        for old in [c for c in evil.recorded if alice_to_bob(c)][:2]:
            evil.inject("bob", "alice", old.payload, msg_id=old.msg_id)
        await lab.chat(alice, bob, "that is all for today")
        expected_refusals = 1 + COUNT
        await lab.until(lambda: len(bob.refusals()) >= expected_refusals, "Bob has refused the replays")
        await lab.settle()

        texts = bob.texts("alice")
        duplicates = len(texts) - len(set(texts))
        ctx.check("replayed INIT refused", 1, len(bob.refusals("replayed_initial_message")))
        ctx.check("replayed messages refused as duplicates", COUNT, len(bob.refusals("replay_refused")))
        ctx.check("re-delivered ids acknowledged silently (no event, no copy)", expected_refusals, len(bob.refusals()))
        ctx.check("messages Bob's application saw twice", 0, duplicates)
        ctx.check("messages Bob's application saw", COUNT + 2, len(texts))
        ctx.conclude(
            f"{len(bob.refusals())} replays refused (1 INIT, {len(bob.refusals('replay_refused'))} messages), "
            f"2 re-deliveries absorbed silently; {duplicates} duplicates reached the application"
        )
