"""Nodes given several relays fail over: a relay (its own process, sharing one Redis with another)
is SIGKILLed while 300 messages are in flight; its nodes reconnect to the other relay, pick up
their mailboxes there, and every message arrives exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from kmsnet.cli import cli
from kmsnet.exits import BAD_INPUT
from node.errors import LinkError
from node.keystore import Keystore
from node.link import RelayLink, parse_urls
from node.node import Node
from relay.server import Relay
from tests.support.lab import make_node, next_message, provision, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA
from tests.support.redis_fixtures import redis_single, redis_url  # noqa: F401 - fixtures

TESTS = Path(__file__).parent.parent
MESSAGES = 300


@contextlib.contextmanager
def relay_process(store: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A relay in its own process (tests/support/relay_runner.py) and its URL; killed afterwards."""
    process = subprocess.Popen(
        [sys.executable, str(TESTS / "support" / "relay_runner.py"), store],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=TESTS,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("ws://"), f"relay process did not start: {url!r}"
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


async def test_a_relay_sigkilled_with_messages_in_flight_its_nodes_fail_over_and_each_arrives_once(
    redis_url: str,
) -> None:
    with relay_process(redis_url) as (doomed, a_url):
        async with Relay(relay_config(CA, store_path=redis_url)) as b:
            await publish_crl(b, CA, CA.crl())
            # Both start on relay A (first in their lists), relay B behind it.
            alice = make_node(CA, ALICE, f"{a_url}\n{b.url}", send_timeout=1.0)
            bob = make_node(CA, BOB, f"{a_url}\n{b.url}")
            async with running(alice, bob):
                assert alice.relay_url == a_url and bob.relay_url == a_url
                while not await b.store.known("bob"):
                    await asyncio.sleep(0.02)
                texts: list[str] = []

                async def receive() -> None:
                    while len(set(texts)) < MESSAGES:
                        texts.append((await next_message(bob, timeout=30)).text)

                receiving = asyncio.create_task(receive())
                for i in range(MESSAGES):
                    if i == 100:
                        doomed.send_signal(signal.SIGKILL)  # mid-stream: sends and deliveries in flight
                        before = len(texts)
                    await alice.send("bob", f"m{i}")
                async with asyncio.timeout(60):
                    await receiving
                    while alice.outbox_size():
                        await asyncio.sleep(0.05)
                # Both moved to relay B, which served the rest.
                assert alice.relay_url == b.url and bob.relay_url == b.url
                assert sorted(b.connected()) == ["alice", "bob"]
                assert 0 < before < MESSAGES and b.metrics.stored._value.get() >= MESSAGES - 100
                await asyncio.sleep(0.3)  # anything delivered twice would show by now
                while not bob.events.empty():
                    item = bob.events.get_nowait()
                    texts.append(getattr(item, "text", ""))
    counts = Counter(t for t in texts if t)
    assert set(counts) == {f"m{i}" for i in range(MESSAGES)}
    assert max(counts.values()) == 1, [t for t, n in counts.items() if n > 1][:5]


def test_a_node_takes_several_relay_urls_and_refuses_a_bad_one() -> None:
    assert parse_urls("ws://a:1\nws://b:2") == ["ws://a:1", "ws://b:2"]
    assert parse_urls("ws://a:1, wss://b:2") == ["ws://a:1", "wss://b:2"]
    with pytest.raises(LinkError):
        parse_urls("ws://a:1 http://b:2")
    with pytest.raises(LinkError):
        parse_urls("  ")


async def test_with_every_relay_down_the_first_start_fails_once_all_were_tried() -> None:
    node = make_node(CA, ALICE, "ws://127.0.0.1:1 ws://127.0.0.1:2")
    link = RelayLink(
        node.relay_urls,
        identity=node.identity,
        certificate=node.certificate,
        root_pem=node.root_pem,
        on_frame=_ignore,
        on_connected=_ignore,
    )
    first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    running_link = asyncio.create_task(link.run(first_attempt=first))
    try:
        with pytest.raises(LinkError, match=r"127\.0\.0\.1:2"):  # the second one was tried too
            async with asyncio.timeout(10):
                await first
    finally:
        await link.close()
        running_link.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running_link


async def _ignore(_: object) -> None:
    return None


def test_kmsnet_node_relays_prints_and_changes_the_relays(tmp_path: Path) -> None:
    provision(CA, ALICE, "ws://127.0.0.1:8765", tmp_path / "keystore.db").close()
    env = {"KMSNET_PASSPHRASE": "test"}
    runner = CliRunner()
    result = runner.invoke(cli, ["node", "relays", "--home", str(tmp_path)], env=env)
    assert result.exit_code == 0 and result.output == "ws://127.0.0.1:8765\n"
    two = ["--relay", "ws://10.0.0.1:8765", "--relay", "wss://10.0.0.2:8765"]
    result = runner.invoke(cli, ["node", "relays", "--home", str(tmp_path), *two, "--json"], env=env)
    assert result.exit_code == 0 and json.loads(result.output) == {
        "relays": ["ws://10.0.0.1:8765", "wss://10.0.0.2:8765"]
    }
    result = runner.invoke(cli, ["node", "relays", "--home", str(tmp_path), "--relay", "http://x:1"], env=env)
    assert result.exit_code == BAD_INPUT and result.output.startswith("error: ") and "Traceback" not in result.output
    with Keystore.open(tmp_path / "keystore.db", passphrase="test") as keystore:
        assert Node(keystore).relay_urls == ["ws://10.0.0.1:8765", "wss://10.0.0.2:8765"]
