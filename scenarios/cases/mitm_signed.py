"""mitm-signed: the man in the middle against kmsnet's signed handshake; refused at session start."""

from __future__ import annotations

from scenarios.attacker import Credentials, MaliciousRelay
from scenarios.cases._middle import attempt_middle, check_middle_failed
from scenarios.registry import Context, scenario


@scenario(
    "mitm-signed",
    attack="the relay swaps keys in kmsnet's signed hybrid handshake",
    expected="refused at session start; no plaintext leaks",
    story="""The same attacker as in mitm-unsigned, now against the default suite. Alice and Bob hold
    certificates from the CA they pinned, and the attacker can show those certificates, but it does
    not hold their identity keys. Its prekeys in Bob's bundle are not signed by Bob's key, so Alice
    refuses the bundle; its INIT claiming to be Alice carries a transcript signature that is not
    Alice's, so Bob refuses it before deriving any key. No session is ever keyed by the attacker:
    it reads nothing and can put no word in anyone's mouth.""",
)
async def mitm_signed(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        pose_as = {
            "alice": Credentials.claimed(alice.enrolled.certificate),
            "bob": Credentials.claimed(bob.enrolled.certificate),
        }
        await attempt_middle(ctx, lab, evil, alice, bob, pose_as)
        check_middle_failed(ctx, lab, evil, alice, bob, "bad_signature")
