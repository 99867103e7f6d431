"""relay-crash: the relay is killed mid-conversation and restarted; nothing lost, nothing duplicated."""

from __future__ import annotations

from scenarios.registry import Context, scenario
from scenarios.timeline import RELAY, Kind

TOTAL = 240
KILL_AT = 100
RESTART_AT = 130


def sender_of(index: int) -> str:
    """Bob writes every fourth message; Alice the rest."""
    return "bob" if index % 4 == 0 else "alice"


@scenario(
    "relay-crash",
    attack="the relay process is killed with SIGKILL mid-conversation, then restarted",
    expected="nothing lost, nothing duplicated",
    story="""Alice and Bob exchange 240 messages through a relay that runs as its own process with a
    SQLite store on disk. After message 100 the relay is killed with SIGKILL: no flush, no goodbye,
    envelopes in flight. Alice and Bob keep writing; their nodes keep each message in an outbox on
    disk. After message 130 the relay is restarted on the same port from the same store. The nodes
    reconnect and send their outboxes again; the relay recognises envelopes it had already stored
    by their ids, and each node recognises deliveries it had already processed. Every message must
    arrive exactly once.""",
)
async def relay_crash(ctx: Context) -> None:
    async with ctx.lab(relay_process=True) as lab:
        assert lab.relay_process is not None
        await lab.publish_crl()
        nodes = {name: await lab.add_node(name, send_timeout=0.3) for name in ("alice", "bob")}
        ctx.story(f"Alice and Bob exchange {TOTAL} messages (Bob writes every fourth)")
        for i in range(1, TOTAL + 1):
            sender = sender_of(i)
            await lab.say(nodes[sender], "bob" if sender == "alice" else "alice", f"#{i} from {sender}", detail=True)
            if i == KILL_AT:
                await lab.relay_process.kill()
                ctx.timeline.add(Kind.FAULT, RELAY, f"relay process killed with SIGKILL after message {i}")
            if i == RESTART_AT:
                queued = sum(node.node.outbox_size() for node in nodes.values())
                await lab.relay_process.start()
                ctx.timeline.add(
                    Kind.FAULT,
                    RELAY,
                    f"relay process restarted on the same port after message {i} "
                    f"({queued} envelopes queued in outboxes)",
                )
                ctx.figure("envelopes queued in outboxes while the relay was down", queued)
        expected = {name: {s.text for s in lab.sent if s.recipient == name} for name in nodes}
        arrived = await lab.wait_for(
            lambda: all(expected[name] <= set(node.texts()) for name, node in nodes.items()), timeout=30
        )
        await lab.settle(0.5)

        received = nodes["alice"].texts() + nodes["bob"].texts()
        delivered = len(set(received))
        duplicates = len(received) - delivered
        lost = TOTAL - delivered
        outboxes = sum(node.node.outbox_size() for node in nodes.values())
        ctx.check("messages sent", TOTAL, len(lab.sent))
        ctx.check("messages delivered", TOTAL, delivered)
        ctx.check("messages lost", 0, lost)
        ctx.check("messages delivered twice", 0, duplicates)
        ctx.check("envelopes still waiting in an outbox", 0, outboxes)
        ctx.check("refusals (nothing was forged)", 0, sum(len(n.refusals()) for n in nodes.values()))
        ctx.figure("all arrived within 30 s", arrived)
        ctx.conclude(f"{TOTAL} sent, {delivered} delivered, {duplicates} duplicates, {lost} lost")
