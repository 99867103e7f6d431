"""harvest-now: record everything now, break X25519 later; hybrid sessions stay safe, classic ones fall."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from node.hazmat import stored_prekeys
from protocol.hazmat import kem_prekey
from protocol.identity import X25519KeyPair
from protocol.messages import InitMessage, Suite
from scenarios.attacker import Captured, MaliciousRelay, StateReader, rebuild_initiator, x25519_keys
from scenarios.lab import Lab, LabNode
from scenarios.registry import Context, scenario
from scenarios.timeline import ReadRow

ROUNDS = 5
CLASSIC: dict[str, Any] = {"suite": Suite.CLASSIC, "accept_suites": (Suite.CLASSIC,), "publish_kem": False}


@scenario(
    "harvest-now",
    attack="a passive attacker records everything today; years later every X25519 key is broken",
    expected="hybrid sessions stay safe; with post-quantum off they fall",
    story="""Alice and Bob talk in the default hybrid suite; Carol and Dave in the classic suite
    (X25519 only, post-quantum off). The relay records every frame and every bundle it hands out.
    Years later the attacker can break X25519: from any public key in the recording it gets the
    private key (the lab simulates that computer with a table of every X25519 private key the four
    nodes ever held, taken from their keystores as the keys came into being; ML-KEM is not broken).
    The attacker then rebuilds each session from the recorded INIT, the bundle and those keys, and
    decrypts what it can. For Carol and Dave that is every message. For Alice and Bob, the root key
    also hashed in an ML-KEM-768 shared secret that no X25519 key gives back, and every later key
    descends from that root: nothing. As a control, the same attack given the ML-KEM secret (which
    only Bob's ML-KEM private key could give) reads the hybrid session too.""",
)
async def harvest_now(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    keys: dict[bytes, X25519KeyPair] = {}
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        carol, dave = await lab.add_node("carol", **CLASSIC), await lab.add_node("dave", **CLASSIC)

        def harvest() -> None:
            for lab_node in lab.nodes.values():
                keys.update(x25519_keys(lab_node))

        harvest()
        ctx.story(f"two conversations of {2 * ROUNDS} messages each: hybrid (Alice, Bob) and classic (Carol, Dave)")
        for a, b in ((alice, bob), (carol, dave)):
            for i in range(1, ROUNDS + 1):
                await lab.chat(a, b, f"{a.name} #{i}: account {4000 + i}", detail=True)
                harvest()
                await lab.chat(b, a, f"{b.name} #{i}: noted {4000 + i}", detail=True)
                harvest()
        await lab.settle()

        lab.advance(timedelta(days=3650))
        ctx.story(f"years later X25519 falls: the attacker recovers {len(keys)} X25519 private keys")
        hybrid = read_later(ctx, lab, evil, keys, alice, bob, "hybrid session")
        classic = read_later(ctx, lab, evil, keys, carol, dave, "classic session")
        init = next(e.init for e in evil.recorded if e.init is not None and e.sender == "alice")
        assert init is not None
        control = attempt(lab, evil, keys, alice, bob, kem_secret_of(bob, init))
        with_kem = len([body for _, body, _ in control if body is not None])

    ctx.check(f"hybrid messages decrypted (of {2 * ROUNDS})", 0, hybrid)
    ctx.check(f"classic messages decrypted (of {2 * ROUNDS})", 2 * ROUNDS, classic)
    ctx.check("control: the same attack given the ML-KEM secret reads the hybrid session", 2 * ROUNDS, with_kem)
    ctx.figure("X25519 private keys the attacker recovered", len(keys))
    ctx.conclude(
        f"hybrid: {hybrid} of {2 * ROUNDS} messages decrypted; classic (post-quantum off): "
        f"{classic} of {2 * ROUNDS} decrypted"
    )


def attempt(
    lab: Lab,
    evil: MaliciousRelay,
    keys: dict[bytes, X25519KeyPair],
    initiator: LabNode,
    responder: LabNode,
    kem_secret: bytes | None,
) -> list[tuple[Captured, bytes | None, str]]:
    """Rebuild the initiator's side of one recorded session from the broken X25519 keys (and a KEM
    secret, if the attacker had one) and read every recorded message of it, in order."""
    recorded = [e for e in evil.recorded if {e.sender, e.to} == {initiator.name, responder.name}]
    init = recorded[0].init
    assert init is not None
    bundle = evil.bundles[(initiator.name, responder.name)]
    ours = [e.message.dh for e in recorded if e.sender == initiator.name and e.message is not None]
    later = list(dict.fromkeys(ours))[1:]  # the ephemeral first, then each new ratchet key, in order
    session = rebuild_initiator(init, bundle, keys=keys, later=later, root=lab.ca.root, kem_secret=kem_secret)
    assert session is not None, "the ephemeral key is in the recording and was broken"
    reader = StateReader(initiator.name, session)
    out = []
    for envelope in recorded:
        assert envelope.message is not None
        out.append((envelope, *reader.read(envelope.sender, envelope.message)))
    return out


def read_later(
    ctx: Context,
    lab: Lab,
    evil: MaliciousRelay,
    keys: dict[bytes, X25519KeyPair],
    initiator: LabNode,
    responder: LabNode,
    label: str,
) -> int:
    """The attack on one session, on the record: each message read or not, and why; the number read."""
    sent = [s for s in lab.sent if {s.sender, s.recipient} == {initiator.name, responder.name}]
    read = 0
    results = attempt(lab, evil, keys, initiator, responder, None)
    for index, ((envelope, body, why), message) in enumerate(zip(results, sent, strict=True), 1):
        if body is not None:
            read += 1
            evil.leak(envelope.sender, envelope.to, body, how=f"{label}, X25519 broken")
        elif initiator.options.suite is Suite.HYBRID:
            why += " (the root key needs the ML-KEM-768 secret)"
        ctx.timeline.table.append(
            ReadRow(index, envelope.sender, envelope.to, message.text, label, body is not None, why)
        )
    return read


def kem_secret_of(responder: LabNode, init: InitMessage) -> bytes:
    """The ML-KEM shared secret of a recorded INIT, from the responder's own ML-KEM prekey (the
    control: what the attacker would need and cannot get from any X25519 key)."""
    assert init.kem_id is not None and init.kem_ciphertext is not None
    prekeys = stored_prekeys(responder.keystore)
    return kem_prekey(prekeys, init.kem_id).decapsulate(init.kem_ciphertext)
