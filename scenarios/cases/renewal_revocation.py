"""renewal-revocation: a key is stolen, the thief renews, the CA revokes; a session made before the
renewal must not outlive it."""

from __future__ import annotations

from datetime import timedelta

from scenarios.attacker import ColludingRelay
from scenarios.registry import Context, scenario


@scenario(
    "renewal-revocation",
    attack="a thief with Alice's key renews her certificate and keeps talking on a session made before",
    expected="the session ends with the certificate it was made under; the renewed one is refused as revoked",
    story="""Alice and Bob talk; Alice's certificate is short-lived. A thief copies Alice's identity key
    and renews her certificate with it. The CA learns of the theft and revokes Alice: the CRL lists
    the renewed certificate; the old one has expired and is no longer listed. Before, Bob's session
    had been checked against the serial it was made under only, and sessions never ended: the
    thief's messages were accepted for as long as the session lived. Now a session ends with the
    certificate it was made under: Bob refuses the next message on it, starts a new handshake by
    himself, and that handshake meets the renewed certificate on the CRL. The relay colludes with
    the thief (an honest one cuts a revoked node off), so the nodes' own defence is what is shown.""",
)
async def renewal_revocation(ctx: Context) -> None:
    async with ctx.lab(interceptor=ColludingRelay()) as lab:
        await lab.publish_crl()
        first = lab.ca.enrol("alice", lifetime=timedelta(days=1))
        alice, bob = await lab.add_node("alice", enrolled=first), await lab.add_node("bob")
        await lab.open_session(alice, bob)
        before = len(bob.texts("alice"))
        ctx.story("a thief copies Alice's key and renews her certificate with it")
        renewed = lab.ca.enrol("alice", identity=first.identity, lifetime=timedelta(days=90))
        with alice.keystore.transaction():
            alice.keystore.put("node", "certificate", renewed.certificate)
            alice.keystore.delete("node", "next_prekey_rotation")  # what a renewal does: prekeys re-signed
        await lab.restart_node(alice)
        lab.advance(timedelta(days=2))
        ctx.story("the CA revokes Alice: the CRL lists the renewed certificate (the old one has expired)")
        lab.ca.revoke(renewed.serial)
        await lab.publish_crl()
        ctx.story("the thief writes to Bob on the session made before the renewal")
        await lab.say(alice, "bob", "send the money to the new account")
        await lab.until(
            lambda: bool(bob.refusals("session_refused")) or len(bob.texts("alice")) > before,
            "Bob's new handshake has met the CRL (or Bob accepted the message)",
        )
        await lab.settle()

        status = {s["peer"]: s for s in bob.node.status()["sessions"]}
        ctx.check("the thief's messages Bob accepted", 0, len(bob.texts("alice")) - before)
        ctx.check(
            "the old session refused the message (its certificate expired)", 1, len(bob.refusals("frame_refused"))
        )
        ctx.check(
            "the new handshake refused the renewed certificate as revoked",
            ["certificate_revoked"],
            [e.error for e in bob.refusals("session_refused")],
        )
        ctx.check("Bob's session with Alice", "closed", status["alice"]["state"])
        ctx.conclude(
            f"{len(bob.texts('alice')) - before} of the thief's messages accepted; the session ended with its "
            "certificate and the renewed one was refused as revoked"
        )
