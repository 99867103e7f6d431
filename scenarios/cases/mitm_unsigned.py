"""mitm-unsigned: a malicious relay swaps keys in an unsigned ECDH handshake and reads everything."""

from __future__ import annotations

from typing import Any

from protocol.messages import Suite
from scenarios.attacker import Credentials, MaliciousRelay, Mitm
from scenarios.registry import Context, scenario

ROUNDS = 5
UNSIGNED: dict[str, Any] = {
    "suite": Suite.INSECURE_UNSIGNED,
    "accept_suites": (Suite.INSECURE_UNSIGNED,),
    "publish_kem": False,
}


@scenario(
    "mitm-unsigned",
    attack="the relay swaps keys in an unsigned ECDH handshake (suite 0x7F, test-only)",
    expected="attacker reads every message: this is why signatures matter",
    story="""Alice and Bob are configured with the insecure test suite: X25519 without any signature
    over the prekeys or the handshake. Their certificates are still real and still checked. The
    relay hands Alice its own prekeys inside Bob's bundle, answers her INIT itself, starts its own
    session with Bob as "Alice", and from then on decrypts, reads and re-encrypts every message in
    both directions. Neither node notices anything: every message arrives, and the safety numbers
    they would compare out of band still match, since they are computed from the identity keys,
    which this handshake never uses. The attacker's reading is real decryption with its own keys.""",
)
async def mitm_unsigned(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice", **UNSIGNED), await lab.add_node("bob", **UNSIGNED)
        ctx.story("the relay sits in the middle: its own prekeys in both bundles, its own INIT to each side")
        evil.use(
            Mitm(
                "alice",
                "bob",
                {
                    "alice": Credentials.claimed(alice.enrolled.certificate),
                    "bob": Credentials.claimed(bob.enrolled.certificate),
                },
                root=lab.ca.root,
                clock=lab.clock,
                suite=Suite.INSECURE_UNSIGNED,
                swap_for=frozenset({"alice", "bob"}),
                forge_from=frozenset({"alice", "bob"}),
            )
        )
        for i in range(1, ROUNDS + 1):
            await lab.chat(alice, bob, f"alice #{i}: the door code is {1000 + i}")
            await lab.chat(bob, alice, f"bob #{i}: got it, {1000 + i}")
        await lab.settle()

        sent = [s.text for s in lab.sent if s.ok]
        read = [text for _, _, text in evil.leaks]
        numbers = {lab_node.name: lab_node.node.status()["sessions"][0]["safety_number"] for lab_node in (alice, bob)}
        ctx.check("messages sent", 2 * ROUNDS, len(sent))
        ctx.check("messages the attacker decrypted and read", sent, read)
        ctx.check("messages delivered (the victims notice nothing)", 2 * ROUNDS, len(alice.texts()) + len(bob.texts()))
        ctx.check("refusals or warnings at either node", 0, len(alice.refusals()) + len(bob.refusals()))
        ctx.check(
            "safety numbers still match (comparing them would not help)", True, numbers["alice"] == numbers["bob"]
        )
        ctx.conclude(f"the attacker read {len(read)} of {len(sent)} messages; the nodes saw no sign of it")
