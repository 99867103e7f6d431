"""state-rollback: Alice's keystore is restored from an older copy; her sessions must not encrypt again
under message numbers that already left."""

from __future__ import annotations

import shutil

from protocol.body import TextBody
from protocol.body import encode as encode_body
from scenarios.attacker import MaliciousRelay
from scenarios.registry import Context, scenario

#: Messages Alice sends after the copy is taken: more than one reservation (64), so that the copy's
#: reservation does not cover them all.
AFTER_COPY = 70
#: What Alice says after the copy: public notes, which the attacker knows word for word.
NOTES = [f"public note {i:02d}, nothing new" for i in range(AFTER_COPY)]
LATER = "the safe code is 4711, keep it"
#: Where a node's message text starts in the session plaintext: the kind byte, then a TEXT body
#: (protocol/body.py) up to its text: array header, kind, bin8 id, uint64 sent_at (milliseconds since
#: the epoch need 64 bits), str header (1 byte for texts under 32 characters, as the empty one's).
TEXT_AT = 1 + len(encode_body(TextBody(bytes(16), 2**40, "")))


@scenario(
    "state-rollback",
    attack="Alice's keystore is restored from a copy taken before her last 70 messages",
    expected="the rollback is detected, every session dropped and restarted: no key and nonce used twice",
    story="""Every sealed record of a keystore authenticates on its own: an older copy (a backup, a
    VM snapshot, a copied file) looks valid. Restored, its sessions would encrypt again under
    message numbers that already left: the same AES-GCM key and nonce for another plaintext, so
    the XOR of the two ciphertexts is the XOR of the two plaintexts, and whoever knows one reads
    the other. The node keeps a counter in the keystore and in a file beside it; a keystore below
    its file is older than the last state the node made durable: Alice's node drops every session,
    says so, and starts new ones before sending anything.""",
)
async def state_rollback(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)  # a passive recorder
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        alice, bob = await lab.add_node("alice"), await lab.add_node("bob")
        await lab.open_session(alice, bob)
        await lab.settle()
        ctx.story("a copy of Alice's keystore is taken")
        alice.keystore.checkpoint()
        copy = alice.path.with_name("alice.copy")
        shutil.copy(alice.path, copy)
        for note in NOTES[:-1]:
            await lab.say(alice, "bob", note, detail=True)
        await lab.chat(alice, bob, NOTES[-1])
        ctx.story("Alice's keystore is restored from the copy")

        def restore() -> None:
            for suffix in ("-wal", "-shm"):
                alice.path.with_name(alice.path.name + suffix).unlink(missing_ok=True)
            shutil.copy(copy, alice.path)

        await lab.restart_node(alice, while_stopped=restore)
        await lab.say(alice, "bob", LATER)
        await lab.wait_for(lambda: LATER in bob.texts("alice"))
        await lab.settle()

        reused, read = _attack(evil)
        ctx.check(
            "rollback detected (state_rollback)",
            1,
            len(alice.notices("state_rollback")),
        )
        ctx.check("(key, nonce) pairs used for two ciphertexts", 0, len(reused))
        ctx.check("plaintexts the attacker recovered by XOR", [], read)
        ctx.check("Alice's message after the restore arrived", True, LATER in bob.texts("alice"))
        ctx.conclude(f"rollback detected; {len(reused)} key and nonce pairs reused; {len(read)} plaintexts read")


def _attack(evil: MaliciousRelay) -> tuple[list[tuple[bytes, int]], list[str]]:
    """Find (ratchet key, number) pairs carrying two ciphertexts; XOR the two with each text the
    attacker knows Alice sent: the one that was under that nonce gives the other's text."""
    first: dict[tuple[bytes, int], bytes] = {}
    reused: list[tuple[bytes, int]] = []
    read: list[str] = []
    for envelope in evil.recorded:
        message = envelope.message
        if message is None or envelope.sender != "alice":
            continue
        key = (message.dh, message.n)
        earlier = first.setdefault(key, message.ciphertext)
        if earlier == message.ciphertext:
            continue
        reused.append(key)
        for known in NOTES:
            stream = bytes(c ^ p for c, p in zip(earlier[TEXT_AT:], known.encode(), strict=False))
            text = bytes(c ^ s for c, s in zip(message.ciphertext[TEXT_AT:], stream, strict=False))
            if text.isascii() and text.decode().isprintable() and text.decode() not in NOTES:
                read.append(text.decode())
                evil.leak("alice", "bob", _body(text.decode()), how="XOR with a known message under the same nonce")
                break
    return reused, read


def _body(text: str) -> bytes:
    """A node's message body around `text`, as the attacker's leak record wants it."""
    return encode_body(TextBody(bytes(16), 0, text))
