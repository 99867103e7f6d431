"""revoked-peer: the CA revokes a node for key compromise; new sessions refused, the live one torn down."""

from __future__ import annotations

from scenarios.attacker import ColludingRelay
from scenarios.registry import Context, scenario
from scenarios.timeline import Kind


@scenario(
    "revoked-peer",
    attack="the CA revokes Bob's certificate (key compromise) while Alice and Bob are talking",
    expected="new sessions refused; the live session torn down within one feed update",
    story="""Alice and Bob are in a session; Carol has never talked to Bob. Bob reports his key
    compromised and the CA publishes a CRL that lists his certificate. The relay pushes it to every
    node. Alice's node closes her session with Bob on that one update and refuses whatever Bob
    still sends on it; when Alice wants to write to Bob again, the new session is refused at its
    start; and when Bob tries to open a session with Carol, Carol refuses it. The relay here colludes
    with whoever holds Bob's key: it neither cuts Bob off nor refuses him at login, as an honest relay
    does (PROTOCOL.md §16.3), so the nodes' own defence is what is shown.""",
)
async def revoked_peer(ctx: Context) -> None:
    async with ctx.lab(interceptor=ColludingRelay()) as lab:
        await lab.publish_crl()
        alice, bob, carol = await lab.add_node("alice"), await lab.add_node("bob"), await lab.add_node("carol")
        await lab.open_session(alice, bob)
        await lab.chat(alice, bob, "see you tomorrow")

        ctx.story("Bob's key is compromised: the CA revokes his certificate and publishes CRL #2")
        lab.ca.revoke(bob.enrolled.serial, "key-compromise")
        published = lab.timeline.elapsed
        await lab.publish_crl()
        await lab.until(lambda: bool(alice.notices("peer_revoked")), "Alice tears down her session with Bob")
        torn_at = next(e.t for e in lab.timeline.events if e.actor == "alice" and e.data.get("event") == "peer_revoked")
        teardown_ms = 1000 * (torn_at - published)
        held = alice.node.revocation.highest_number

        ctx.story("Bob (or whoever holds his key) keeps writing on the old session")
        await lab.say(bob, "alice", "it's still me, honest")
        ctx.story("Alice wants to write to Bob again")
        await lab.say(alice, "bob", "are you there?")
        ctx.story("Bob tries to open a session with Carol")
        await lab.say(bob, "carol", "hi carol, I'm bob")
        await lab.settle()

        torn = alice.notices("peer_revoked")
        ctx.timeline.add(
            Kind.STORY, "lab", f"Alice tore the session down {teardown_ms:.0f} ms after the CRL was published"
        )
        ctx.check("Alice tore down the live session on CRL #2, the first update listing Bob", (1, 2), (len(torn), held))
        ctx.check("Bob's message on the torn-down session refused", 1, len(alice.refusals("frame_refused")))
        ctx.check(
            "Alice's new session with Bob refused at its start (certificate revoked)",
            1,
            len([e for e in alice.refusals("session_refused") if e.error == "certificate_revoked"]),
        )
        ctx.check(
            "Carol refused Bob's new session (certificate revoked)",
            1,
            len([e for e in carol.events if e.error == "certificate_revoked"]),
        )
        ctx.check(
            "messages from Bob accepted after the revocation", 0, len(alice.texts("bob")) - 1 + len(carol.texts("bob"))
        )
        ctx.figure("teardown ms after publication", round(teardown_ms, 1))
        ctx.conclude(
            f"live session torn down on CRL #{held} ({teardown_ms:.0f} ms after publication); "
            f"3 of 3 later attempts refused"
        )
