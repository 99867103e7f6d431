"""downgrade: the relay strips the ML-KEM prekey from a bundle (and the suite from an INIT); refused."""

from __future__ import annotations

from dataclasses import replace

from protocol import wire
from protocol.messages import PrekeyBundle, Suite
from scenarios.attacker import BundleSwap, Captured, MaliciousRelay, Rewrite
from scenarios.registry import Context, scenario


def strip_kem(bundle: PrekeyBundle) -> PrekeyBundle:
    """Bob's bundle as if he offered no post-quantum prekey (his signature left as it was)."""
    return replace(bundle, kem_id=None, kem=None)


def classic_init(envelope: Captured) -> list[bytes]:
    """Alice's INIT relabelled as the classic suite, the ML-KEM ciphertext removed; the genuine one
    follows it (refused or not, the relay loses nothing by trying first)."""
    init = envelope.init
    assert init is not None
    return [wire.encode(replace(init, suite=Suite.CLASSIC, kem_id=None, kem_ciphertext=None)), envelope.payload]


@scenario(
    "downgrade",
    attack="the relay strips the ML-KEM prekey from a bundle, then rewrites an INIT to the classic suite",
    expected="refused: the signatures cover it",
    story="""A relay that records traffic today and hopes to break X25519 later wants sessions without
    the post-quantum part. First it removes the ML-KEM prekey from Bob's bundle: the bundle signature
    covers it, so Alice refuses the bundle. Then it lets the bundle through and rewrites Alice's INIT
    to the classic suite, dropping the KEM ciphertext (and sends the genuine one after it). Bob is
    even configured to accept the classic
    suite, but his own bundle offers ML-KEM, so a classic INIT against it is a downgrade and is
    refused (the suite is also under the transcript signature). Every session that does start is
    hybrid.""",
)
async def downgrade(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice = await lab.add_node("alice")
        bob = await lab.add_node("bob", accept_suites=(Suite.HYBRID, Suite.CLASSIC))
        ctx.story("attempt 1: the relay strips the ML-KEM prekey from Bob's bundle")
        swap = BundleSwap("bob", strip_kem, "stripped the ML-KEM prekey", requester="alice")
        evil.use(swap)
        await lab.say(alice, "bob", "hello bob")
        await lab.settle()
        ctx.story("attempt 2: the bundle goes through; the relay rewrites Alice's INIT to the classic suite")
        evil.honest()
        evil.use(
            Rewrite(lambda e: e.init is not None, classic_init, "rewrote the INIT to suite CLASSIC without ML-KEM")
        )
        await lab.say(alice, "bob", "hello bob, second try")
        await lab.settle()
        ctx.story("the relay gives up")
        evil.honest()
        await lab.chat(bob, alice, "hi alice")
        await lab.settle()

        alice_refused = [e for e in alice.refusals("session_refused") if e.error == "bad_signature"]
        bob_refused = [e for e in bob.refusals() if e.error == "suite_error" and "downgrade" in e.reason]
        suites = [e.reason.split("(")[1].split(")")[0] for n in (alice, bob) for e in n.notices("session_established")]
        ctx.check("stripped bundle refused by Alice (bad signature)", 1, len(alice_refused))
        ctx.check("classic INIT refused by Bob as a downgrade (suite error)", 1, len(bob_refused))
        ctx.check("sessions established below the hybrid suite", 0, len([s for s in suites if s != "HYBRID"]))
        ctx.check("the hybrid session works (Bob's answer arrives)", True, "hi alice" in alice.texts("bob"))
        ctx.figure("suites of established sessions", suites)
        ctx.conclude(
            f"{len(alice_refused) + len(bob_refused)} of 2 downgrade attempts refused; "
            f"{len([s for s in suites if s != 'HYBRID'])} sessions below HYBRID"
        )
