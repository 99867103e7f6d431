"""feed-rollback: the relay replays an older CRL; refused as rollback, also after a restart."""

from __future__ import annotations

from scenarios.attacker import FeedControl, MaliciousRelay
from scenarios.registry import Context, scenario


@scenario(
    "feed-rollback",
    attack="the relay pushes an old CRL, from before Mallory's revocation, in place of new ones",
    expected="refused as rollback",
    story="""Mallory's certificate is revoked in CRL #2, and every node holds CRL #2. Mallory, still
    connected, gets the relay to help her: from now on it pushes CRL #1, signed by the CA and
    perfectly valid but older, in place of every new CRL, hoping to un-revoke her. Each CRL carries
    a number that may never go backwards, and a node keeps (and persists) the highest it has
    accepted. So Alice and Bob refuse CRL #1 as a rollback, Alice does so again after a restart from
    her keystore, and Mallory's attempt to open a session with Alice is refused.""",
)
async def feed_rollback(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        old = await lab.publish_crl()
        alice, bob, mallory = [await lab.add_node(name) for name in ("alice", "bob", "mallory")]
        ctx.story("Mallory is revoked for key compromise: CRL #2")
        lab.ca.revoke(mallory.enrolled.serial, "key-compromise")
        await lab.publish_crl()
        await lab.until(lambda: alice.node.revocation.highest_number == 2 == bob.node.revocation.highest_number,
                        "Alice and Bob hold CRL #2")  # fmt: skip

        ctx.story("the relay replaces every new CRL by the old CRL #1 for Alice and Bob")
        evil.use(FeedControl(substitute=old, recipients=frozenset({"alice", "bob"})))
        await lab.publish_crl()
        await lab.until(lambda: len(alice.refusals("crl_rollback")) + len(bob.refusals("crl_rollback")) >= 2,
                        "Alice and Bob have answered the old CRL")  # fmt: skip
        ctx.story("Alice's node restarts from its keystore; the relay pushes CRL #1 again on connect")
        before = len(alice.refusals("crl_rollback"))
        await lab.restart_node(alice)
        await lab.until(lambda: len(alice.refusals("crl_rollback")) > before, "Alice has answered the old CRL again")
        held = (alice.node.revocation.highest_number, bob.node.revocation.highest_number)
        ctx.story("Mallory tries to open a session with Alice")
        await lab.say(mallory, "alice", "hi alice, it's mallory, I'm fine now")
        await lab.settle()

        rollbacks = len(alice.refusals("crl_rollback")) + len(bob.refusals("crl_rollback"))
        ctx.check("old CRL refused as a rollback (Alice, Bob, Alice after restart)", 3, rollbacks)
        ctx.check("CRL numbers Alice and Bob hold", (2, 2), held)
        ctx.check("Mallory's session refused by Alice (certificate revoked)", 1,
                  len([e for e in alice.events if e.error == "certificate_revoked"]))  # fmt: skip
        ctx.check("messages from Mallory Alice accepted", 0, len(alice.texts("mallory")))
        ctx.conclude(f"{rollbacks} of 3 rollbacks refused (one after a restart); Mallory stays revoked")
