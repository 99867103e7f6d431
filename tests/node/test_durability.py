"""Crashes: the relay killed with SIGKILL after acknowledging, a node killed mid-conversation.
Nothing is lost, nothing is delivered twice, and no (ratchet key, message number) is ever reused."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from node.errors import StorageError
from node.node import Node, NodeOptions
from protocol import certs
from relay.server import Relay
from tests.support.durability import NonceWatch
from tests.support.lab import clock, make_node, next_message, provision, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA, NOW

ROOT = Path(__file__).resolve().parent.parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "KMSNET_ARGON2_PROFILE": "test"}


async def start_relay_process(tmp_path: Path, port: int = 0) -> tuple[asyncio.subprocess.Process, str]:
    (tmp_path / "ca.pem").write_bytes(certs.certificate_pem(CA.root))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kmsnet", "relay", "--port", str(port), "--store", str(tmp_path / "relay.db"),
        "--ca-cert", str(tmp_path / "ca.pem"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        url = (await proc.stdout.readline()).decode().strip()
    assert url.startswith("ws://127.0.0.1:"), url
    return proc, url


async def publish_crl_to(url: str) -> None:
    class Remote:  # publish_crl only needs .url
        pass

    remote = Remote()
    remote.url = url  # type: ignore[attr-defined]
    await publish_crl(remote, CA, CA.crl())  # type: ignore[arg-type]


async def test_relay_killed_after_accepting_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    relay, url = await start_relay_process(tmp_path)
    port = int(url.rsplit(":", 1)[1])
    try:
        await publish_crl_to(url)
        alice = make_node(CA, ALICE, url, tmp_path / "alice.db", send_timeout=1.0)
        bob = make_node(CA, BOB, url, tmp_path / "bob.db")
        received: list[str] = []
        async with running(alice, bob):
            for i in range(10):
                await alice.send("bob", f"m{i}")
            received += [(await next_message(bob)).text for _ in range(10)]
        async with running(alice):  # bob offline: these wait at the relay, acknowledged to alice
            for i in range(10, 20):
                await alice.send("bob", f"m{i}")
            assert alice.outbox_size() == 0
            relay.send_signal(signal.SIGKILL)
            await relay.wait()
            for i in range(20, 25):  # relay down: they wait in alice's outbox
                await alice.send("bob", f"m{i}")
            assert alice.outbox_size() == 5
            relay, _ = await start_relay_process(tmp_path, port)
            await alice.wait_connected(30)
            assert await alice.flush(30)
        async with running(bob):
            received += [(await next_message(bob, timeout=15)).text for _ in range(15)]
            await asyncio.sleep(0.5)
            assert bob.events.empty() or all(not hasattr(e, "text") for e in [bob.events.get_nowait()])
        assert received == [f"m{i}" for i in range(25)]
    finally:
        if relay.returncode is None:
            relay.send_signal(signal.SIGTERM)
            await relay.wait()


async def test_node_killed_mid_conversation_resumes_without_reusing_a_key(tmp_path: Path) -> None:
    watch = NonceWatch()
    async with Relay(relay_config(CA, tmp_path), interceptor=watch) as relay:
        await publish_crl(relay, CA, CA.crl())
        provision(CA, ALICE, relay.url, tmp_path / "alice.db").close()
        bob = make_node(CA, BOB, relay.url)
        returned: set[int] = set()  # sends that returned (the relay has them or they are in the outbox)
        started: set[int] = set()  # sends begun (the one in flight at the kill may or may not be committed)
        async with running(bob):

            async def run_alice(first: int, last: int, kill_after: int | None) -> None:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, str(ROOT / "tests/support/node_runner.py"), str(tmp_path / "alice.db"), relay.url,
                    "bob", str(first), str(last), NOW.isoformat(),
                    stdout=asyncio.subprocess.PIPE, env=ENV,
                )  # fmt: skip
                assert proc.stdout is not None
                async with asyncio.timeout(60):
                    while line := (await proc.stdout.readline()).decode():
                        word, _, index = line.strip().partition(" ")
                        if word == "sending":
                            started.add(int(index))
                        if word == "sent":
                            returned.add(int(index))
                            if kill_after is not None and int(index) >= kill_after:
                                proc.send_signal(signal.SIGKILL)
                    await proc.wait()

            await run_alice(0, 40, kill_after=12)  # killed mid-conversation
            # Restarted from its keystore; the app does not send again what it had started to send.
            await run_alice(max(started) + 1, 40, kill_after=None)
            got: list[str] = []
            async with asyncio.timeout(20):
                while len(got) < len(returned):
                    got.append((await next_message(bob)).text)
                await asyncio.sleep(0.5)
                while not bob.events.empty():
                    item = bob.events.get_nowait()
                    if hasattr(item, "text"):
                        got.append(item.text)
            await bob.send("alice", "still there?")  # the session is intact both ways
        assert len(got) == len(set(got)), f"a message reached the application twice: {sorted(got)}"
        assert {f"m{i}" for i in returned} <= set(got)
        assert watch.reused == [], "a (ratchet key, message number) pair encrypted two different ciphertexts"
        assert len(watch.seen) >= 40


async def test_a_reservation_whose_fsync_failed_covers_nothing_and_no_key_is_reused_after_a_restart(
    tmp_path: Path,
) -> None:
    """A full disk fails the fsync of a new reservation: every send that needs it fails, and none
    leaves under it, so a restart that resumes from the last durable state reuses no (key, nonce)."""
    watch = NonceWatch()
    async with Relay(relay_config(CA, tmp_path), interceptor=watch) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url, tmp_path / "alice.db")
        bob = make_node(CA, BOB, relay.url)
        keystore = alice.keystore
        write_sealed = keystore.write_sealed

        def disk_full(rows, deletes, *, sync=True):  # type: ignore[no-untyped-def]
            if sync:  # the fsynced commits: reservations and new sessions
                raise StorageError("keystore write failed: disk full")
            write_sealed(rows, deletes, sync=sync)

        delivered: list[str] = []
        async with running(bob):
            async with running(alice):
                for i in range(60):
                    await alice.send("bob", f"m{i}")
                keystore.write_sealed = disk_full  # type: ignore[method-assign]
                # Sooner or later a send needs a new reservation (its end, or a new chain after a DH step).
                first_failure: int | None = None
                leaked = 0
                for i in range(60, 260):
                    try:
                        await alice.send("bob", f"m{i}")
                    except StorageError:
                        first_failure = i if first_failure is None else first_failure
                        continue
                    if first_failure is not None:
                        leaked += 1
                    if first_failure is not None and i > first_failure + 10:
                        break
                keystore.write_sealed = write_sealed  # type: ignore[method-assign]
                assert first_failure is not None
                assert leaked == 0, "sends went out under a reservation that never reached the disk"
                delivered += [(await next_message(bob)).text for _ in range(first_failure)]
            again = Node(keystore, options=NodeOptions(), clock=clock)  # restarted from the disk
            async with running(again):
                for i in range(300, 310):
                    await again.send("bob", f"m{i}")
                delivered += [(await next_message(bob)).text for _ in range(10)]
    assert delivered == [f"m{i}" for i in [*range(first_failure), *range(300, 310)]]
    assert watch.reused == [], "a (ratchet key, message number) pair carried two different ciphertexts"


async def test_an_accepted_init_is_fsynced_before_it_is_acknowledged(tmp_path: Path) -> None:
    """The INIT consumed a one-time prekey: were that commit lost with the power, the relay's
    re-sent INIT would be accepted a second time. Later messages need no fsync of their own."""
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        bob = make_node(CA, BOB, relay.url, tmp_path / "bob.db")
        commits: list[tuple[set[tuple[str, str]], bool]] = []
        async with running(alice, bob):
            commit = bob._journal.commit

            def recording(puts, deletes=(), *, sync=True):  # type: ignore[no-untyped-def]
                commits.append((set(puts), sync))
                return commit(puts, deletes, sync=sync)

            bob._journal.commit = recording  # type: ignore[method-assign]
            await alice.send("bob", "first")
            assert (await next_message(bob)).text == "first"
            await alice.send("bob", "second")
            assert (await next_message(bob)).text == "second"
    # A delivery commits the session with the id it took (a receipt bob sends commits the session too).
    deliveries = [(keys, sync) for keys, sync in commits if ("session", "alice") in keys and any(
        ns == "seen" for ns, _ in keys)]  # fmt: skip
    assert [("node", "prekeys") in keys for keys, _ in deliveries] == [True, False]
    assert [sync for _, sync in deliveries] == [True, False]
