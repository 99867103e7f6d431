"""What a flood of forged frames from an enrolled peer costs its victim (issue #13 parts 6 and 8).

The attacker holds a real session with the victim and sends FRAMES forged MESSAGE frames under it:
the right ratchet key, a message number MAX_SKIP - 100 ahead (each makes the victim derive that many
skipped keys before the tag check fails) and random ciphertext. They wait in the relay (its own
process, mailbox limits raised so that one sender may queue them all); then the victim connects,
and this process's CPU time (the victim: its link, ratchet, journal and keystore threads) is taken
until it has handled every one. Twice in the same run, each with a fresh victim: with the refusal
and event budgets as shipped (node/eventbudget.py), and with them patched off.

Output: a table, then one JSON line per figure ({"name", "value", "unit", "floor", "ratio"}, the
floor being the budget-off figure). `python bench/flood_bench.py [--quick] [--frames N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from e2e_bench import World, process

from node.eventbudget import EventBudget, RefusalBudget
from node.home import NS_INBOX, NS_SEEN
from node.node import Node
from protocol import wire
from protocol.link import Accepted, Batch, PublishCrl, Send
from protocol.ratchet import MAX_SKIP

#: Frames per BATCH the attacker sends (the link's limit).
BATCH = 256


async def relay_main(ca_pem: str) -> None:
    """A relay whose mailbox takes the whole flood from one sender (prints its URL, like `kmsnet relay`)."""
    from protocol import certs
    from relay.server import Relay, RelayConfig
    from relay.store import Limits

    limits = Limits(max_pending=1_000_000, max_pending_per_sender=1_000_000, max_pending_bytes=2**31,
                    max_pending_bytes_per_sender=2**31)  # fmt: skip
    config = RelayConfig(
        ca_root=certs.load_certificate(Path(ca_pem).read_bytes()),
        port=0,
        store_path=str(Path(ca_pem).with_name("relay.db")),
        rate=1e6,
        burst=1e6,
        limits=limits,
    )
    async with Relay(config) as relay:
        print(relay.url, flush=True)
        await asyncio.Future()


def forged_frames(attacker: Node, victim: str, count: int) -> list[bytes]:
    """`count` MESSAGE frames under the attacker's session with `victim` that fail only at the tag."""
    session = attacker._session(victim)
    assert session is not None
    real = session.encrypt_message(b"x")
    ahead = dataclasses.replace(real, n=real.n + MAX_SKIP - 100)
    return [wire.encode(dataclasses.replace(ahead, ciphertext=os.urandom(32))) for _ in range(count)]


def records(node: Node) -> int:
    """Records a flood can add to the victim's keystore: stored events and messages, delivery marks."""
    return len(node.keystore.names(NS_INBOX)) + len(node.keystore.names(NS_SEEN))


async def flood(world: World, url: str, tag: str, frames: int, *, budget: bool) -> dict[str, float]:
    """One victim, one attacker, one flood: the victim's CPU seconds and records afterwards."""
    victim_name, attacker_name = f"victim-{tag}", f"attacker-{tag}"
    victim = world.node(victim_name, url, inbox=True)
    attacker = world.node(attacker_name, url)
    await victim.start()
    await attacker.start()
    await attacker.send(victim_name, "hello")  # a real session, made the ordinary way
    while not [item for item in victim.take_inbox() if item["type"] == "message"]:
        await asyncio.sleep(0.01)
    payloads = forged_frames(attacker, victim_name, frames)
    await attacker.stop()
    await victim.stop()  # the flood waits in the relay; the victim meets it when it connects
    ws = await world.raw(url, attacker_name)
    for start in range(0, frames, BATCH):
        sends = [wire.encode_link(Send(os.urandom(16), victim_name, p)) for p in payloads[start : start + BATCH]]
        await ws.send(wire.encode_link(Batch(sends)))  # type: ignore[attr-defined]
    accepted = 0
    while accepted < frames:
        for frame in wire.decode_link_frames(await ws.recv()):  # type: ignore[attr-defined]
            accepted += isinstance(frame, Accepted)
    await ws.close()  # type: ignore[attr-defined]

    if not budget:  # patched off: every frame is read, refused and recorded
        victim.refusal_budget = RefusalBudget(refusals=sys.maxsize)
        victim.event_budget = EventBudget(burst=sys.maxsize)
    before = records(victim)
    cpu = time.process_time()
    wall = time.perf_counter()
    await victim.start()
    while victim._handled < frames:
        await asyncio.sleep(0.01)
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    added = records(victim) - before
    events = [item for item in victim.take_inbox() if item["type"] == "event"]
    await victim.stop()
    victim.keystore.close()
    attacker.keystore.close()
    return {
        "cpu_s_per_1000_frames": cpu / frames * 1000,
        "wall_s": wall,
        "records_added": added,
        "events_stored": len(events),
        "frames_dropped_unread": victim.refusal_budget.dropped,
    }


async def main_async(frames: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp))
        here = Path(__file__).resolve()
        async with process(sys.executable, str(here), "--relay", str(Path(tmp) / "ca.pem"), url_from_stdout=True) as (
            _,
            url,
        ):
            ca = await world.raw(url, "ca")
            await ca.send(wire.encode_link(PublishCrl(world.crl())))  # type: ignore[attr-defined]
            on = await flood(world, url, "on", frames, budget=True)
            off = await flood(world, url, "off", frames, budget=False)
            await ca.close()  # type: ignore[attr-defined]
    print(f"{frames} forged frames (each {MAX_SKIP - 100} skipped keys ahead) from one enrolled peer")
    print(f"{'figure':28} {'budget on':>12} {'budget off':>12} {'ratio':>7}")
    for name, value in on.items():
        ratio = value / off[name] if off[name] else 0.0
        print(f"{name:28} {value:12.3f} {off[name]:12.3f} {ratio:7.3f}")
    for name, value in on.items():
        unit = "s" if name.endswith("_s") or "cpu" in name else "count"
        against = round(value / off[name], 3) if off[name] else None
        print(json.dumps({"name": f"flood_{name}", "value": round(value, 4), "unit": unit,
                          "floor": round(off[name], 4), "ratio": against}))  # fmt: skip


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--relay":
        asyncio.run(relay_main(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10_000, help="forged frames per flood (default 10,000)")
    parser.add_argument("--quick", action="store_true", help="1,000 frames: a smoke run")
    args = parser.parse_args()
    asyncio.run(main_async(1000 if args.quick else args.frames))


if __name__ == "__main__":
    main()
