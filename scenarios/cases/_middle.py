"""The man-in-the-middle play shared by mitm-signed and rogue-ca: the same attacker, two ways to
claim an identity, the same defences expected to stop it."""

from __future__ import annotations

from protocol.messages import Suite
from scenarios.attacker import Credentials, MaliciousRelay, Mitm
from scenarios.lab import Lab, LabNode
from scenarios.registry import Context
from scenarios.timeline import count


async def attempt_middle(
    ctx: Context, lab: Lab, evil: MaliciousRelay, alice: LabNode, bob: LabNode, pose_as: dict[str, Credentials]
) -> Mitm:
    """Two attempts to get between Alice and Bob in the signed hybrid handshake, then an honest relay.

    1. Bob's bundle carries the attacker's prekeys (signed as `pose_as["bob"]` can sign), and the
       attacker answers Alice's INIT and starts its own with Bob: a full man in the middle.
    2. Bob's real bundle reaches Alice; the attacker lets her INIT through and slips its own behind
       it, posing as her (signed as `pose_as["alice"]` can sign), to take over the session it
       opens, and listens for Bob's answer.
    """
    mitm = Mitm(
        "alice", "bob", pose_as, root=lab.ca.root, clock=lab.clock, suite=Suite.HYBRID,
        swap_for=frozenset({"alice"}), forge_from=frozenset({"alice"}),
    )  # fmt: skip
    ctx.story("attempt 1: the relay puts its own prekeys in Bob's bundle, to answer Alice's INIT itself")
    evil.use(mitm)
    await lab.say(alice, "bob", "hello bob, it's alice")
    await lab.settle()
    ctx.story("attempt 2: Bob's real bundle goes through; the relay slips its own INIT, posing as Alice, behind hers")
    mitm.swap_for = frozenset()
    mitm.keep_original = True
    await lab.say(alice, "bob", "hello bob, second try")
    await lab.settle()
    ctx.story("Bob writes to Alice (through the relay, still attacking)")
    await lab.say(bob, "alice", "hi alice, did you write?")
    await lab.settle()
    ctx.story("the relay gives up and forwards honestly")
    evil.honest()
    await lab.say(alice, "bob", "yes, that was me")
    await lab.wait_for(lambda: "yes, that was me" in bob.texts("alice"))
    await lab.settle()
    return mitm


def check_middle_failed(ctx: Context, lab: Lab, evil: MaliciousRelay, alice: LabNode, bob: LabNode, why: str) -> None:
    """The outcome both scenarios assert: refused at session start, nothing leaked or forged."""
    refused_by_alice = [e for e in alice.refusals("session_refused") if e.error == why]
    refused_by_bob = [e for e in bob.events if e.error == why]
    forged = lab.forged(alice) + lab.forged(bob)
    sent = len([s for s in lab.sent if s.ok])
    because = why.replace("_", " ")
    ctx.check(f"Alice refused the substituted bundle at session start ({because})", 1, len(refused_by_alice))
    ctx.check(f"Bob refused the forged INIT at session start ({because})", 1, len(refused_by_bob))
    ctx.check("plaintexts the attacker read", 0, len(evil.leaks))
    ctx.check("messages accepted that the claimed sender never wrote", 0, len(forged))
    ctx.check("Alice and Bob talk once the relay is honest", True, "yes, that was me" in bob.texts("alice"))
    refused = min(1, len(refused_by_alice)) + min(1, len(refused_by_bob))
    ctx.conclude(
        f"{refused} of 2 session starts refused ({because}); the attacker read {len(evil.leaks)} of "
        f"{count(sent, 'message')} and got {count(len(forged), 'forged message')} accepted"
    )
