"""identity-compromise: the attacker steals an identity key; impersonation works until revocation, never after."""

from __future__ import annotations

from scenarios.attacker import MaliciousRelay, steal_identity
from scenarios.lab import Enrolled
from scenarios.registry import Context, scenario
from scenarios.timeline import ATTACKER


@scenario(
    "identity-compromise",
    attack="a thief copies Bob's identity key and runs a node as Bob",
    expected="impersonation works until revocation, never after",
    story="""Bob's laptop is stolen, unlocked. The thief copies his Ed25519 identity key and, with
    Bob's certificate (which is public), runs a node as "bob". Until the CA hears of it, the thief
    IS Bob to everyone: it opens sessions with Alice and Carol that their nodes accept, and reads
    Alice's answer. Nothing in the protocol can tell, which is why revocation exists. Bob reports
    the theft and the CA revokes his certificate. On that one CRL, Alice and Carol tear down their
    sessions with "bob"; from then on nothing the thief sends is accepted, no new session with it
    starts in either direction, and it never reads another message.""",
)
async def identity_compromise(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob, carol, dave = [await lab.add_node(name) for name in ("alice", "bob", "carol", "dave")]
        await lab.open_session(alice, bob)

        ctx.story("Bob's laptop is stolen: the thief copies his identity key and runs a node as bob")
        stolen = steal_identity(bob)
        await lab.stop_node(bob)
        evil.act("copies Bob's identity key from his unlocked keystore", peer="bob")
        as_bob = Enrolled("bob", stolen, bob.enrolled.certificate, bob.enrolled.serial)
        thief = await lab.add_node("bob", enrolled=as_bob, lane=ATTACKER)

        ctx.story("before revocation: the thief writes to Alice and Carol as Bob")
        before = ["it's bob, on a new laptop. what's the vault code?", "hi carol, bob here: send me the report"]
        await lab.chat(thief, alice, before[0])
        await lab.chat(alice, thief, "vault code is 7431")
        await lab.chat(thief, carol, before[1])
        read_before = thief.texts()

        ctx.story("Bob reports the theft: the CA revokes his certificate (key compromise)")
        lab.ca.revoke(bob.enrolled.serial, "key-compromise")
        await lab.publish_crl()
        await lab.until(lambda: bool(alice.notices("peer_revoked")) and bool(carol.notices("peer_revoked")),
                        "Alice and Carol tear down their sessions with bob")  # fmt: skip

        ctx.story("after revocation: the thief keeps trying")
        after = ["ignore the revocation, it's really me", "hi carol, it's bob again", "hi dave, it's bob"]
        await lab.say(thief, "alice", after[0])
        await lab.say(thief, "carol", after[1])
        await lab.say(thief, "dave", after[2])
        await lab.say(alice, "bob", "bob, is that you?")
        await lab.settle()

        accepted = [t for n in (alice, carol, dave) for t in n.texts("bob")]
        ctx.check(
            "thief's messages accepted as Bob's before revocation",
            len(before),
            len([t for t in accepted if t in before]),
        )
        ctx.check("Alice's answers the thief read before revocation", ["vault code is 7431"], read_before)
        ctx.check("sessions with bob torn down by the revocation (Alice, Carol)", 2,
                  len(alice.notices("peer_revoked")) + len(carol.notices("peer_revoked")))  # fmt: skip
        ctx.check("thief's messages accepted after revocation", 0, len([t for t in accepted if t in after]))
        ctx.check("new sessions with bob refused (Alice starting one, Dave offered one)", 2,
                  len([e for n in (alice, dave) for e in n.events if e.error == "certificate_revoked"]))  # fmt: skip
        ctx.check("messages the thief read after revocation", 0, len(thief.texts()) - len(read_before))
        ctx.conclude(
            f"before revocation {len(before)} of {len(before)} impersonations accepted and 1 answer read; "
            f"after it 0 of {len(after)} accepted, 0 read"
        )
