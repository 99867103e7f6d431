"""fsync-failure: Alice's disk fills up mid-conversation; no message leaves under a state that never
reached the disk, so nothing is ever encrypted twice under one key and nonce."""

from __future__ import annotations

from collections.abc import Sequence

from node.errors import StorageError
from node.node import RESERVE_AHEAD
from scenarios.attacker import MaliciousRelay
from scenarios.registry import Context, scenario

#: Messages Alice tries to send once her disk is full: past the end of the reservation she made
#: while it was not (RESERVE_AHEAD message numbers, the first used before the disk filled up).
TRIES = RESERVE_AHEAD + 16


def reused_nonces(evil: MaliciousRelay) -> int:
    """(ratchet key, message number) pairs the relay saw carrying two different ciphertexts."""
    seen: dict[tuple[bytes, int], bytes] = {}
    reused = 0
    for envelope in evil.recorded:
        message = envelope.message
        if message is not None and seen.setdefault((message.dh, message.n), message.ciphertext) != message.ciphertext:
            reused += 1
    return reused


@scenario(
    "fsync-failure",
    attack="Alice's disk fills up mid-conversation: the fsync of her next reservation of message numbers fails",
    expected="the sends that need it fail; none leaves; after a restart no key and nonce is used twice",
    story="""Before a node encrypts, the message numbers it is about to use are reserved on disk
    (fsynced): after a crash it resumes past them, so it never encrypts twice under one key and
    nonce. Alice's disk fills up; the commit of her next reservation fails. Before, the reservation
    stayed in memory as if it had been written: her sends went on, and after a restart she
    encrypted other messages under the same numbers, which lets anyone who saw both recover the XOR
    of the two plaintexts. Now a failed commit covers nothing: those sends fail, and the session
    resumes from what is on disk.""",
)
async def fsync_failure(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)  # a passive recorder only: it uses no tactic
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        await lab.open_session(alice, bob)
        # Her first message on her new sending chain reserves its next RESERVE_AHEAD numbers on disk.
        await lab.chat(alice, bob, "before the disk filled up")
        keystore = alice.keystore
        write_sealed = keystore.write_sealed

        def disk_full(rows: Sequence[tuple[str, str, bytes]], deletes: object, *, sync: bool = True) -> None:
            if sync:
                raise StorageError("keystore write failed: disk full")
            write_sealed(rows, deletes, sync=sync)  # type: ignore[arg-type]

        ctx.story("Alice's disk fills up; she keeps writing")
        keystore.write_sealed = disk_full  # type: ignore[method-assign]
        outcomes = [await lab.say(alice, "bob", f"m{i}", detail=True) for i in range(TRIES)]
        failed_at = outcomes.index(False) if False in outcomes else TRIES
        left_after = sum(outcomes[failed_at:])
        keystore.write_sealed = write_sealed  # type: ignore[method-assign]
        ctx.story("the disk has room again; Alice's node restarts and she writes on")
        await lab.restart_node(alice)
        for i in range(3):
            await lab.say(alice, "bob", f"after the restart {i}")
        await lab.wait_for(lambda: sum(t.startswith("after the restart") for t in bob.texts("alice")) >= 3)
        await lab.settle()

        texts = bob.texts("alice")
        ctx.check("a send failed once the disk was full", True, failed_at < TRIES)
        # Not every send: those the reservation already on disk covers leave (until one needs a new
        # reservation: at its end, or on a new sending chain once Bob's heartbeat steps the ratchet).
        ctx.check("sends that left under the reservation already on disk", True, failed_at > 0)
        ctx.check("messages that left under a reservation never written", 0, left_after)
        ctx.check("(key, nonce) pairs used for two ciphertexts", 0, reused_nonces(evil))
        ctx.check("messages Bob saw twice", 0, len(texts) - len(set(texts)))
        ctx.check("messages after the restart that arrived", 3, sum(t.startswith("after the restart") for t in texts))
        ctx.figure("sends before the first failure", failed_at)
        failure = (
            f"the send needing a new reservation failed (after {failed_at})" if failed_at < TRIES else "no send failed"
        )
        ctx.conclude(
            f"{failure}; {left_after} left without one; {reused_nonces(evil)} key and nonce pairs reused; "
            f"{sum(t.startswith('after the restart') for t in texts)} of 3 arrived after the restart"
        )
