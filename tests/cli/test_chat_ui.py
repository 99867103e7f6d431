"""The chat UI (`kmsnet chat`) driven headless with Textual's `run_test()` and Pilot: alice in the UI,
bob a plain Node, a real relay on 127.0.0.1 in this process."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from textual.pilot import Pilot

from kmsnet.chat_app import DELIVERED, QUEUED, STORED, ChatApp
from kmsnet.cli import main
from node.errors import PeerUnavailable
from node.link import CONNECT_TIMEOUT
from node.node import Node
from relay.server import Relay
from tests.support.chat_ui import SIZE, contacts, shown, type_line, until
from tests.support.lab import make_node, next_message, provision, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA


@contextlib.asynccontextmanager
async def chatting(relay: Relay) -> AsyncIterator[tuple[ChatApp, Pilot[None], Node]]:
    """Alice in the chat UI and bob as a plain node, both connected, with a fresh CRL on the feed."""
    await publish_crl(relay, CA, CA.crl())
    bob = make_node(CA, BOB, relay.url)
    app = ChatApp(make_node(CA, ALICE, relay.url))
    async with running(bob), app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "connected" in shown(app, "#statusbar"), "alice to connect")
        yield app, pilot, bob


async def test_a_typed_message_reaches_the_peer_and_shows_it_was_stored(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay, chatting(relay) as (app, pilot, bob):
        await type_line(pilot, "/msg bob")
        assert "Conversation with bob" in str(app.query_one("#conversation").border_title)
        await type_line(pilot, "hello bob")
        got = await next_message(bob)
        assert (got.sender, got.text) == ("alice", "hello bob")
        await until(pilot, lambda: f"you: hello bob  {STORED}" in shown(app, "#messages"), "the delivery state")
        await until(pilot, lambda: "bob valid" in contacts(app), "bob's badge")
        assert app.query_one("#input").has_focus


async def test_a_sent_message_goes_from_stored_to_delivered_and_both_chats_show_it_after_a_restart(
    tmp_path: Path,
) -> None:
    """✓ then ✓✓ once bob's node has it; a new chat on each home shows the conversation, states included."""
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url, tmp_path / "alice.db")
        bob = make_node(CA, BOB, relay.url, tmp_path / "bob.db")
        async with running(bob):
            pass  # bob has been online once: his prekeys are at the relay
        app = ChatApp(alice)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "connected" in shown(app, "#statusbar"), "alice to connect")
            await type_line(pilot, "/msg bob are you there?")
            await until(pilot, lambda: f"are you there?  {STORED}" in shown(app, "#messages"), "✓ stored")
            bob_app = ChatApp(bob)
            async with bob_app.run_test(size=SIZE) as bob_pilot:
                await until(bob_pilot, lambda: "alice: are you there?" in shown(bob_app, "#messages"), "bob's chat")
                await until(pilot, lambda: f"are you there?  {DELIVERED}" in shown(app, "#messages"), "✓✓")
                await type_line(bob_pilot, "yes")
                await until(pilot, lambda: "bob: yes" in shown(app, "#messages"), "bob's answer")
                await until(bob_pilot, lambda: f"yes  {DELIVERED}" in shown(bob_app, "#messages"), "bob's ✓✓")
        for store, peer, lines in (
            (alice.keystore, "bob", [f"you: are you there?  {DELIVERED}", "bob: yes"]),
            (bob.keystore, "alice", ["alice: are you there?", f"you: yes  {DELIVERED}"]),
        ):
            again = ChatApp(Node(store, clock=alice.clock))
            async with again.run_test(size=SIZE) as pilot:
                shows = lambda app=again, last=lines[-1]: last in shown(app, "#messages")  # noqa: E731
                await until(pilot, shows, f"the conversation with {peer}")
                text = shown(again, "#messages")
                assert all(line in text for line in lines) and f"Conversation with {peer}" in str(
                    again.query_one("#conversation").border_title
                )
            store.close()


