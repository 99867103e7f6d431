"""The revoked node knows (issue #13 part 3): the relay cuts a node a new CRL revokes, with the CRL
and a REVOKED error, and refuses it at login; the node reports "revoked (CRL #n, reason, time)";
`peer_revoked` is told once per revocation."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ca import CRL_CHECK_INTERVAL
from ca.admin import code_at, secret_from_uri
from kmsnet.chat_app import ChatApp
from node.errors import NodeRevoked
from node.events import SecurityEvent
from node.node import Node
from protocol import wire
from protocol.link import CrlFeed, Error, ErrorCode, Send
from relay.server import Relay
from tests.support.chat_ui import SIZE, shown, type_line
from tests.support.chat_ui import until as ui_until
from tests.support.cli_chat import CA_PASS, fails, kmsnet, ok, serving
from tests.support.lab import (
    make_node,
    next_event,
    next_message,
    publish_crl,
    raw_client,
    recv_frame,
    relay_config,
    running,
)
from tests.support.pki import ALICE, BOB, CA


def events(node: Node, name: str) -> list[SecurityEvent]:
    found = []
    while not node.events.empty():
        item = node.events.get_nowait()
        if isinstance(item, SecurityEvent) and item.event == name:
            found.append(item)
    return found


async def until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_node_a_new_crl_revokes_is_cut_off_told_why_and_refused_at_login(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl(number=1))
        alice = make_node(CA, ALICE, relay.url)
        bob = make_node(CA, BOB, relay.url, tmp_path / "bob.keystore")
        async with running(alice):
            await bob.start()
            await alice.send("bob", "hello bob")
            await next_message(bob)
            assert bob.revoked is None and bob.status()["revoked"] is None

            await publish_crl(relay, CA, CA.crl([0x1002], number=2))
            # Within a second of the CRL reaching the relay, bob's connection is closed, and bob
            # verified the CRL that says why.
            await until(lambda: "bob" not in relay.connected() and not bob.connected, timeout=1.0)
            assert bob.revoked is not None and bob.revoked.crl_number == 2
            assert bob.revoked.words().startswith("revoked (CRL #2, ")
            assert bob.status()["revoked"]["crl_number"] == 2
            await until(lambda: bob._link_task is not None and bob._link_task.done())  # it stops retrying
            told = await next_event(bob, "revoked")
            assert "CRL #2" in told.reason
            assert (await next_event(alice, "peer_revoked")).peer == "bob"

            # A later CRL that still lists bob tells nobody again.
            await publish_crl(relay, CA, CA.crl([0x1002], number=3))
            await until(lambda: alice.revocation.highest_number == 3)
            await asyncio.sleep(0.2)  # an event would be shown once committed
            assert events(alice, "peer_revoked") == [] and events(bob, "revoked") == []
            await bob.stop()
        bob.keystore.close()

        # bob again, from his keystore: he knows (from CRL #2, the last he saw), and does not even dial.
        again = make_node(CA, BOB, relay.url, tmp_path / "bob.keystore")
        with pytest.raises(NodeRevoked, match=r"revoked \(CRL #2, "):
            await again.start()
        again.keystore.close()

        # bob with a keystore that never saw the CRL: the relay sends it, then REVOKED, at login.
        fresh = make_node(CA, BOB, relay.url)
        with pytest.raises(NodeRevoked, match=r"revoked \(CRL #3, "):
            await fresh.start()
        assert fresh.revoked is not None and fresh.revoked.crl_number == 3


async def test_the_relay_reads_nothing_more_from_a_node_once_a_crl_revokes_it() -> None:
    async with Relay(relay_config(CA)) as relay:
        await publish_crl(relay, CA, CA.crl(number=1))
        alice_ws, _ = await raw_client(relay, ALICE)
        bob_ws, _ = await raw_client(relay, BOB)
        async with alice_ws, bob_ws:
            assert isinstance(await recv_frame(bob_ws), CrlFeed)
            await publish_crl(relay, CA, CA.crl([0x1002], number=2))
            assert isinstance(await recv_frame(bob_ws), CrlFeed)
            error = await recv_frame(bob_ws)
            assert isinstance(error, Error) and error.code == ErrorCode.REVOKED and "CRL #2" in error.text
            with pytest.raises(Exception):  # noqa: B017 - closed: the send or the next read fails
                await bob_ws.send(wire.encode_link(Send(bytes(16), "alice", b"x")))
                await recv_frame(bob_ws, timeout=2)
            assert bob_ws.close_code == 1008
            assert await relay.store.waiting("alice") == 0
        assert relay.metrics.refused.labels("revoked")._value.get() == 1


def test_a_revoked_node_is_told_by_every_command_with_exit_4(tmp_path: Path) -> None:
    """As a user meets it: `kmsnet ca revoke bob`; bob's send, receive and status exit 4 with
    "revoked (CRL #n, reason, time)", and status --json carries it."""
    ca_home, alice, bob = tmp_path / "ca", tmp_path / "alice", tmp_path / "bob"
    created = json.loads(ok(kmsnet("ca", "init", "--home", str(ca_home), "--json", passphrase=CA_PASS)))
    code = code_at(secret_from_uri(created["admin"]["otpauth"]), datetime.now(UTC))
    ok(kmsnet("ca", "login", "--home", str(ca_home), "--otp", code, passphrase=CA_PASS))
    relay_args = ("relay", "--port", "0", "--store", str(tmp_path / "relay.db"), "--ca-cert", str(ca_home / "ca.pem"))
    with serving(*relay_args) as relay_url:
        ca_args = ("ca", "serve", "--home", str(ca_home), "--http", "127.0.0.1:0", "--relay", relay_url)
        with serving(*ca_args, passphrase=CA_PASS) as ca_url:
            for name, home in (("alice", alice), ("bob", bob)):
                token = ok(kmsnet("ca", "token", "--home", str(ca_home), name, passphrase=CA_PASS)).strip()
                ok(kmsnet("node", "init", name, "--home", str(home), "--ca", ca_url, "--token", token,
                          "--relay", relay_url, "--ca-fingerprint", created["fingerprint"]))  # fmt: skip
            ok(kmsnet("receive", "--home", str(bob), "--timeout", "5"))
            ok(kmsnet("ca", "revoke", "--home", str(ca_home), "bob", "--reason", "key-compromise", passphrase=CA_PASS))
            time.sleep(2 * CRL_CHECK_INTERVAL + 0.5)  # `ca serve` publishes what another process issued
            fails(kmsnet("send", "--home", str(bob), "--to", "alice", "still me"), 4, "revoked (CRL #2, key-compromise")
            fails(kmsnet("receive", "--home", str(bob), "--timeout", "5"), 4, "revoked (CRL #2, key-compromise")
            status = kmsnet("status", "--home", str(bob), "--json")
            assert status.returncode == 4, status.stderr
            assert json.loads(status.stdout)["revoked"]["crl_number"] == 2
            assert json.loads(status.stderr)["code"] == "node_revoked"
            fails(kmsnet("status", "--home", str(bob)), 4, "revoked (CRL #2, key-compromise")
            assert "REVOKED" in kmsnet("status", "--home", str(bob)).stdout


async def test_the_revoked_nodes_chat_says_so_within_2_s_and_sends_nothing(tmp_path: Path) -> None:
    """Acceptance of #13: revoke a node while it chats; its chat shows a banner and the status bar
    says revoked (CRL #n, …), and what is typed is not sent."""
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        app = ChatApp(make_node(CA, BOB, relay.url))
        async with running(alice), app.run_test(size=SIZE) as pilot:
            await ui_until(pilot, lambda: "connected" in shown(app, "#statusbar"), "bob to connect")
            await type_line(pilot, "/msg alice hello")
            await next_message(alice)
            await publish_crl(relay, CA, CA.crl([0x1002], number=2))
            await ui_until(pilot, lambda: "YOUR certificate is revoked" in shown(app, "#banner"), "the banner", 2.0)
            await ui_until(pilot, lambda: "revoked (CRL #2" in shown(app, "#statusbar"), "the status bar", 2.0)
            await ui_until(pilot, lambda: "relay refuses a revoked node" in shown(app, "#statusbar"), "no retry", 5.0)
            assert "retrying" not in shown(app, "#statusbar")
            await type_line(pilot, "still me")
            await pilot.pause(0.3)
            assert "still me" not in shown(app, "#messages")
            assert "not sent: this node's certificate is revoked (CRL #2" in shown(app, "#notice")
