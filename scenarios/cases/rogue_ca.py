"""rogue-ca: certificates from a CA nobody pinned; refused."""

from __future__ import annotations

from scenarios.attacker import Credentials, MaliciousRelay
from scenarios.cases._middle import attempt_middle, check_middle_failed
from scenarios.lab import LabCA
from scenarios.registry import Context, scenario


@scenario(
    "rogue-ca",
    attack="the relay presents certificates from a rogue CA (same name, its own key)",
    expected="refused",
    story="""The attacker runs its own CA with exactly the name of the real one and issues itself
    certificates for "alice" and "bob", with keys it holds. Everything it signs is validly signed,
    by the keys in those certificates. It plays the same man in the middle as in mitm-signed. But
    every node pins the real CA's root and checks each peer certificate against it first, so the
    rogue bundle and the rogue INIT are refused as untrusted before any signature matters.""",
)
async def rogue_ca(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        rogue = LabCA(lab.clock, name="kmsnet-lab-ca")
        ctx.story("the attacker's own CA, named like the real one, issues it certificates for alice and bob")
        pose_as = {"alice": Credentials.rogue(rogue.enrol("alice")), "bob": Credentials.rogue(rogue.enrol("bob"))}
        await attempt_middle(ctx, lab, evil, alice, bob, pose_as)
        check_middle_failed(ctx, lab, evil, alice, bob, "untrusted_issuer")