async def test_a_message_from_the_peer_appears_in_the_conversation(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay, chatting(relay) as (app, pilot, bob):
        # Alice's prekeys go up right after she connects; until the relay has them, bob cannot start.
        for _ in range(50):
            try:
                await bob.send("alice", "hi alice, it's bob")
                break
            except PeerUnavailable:
                await asyncio.sleep(0.1)
        await until(pilot, lambda: "bob: hi alice, it's bob" in shown(app, "#messages"), "bob's message")
        # A first writer becomes a contact, and the conversation opens on him.
        assert "▶ bob valid" in contacts(app)
        assert "session accepted" in shown(app, "#messages")


async def test_a_revocation_raises_a_banner_and_marks_the_contact(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay, chatting(relay) as (app, pilot, bob):
        await type_line(pilot, "/msg bob hello")
        await next_message(bob)
        assert not app.query_one("#banner").display
        await publish_crl(relay, CA, CA.crl([BOB.serial], number=2))
        await until(pilot, lambda: "certificate revoked — bob" in shown(app, "#banner"), "the revocation banner")
        assert app.query_one("#banner").display
        await until(pilot, lambda: "bob revoked" in contacts(app), "bob's badge")
        # Writing to him now is refused, and says so.
        await type_line(pilot, "still there?")
        await until(pilot, lambda: "still there?  ✗ not sent" in shown(app, "#messages"), "the refusal")
        await pilot.press("escape")
        assert not app.query_one("#banner").display


async def test_verify_shows_the_safety_number_both_sides_compute(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay, chatting(relay) as (app, pilot, bob):
        await type_line(pilot, "/verify bob")
        assert "no session with bob yet" in shown(app, "#notice")
        await type_line(pilot, "/msg bob hello")
        await next_message(bob)
        await type_line(pilot, "/verify bob")
        [ours] = app.node.status()["sessions"]
        [theirs] = bob.status()["sessions"]
        assert ours["safety_number"] == theirs["safety_number"]
        assert ours["safety_number"] in shown(app, "#notice")


async def test_messages_queue_while_the_relay_is_down_and_go_out_when_it_is_back(tmp_path: Path) -> None:
    relay = Relay(relay_config(CA, tmp_path))
    await relay.start()
    port = relay.port
    try:
        async with chatting(relay) as (app, pilot, bob):
            await type_line(pilot, "/msg bob before")
            await next_message(bob)
            await relay.close()
            await until(pilot, lambda: "offline" in shown(app, "#statusbar"), "the status bar to say offline")
            await type_line(pilot, "while down")
            await until(pilot, lambda: f"while down  {QUEUED}" in shown(app, "#messages"), "the queued state")
            relay = Relay(relay_config(CA, tmp_path, port=port))  # same store, same URL
            await relay.start()
            assert (await next_message(bob, timeout=15)).text == "while down"
            await until(pilot, lambda: f"while down  {STORED}" in shown(app, "#messages"), "the stored state")
    finally:
        await relay.close()


@contextlib.asynccontextmanager
async def dead_relay(kind: str) -> AsyncIterator[str]:
    """A relay URL where nothing listens ("refused") or where a server accepts and never answers ("silent")."""
    if kind == "refused":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        yield f"ws://127.0.0.1:{port}"
        return
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # say nothing, ever

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("kind", ["refused", "silent"])
async def test_without_a_relay_the_ui_starts_offline_and_keeps_answering(kind: str) -> None:
    async with dead_relay(kind) as url:
        app = ChatApp(make_node(CA, ALICE, url))
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with app.run_test(size=SIZE) as pilot:
            await type_line(pilot, "/help")
            assert "/verify" in shown(app, "#notice")
            # Answered while the link is still trying (a silent relay holds a connect for CONNECT_TIMEOUT).
            assert loop.time() - started < CONNECT_TIMEOUT / 2
            await until(pilot, lambda: "offline" in shown(app, "#statusbar"), "the status bar to say offline")
            await type_line(pilot, "/msg bob anyone?")
            await until(pilot, lambda: "anyone?  ✗ not sent" in shown(app, "#messages"), "the failed send")


async def test_a_malformed_relay_url_shows_offline_with_the_reason() -> None:
    app = ChatApp(make_node(CA, ALICE, "http://127.0.0.1:9"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "offline: not a relay URL" in shown(app, "#statusbar"), "the reason")
        await type_line(pilot, "/status")
        assert "relay       http://127.0.0.1:9 (offline: not a relay URL" in shown(app, "#notice")


# --- the command line around the UI (errors before the screen is taken over) ----------------------------


def test_chat_without_a_node_is_one_line_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "--home", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"error: no node in {tmp_path} (run `kmsnet node init` first)\n"


def test_chat_refuses_a_bad_relay_url_and_a_missing_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    provision(CA, ALICE, "ws://127.0.0.1:9", tmp_path / "keystore.db").close()
    monkeypatch.setenv("KMSNET_PASSPHRASE", "test")
    assert main(["chat", "--home", str(tmp_path), "--relay", "http://127.0.0.1:9"]) == 1
    assert "not a relay URL" in capsys.readouterr().err
    # pytest's captured stdin is no terminal: the UI is not started.
    assert main(["chat", "--home", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: kmsnet chat needs a terminal (scripts use send and receive)\n"
