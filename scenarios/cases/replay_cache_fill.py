"""replay-cache-fill: an enrolled node drains Bob's one-time prekeys and floods him with INITs that
carry none, to fill his replay cache and lock new sessions out."""

from __future__ import annotations

from node.hazmat import current_bundle
from protocol import handshake
from protocol.prekeys import MAX_REPLAY_PER_INITIATOR, ROTATE_EARLY_AT
from protocol.session import Kind
from scenarios.attacker import AnyRevocation, MaliciousRelay
from scenarios.registry import Context, scenario

#: INITs Mallory sends without a one-time prekey: just past the early-rotation threshold.
FLOOD = ROTATE_EARLY_AT + 20


@scenario(
    "replay-cache-fill",
    attack="an enrolled node drains Bob's one-time prekeys and floods him with INITs that carry none",
    expected="Mallory gets her share of the replay cache and no more; a newcomer's session still starts",
    story="""An INIT without a one-time prekey is accepted under the signed prekey alone, and its
    ephemeral key is remembered to refuse a replay, up to 100 000 per signed prekey; past that,
    every such INIT was refused until the weekly rotation, and the whole cache (3.4 MB) was
    rewritten on every INIT. Mallory, enrolled like anyone, takes every one-time prekey the relay
    holds for Bob and sends him INIT after INIT without one. Now each initiator may put only 100
    keys in the cache of a signed prekey (the rest of her INITs are refused), and should enough
    initiators together put 1 000 there, Bob's prekey rotates at once and the new bundle is
    published: a flood never fills the cache new initiators use. Each entry is a keystore record
    of its own: an INIT writes one, not the cache. Carol, arriving afterwards, starts her session.""",
)
async def replay_cache_fill(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)  # Mallory's access to the relay (she is enrolled: no forgery)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        bob, mallory = await lab.add_node("bob"), await lab.add_node("mallory")
        before = bob.node.prekeys.signed_ids()
        ctx.story("Mallory fetches Bob's bundle until no one-time prekey is left")
        drained = 0
        while (bundle := await evil.fetch_bundle("bob")) is not None and bundle.otpk is not None:
            drained += 1
        assert bundle is not None
        await lab.chat(mallory, bob, "knock knock")
        ctx.story(f"Mallory sends Bob {FLOOD} INITs without a one-time prekey")
        for _ in range(FLOOD):
            flood = handshake.initiate(
                identity=mallory.enrolled.identity,
                certificate=mallory.enrolled.certificate,
                bundle=bundle,
                root=lab.ca.root,
                revocation=AnyRevocation(),
                now=lab.clock.now(),
                expected_name="bob",
                first_kind=Kind.HEARTBEAT,
            )
            evil.inject("bob", "mallory", flood.frame)
        await lab.say(mallory, "bob", "knock knock again")  # the next delivery carries the flood behind it
        flooded = max(before)

        def settled() -> bool:  # every INIT of the flood taken or refused (the cache read from the node),
            # or Bob stopped reading Mallory's frames at all (a node with a budget of refused frames)
            taken = bob.node.prekeys.replay_count(flooded)
            done = taken + len(bob.refusals("replay_cache_quota")) >= FLOOD or bool(bob.notices("peer_flooding"))
            return done or len(bob.node.prekeys.signed_ids()) > 1

        await lab.until(settled, "Bob has taken the flood", timeout=30)
        ctx.story("Carol, new, starts a session with Bob")
        carol = await lab.add_node("carol")
        await lab.chat(carol, bob, "hello Bob, I am new here")
        await lab.settle()

        newest = max(bob.node.prekeys.signed_ids())
        mallorys = bob.node.prekeys.quota_used(flooded, mallory.enrolled.identity.public_bytes)
        ctx.check("one-time prekeys Mallory drained", True, drained > 0)
        # Her first INIT (the knock) and the flood: all without a one-time prekey.
        refused = len(bob.refusals("replay_cache_quota"))
        ctx.check("Mallory's INITs refused beyond her share", "at least one", refused, refused >= 1)
        ctx.check(
            "keys Mallory put in the replay cache",
            f"at most {MAX_REPLAY_PER_INITIATOR}",
            mallorys,
            mallorys <= MAX_REPLAY_PER_INITIATOR,
        )
        ctx.check("the bundle the relay hands out is Bob's newest", newest, current_bundle(bob.node).spk_id)
        ctx.check("Carol's session started and her message arrived", ["hello Bob, I am new here"], bob.texts("carol"))
        ctx.check("Bob's refusals of honest nodes", 0, len([e for e in bob.refusals() if e.peer == "carol"]))
        ctx.figure("INITs without a one-time prekey", FLOOD)
        ctx.conclude(
            f"{drained} one-time prekeys drained, {FLOOD} INITs without one: {mallorys} entered the replay cache, "
            f"{refused} refused; Carol's session started"
        )
