"""The sealed conversation history (node/history.py): states only move forward, retention and
clearing, and the history of two real nodes across a restart, shown by the chat on start."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from kmsnet.chat_app import ChatApp
from node import history as history_module
from node.history import NS_HISTORY, Entry, History, HistoryError, State
from node.journal import Key
from node.keystore import Keystore
from node.node import Node
from relay.server import Relay
from tests.support.chat_ui import SIZE, shown, until
from tests.support.lab import make_node, next_message, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA, NOW


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self):  # type: ignore[no-untyped-def]
        return self.now


def written(history: History, puts: dict[Key, bytes]) -> None:
    history.write_now(puts, [])


def out(msg_id: str, peer: str = "bob", text: str = "hi") -> Entry:
    return Entry(msg_id, peer, "out", text, NOW.timestamp(), State.SENDING)


def fresh() -> tuple[History, Clock]:
    clock = Clock()
    return History(Keystore.memory(), clock), clock


def test_a_sent_message_moves_forward_only_and_a_late_receipt_beats_failed() -> None:
    history, _ = fresh()
    puts: dict[Key, bytes] = {}
    history.add(out("aa"), puts)
    assert history.mark("aa", State.STORED, puts) is not None
    assert history.mark("aa", State.SENDING, puts) is None  # never backwards
    failed = history.mark("aa", State.FAILED, puts, reason="refused 5 times")
    assert failed is not None and (failed.state, failed.reason) == (State.FAILED, "refused 5 times")
    assert history.mark("aa", State.STORED, puts) is None
    delivered = history.mark("aa", State.DELIVERED, puts)
    assert delivered is not None and (delivered.state, delivered.reason) == (State.DELIVERED, None)
    assert history.mark("aa", State.FAILED, puts, reason="late") is None  # delivered is final
    again = history.mark("aa", State.STORED, puts, attempt=True)  # a re-send counts, the state stays
    assert again is not None and (again.state, again.attempts) == (State.DELIVERED, 2)
    written(history, puts)
    [entry] = History(history.keystore, history.clock).conversation("bob")
    assert (entry.state, entry.attempts, entry.text) == (State.DELIVERED, 2, "hi")


def test_a_receipt_counts_only_from_the_recipient_and_only_for_our_own_messages() -> None:
    history, _ = fresh()
    puts: dict[Key, bytes] = {}
    history.add(out("aa", peer="bob"), puts)
    history.add(Entry("bb", "bob", "in", "from bob", NOW.timestamp(), State.RECEIVED), puts)
    assert history.mark("aa", State.DELIVERED, puts, peer="mallory") is None
    assert history.mark("bb", State.DELIVERED, puts, peer="bob") is None  # bob's own message
    assert history.mark("cc", State.DELIVERED, puts) is None  # unknown
    assert history.has_received("bob", "bb") and not history.has_received("bob", "aa")
    assert [e.msg_id for e in history.pending()] == ["aa"]


def test_conversations_in_order_with_a_limit_and_json() -> None:
    history, _ = fresh()
    puts: dict[Key, bytes] = {}
    for i in range(5):
        history.add(out(f"{i:02x}", text=f"m{i}"), puts)
    history.add(out("ff", peer="carol"), puts)
    written(history, puts)
    history = History(history.keystore, history.clock)  # a new process: from the names on disk
    assert history.peers() == ["bob", "carol"]
    assert [e.text for e in history.conversation("bob", 2)] == ["m3", "m4"]
    assert history.conversation("bob", 0) == []
    record = history.conversation("carol")[0].to_json()
    assert record == {
        "type": "history", "id": "ff", "peer": "carol", "direction": "out", "text": "hi",
        "sent_at": "2026-03-01T12:00:00.000Z", "state": "sending", "attempts": 1,
    }  # fmt: skip
    assert "hi" not in repr(history.conversation("carol")[0])


def test_retention_forgets_old_settled_messages_but_never_a_pending_one() -> None:
    history, clock = fresh()
    puts: dict[Key, bytes] = {}
    history.add(out("aa", text="old, delivered"), puts)
    history.mark("aa", State.DELIVERED, puts)
    history.add(out("bb", text="old, pending"), puts)
    written(history, puts)
    clock.now = NOW + timedelta(days=40)
    puts = {}
    history.add(out("cc", text="new"), puts)
    written(history, puts)
    with pytest.raises(HistoryError):
        history.set_retention(0)
    assert history.set_retention(30) == 1
    assert [e.text for e in history.conversation("bob")] == ["old, pending", "new"]
    assert history.retention == timedelta(days=30)
    assert history.set_retention(None) == 0 and history.retention is None


def test_past_the_count_bound_the_oldest_settled_messages_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history_module, "MAX_PER_PEER", 3)
    history, _ = fresh()
    puts: dict[Key, bytes] = {}
    for i in range(5):
        history.add(Entry(f"{i:02x}", "bob", "in", f"m{i}", NOW.timestamp(), State.RECEIVED), puts)
    written(history, puts)
    reopened = History(history.keystore, history.clock)
    assert [e.text for e in reopened.conversation("bob")] == ["m2", "m3", "m4"]


def test_clear_forgets_one_conversation_or_all() -> None:
    history, _ = fresh()
    puts: dict[Key, bytes] = {}
    history.add(out("aa", peer="bob"), puts)
    history.add(out("bb", peer="carol"), puts)
    written(history, puts)
    assert history.clear("bob") == 1
    assert history.peers() == ["carol"] and history.sent("aa") is None
    assert history.clear() == 1
    assert history.keystore.names(NS_HISTORY) == []


async def test_history_of_two_nodes_survives_a_restart_and_the_chat_shows_it(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tmp_path)) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url, tmp_path / "alice.db")
        bob = make_node(CA, BOB, relay.url, tmp_path / "bob.db")
        async with running(alice, bob):
            await alice.send("bob", "hello bob")
            assert (await next_message(bob)).text == "hello bob"
            await bob.send("alice", "hello alice")
            assert (await next_message(alice)).text == "hello alice"
        alice.keystore.close()
        bob.keystore.close()
        # A new process on each home.
        alice = Node(Keystore.open(tmp_path / "alice.db", passphrase="test"), clock=alice.clock)
        bob_store = Keystore.open(tmp_path / "bob.db", passphrase="test")
        seen = [(e.direction, e.text, e.state) for e in History(bob_store, alice.clock).conversation("alice")]
        assert seen[0] == ("in", "hello bob", State.RECEIVED) and seen[1][:2] == ("out", "hello alice")
        assert seen[1][2] in (State.STORED, State.DELIVERED)
        bob_store.close()
        alice.take_inbox()  # taken by a `receive`: the chat still shows it, from the history
        app = ChatApp(alice)
        try:
            async with app.run_test(size=SIZE) as pilot:
                await until(pilot, lambda: "hello alice" in shown(app, "#messages"), "the conversation")
                text = shown(app, "#messages")
                assert "you: hello bob" in text and "bob: hello alice" in text
                assert text.count("hello alice") == 1
        finally:
            alice.keystore.close()
