"""session-compromise: the attacker steals a live ratchet state; it reads only until the next DH step."""

from __future__ import annotations

from scenarios.attacker import MaliciousRelay, StateReader, StolenSession, steal_session
from scenarios.lab import Lab
from scenarios.registry import Context, scenario
from scenarios.timeline import ReadRow

COUNT = 100
#: The attacker copies Alice's session right after she sent this message.
THEFT_AFTER = 42


def sender_of(index: int) -> str:
    """Bob answers every fifth message; Alice writes the rest."""
    return "bob" if index % 5 == 0 else "alice"


def spans(numbers: list[int]) -> str:
    """1, 2, 3, 7 -> "1–3, 7"."""
    out: list[str] = []
    for n in numbers:
        if out and out[-1].split("–")[-1] == str(n - 1):
            out[-1] = f"{out[-1].split('–')[0]}–{n}"
        else:
            out.append(str(n))
    return ", ".join(out) or "none"


@scenario(
    "session-compromise",
    attack="malware copies Alice's live session state (her whole ratchet) after message 42",
    expected="reads only until the next DH step: earlier messages stay safe, later ones too after healing",
    story="""Alice and Bob exchange 100 messages; Bob answers every fifth. The relay records all of it.
    Right after Alice sends message 42, malware on her machine copies her session with Bob out of
    her memory: root key, chain keys, her current ratchet key. With it the attacker
    reads the recording. Earlier messages stay unreadable: their keys were one-way steps back and
    have been deleted (forward secrecy). Messages 43 and 44 are on the chain it holds, and Bob's
    reply 45 is encrypted to the ratchet key it holds, so those three fall. Reading 45 makes Alice
    (and the attacker's copy) take a DH step with a fresh random key, which the copy cannot
    guess: from 46 on, nothing is readable (post-compromise security).""",
)
async def session_compromise(ctx: Context) -> None:
    evil = MaliciousRelay(ctx.timeline)
    async with ctx.lab(interceptor=evil) as lab:
        await lab.publish_crl()
        nodes = {"alice": await lab.add_node("alice"), "bob": await lab.add_node("bob")}
        ctx.story(f"Alice and Bob exchange {COUNT} messages (Bob answers every fifth); the relay records them")
        stolen: StolenSession | None = None
        for i in range(1, COUNT + 1):
            sender = sender_of(i)
            recipient = "bob" if sender == "alice" else "alice"
            await lab.chat(nodes[sender], nodes[recipient], f"#{i} from {sender}", detail=True)
            if i == THEFT_AFTER:
                stolen = steal_session(nodes["alice"], "bob")
                evil.act(f"copies Alice's live session with Bob from her memory (after message {i})", peer="alice")
        await lab.settle()
        assert stolen is not None
        read = read_recording(ctx, lab, evil, stolen)

    window = list(
        range(THEFT_AFTER + 1, next(i for i in range(THEFT_AFTER + 1, COUNT + 1) if sender_of(i) == "bob") + 1)
    )
    before = [i for i in read if i <= THEFT_AFTER]
    healed = [i for i in read if i > window[-1]]
    ctx.check("recorded messages", COUNT, len(ctx.timeline.table))
    ctx.check(f"messages read from before the theft (1–{THEFT_AFTER}): forward secrecy", 0, len(before))
    ctx.check(f"messages read up to Alice's next DH step ({spans(window)})", window, [i for i in read if i in window])
    ctx.check(f"messages read after healing ({window[-1] + 1}–{COUNT}): post-compromise security", 0, len(healed))
    safe = [i for i in range(1, COUNT + 1) if i not in read]
    ctx.figure("read", spans(read))
    ctx.figure("unreadable", spans(safe))
    ctx.conclude(f"attacker decrypted messages {spans(read)} of {COUNT}; {spans(safe)} stayed unreadable")


def read_recording(ctx: Context, lab: Lab, evil: MaliciousRelay, stolen: StolenSession) -> list[int]:
    """The attacker reads every recorded message with the stolen copy; the numbers it could read."""
    reader = StateReader("alice", stolen.copy(), stolen)
    recorded = [e for e in evil.recorded if {e.sender, e.to} == {"alice", "bob"}]
    read: list[int] = []
    ctx.story("the attacker reads the recording with the stolen state")
    for index, (envelope, sent) in enumerate(zip(recorded, lab.sent, strict=True), 1):
        message = envelope.message
        assert message is not None
        body, why = reader.read(envelope.sender, message)
        if body is not None:
            evil.leak(envelope.sender, envelope.to, body, how="stolen ratchet state")
            read.append(index)
        phase = "before the theft" if index <= THEFT_AFTER else "after the theft"
        ctx.timeline.table.append(ReadRow(index, envelope.sender, envelope.to, sent.text, phase, body is not None, why))
    return read
