"""stale-feed: the relay withholds new CRLs; the node notices at nextUpdate and fails closed."""

from __future__ import annotations

from datetime import timedelta

from scenarios.attacker import FeedControl, MaliciousRelay
from scenarios.registry import Context, scenario

HOUR = timedelta(hours=1)


@scenario(
    "stale-feed",
    attack="the relay withholds every new CRL from Alice",
    expected="Alice notices at nextUpdate and fails closed",
    story="""CRLs here promise a successor within an hour (nextUpdate). The relay stops passing new
    CRLs to Alice, hoping she keeps trusting a certificate that was revoked in the meantime. Until
    her CRL's nextUpdate, nothing is wrong and sessions start as usual. Once it has passed (plus
    five minutes of allowed clock skew) her feed is stale: she refuses to start any new session and
    refuses every new session offered to her, whoever it is with. Sessions already established go
    on, as the protocol specifies. When a fresh CRL finally reaches her, she recovers.""",
)
async def stale_feed(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl(valid_for=HOUR)
        names = ("alice", "bob", "carol", "dave")
        alice, bob, carol, dave = [await lab.add_node(name) for name in names]
        await lab.open_session(alice, bob)

        ctx.story("the relay starts withholding new CRLs from Alice")
        evil.use(FeedControl(withhold=True, recipients=frozenset({"alice"})))
        lab.advance(timedelta(minutes=30))
        await lab.publish_crl(valid_for=HOUR)
        lab.advance(timedelta(minutes=40))
        feed = alice.node.status()["feed"]
        state = "stale" if feed["stale"] else "still fresh"
        ctx.story(f"70 minutes in: Alice's CRL #{feed['crl_number']} is past its nextUpdate ({state})")

        await lab.say(alice, "carol", "hi carol")
        await lab.say(dave, "alice", "hi alice, it's dave")
        await lab.chat(alice, bob, "our session still works")
        await lab.settle()
        refused_start = [e for e in alice.refusals("session_refused") if e.error == "stale_feed"]
        refused_offer = [e for e in alice.refusals() if e.peer == "dave" and e.error == "stale_feed"]
        accepted_while_stale = len(carol.texts("alice")) + len(alice.texts("dave"))

        ctx.story("the relay stops withholding; the CA publishes CRL #3")
        evil.honest()
        await lab.publish_crl(valid_for=HOUR)
        await lab.until(lambda: alice.node.revocation.highest_number == 3, "Alice holds CRL #3")
        await lab.say(alice, "carol", "hi again, carol")
        recovered = await lab.wait_for(lambda: "hi again, carol" in carol.texts("alice"))
        await lab.settle()

        ctx.check("Alice saw her feed as stale at nextUpdate + skew", True, feed["stale"])
        ctx.check("Alice refused to start a session on a stale feed (stale feed)", 1, len(refused_start))
        ctx.check("Alice refused a session Dave offered on a stale feed (stale feed)", 1, len(refused_offer))
        ctx.check("messages accepted in new sessions while stale", 0, accepted_while_stale)
        ctx.check("the established session went on (checked at session start only)", True,
                  "our session still works" in bob.texts("alice"))  # fmt: skip
        ctx.check("new sessions work again with a fresh CRL", True, recovered)
        ctx.conclude(
            f"feed stale after nextUpdate: {len(refused_start) + len(refused_offer)} of 2 new sessions refused; "
            f"recovered on CRL #3"
        )
