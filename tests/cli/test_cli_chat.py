"""The README's walkthrough, run as a user would: a CA, a relay and two nodes, each a `kmsnet`
process in its own home, chatting end to end; then the failure paths a user meets first."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from ca.admin import code_at, secret_from_uri
from tests.support.cli_chat import CA_PASS, fails, kmsnet, ok, serving


def test_ca_relay_and_two_nodes_chat_from_the_command_line(tmp_path: Path) -> None:
    ca_home, alice, bob = tmp_path / "ca", tmp_path / "alice", tmp_path / "bob"
    created = json.loads(ok(kmsnet("ca", "init", "--home", str(ca_home), "--json", passphrase=CA_PASS)))
    fingerprint = created["fingerprint"]
    # The administrator's authenticator app: one code opens a 15-minute admin session for `ca token`.
    code = code_at(secret_from_uri(created["admin"]["otpauth"]), datetime.now(UTC))
    ok(kmsnet("ca", "login", "--home", str(ca_home), "--otp", code, passphrase=CA_PASS))
    relay_args = ("relay", "--port", "0", "--store", str(tmp_path / "relay.db"), "--ca-cert", str(ca_home / "ca.pem"))
    with serving(*relay_args) as relay_url:
        ca_args = ("ca", "serve", "--home", str(ca_home), "--http", "127.0.0.1:0", "--relay", relay_url)
        with serving(*ca_args, passphrase=CA_PASS) as ca_url:
            for name, home in (("alice", alice), ("bob", bob)):
                token = ok(kmsnet("ca", "token", "--home", str(ca_home), name, passphrase=CA_PASS)).strip()
                init = kmsnet("node", "init", name, "--home", str(home), "--ca", ca_url, "--token", token,
                              "--relay", relay_url, "--ca-fingerprint", fingerprint)  # fmt: skip
                ok(init)
                assert "nobody can write" not in init.stderr
            # First contact: bob has only run `node init`, which published his prekeys.
            sent = json.loads(ok(kmsnet("send", "--home", str(alice), "--to", "bob", "--json", "hello bob")))
            assert sent["type"] == "sent" and sent["to"] == "bob" and not sent["queued"]
            ok(kmsnet("send", "--home", str(alice), "--to", "bob", "-", stdin="from a pipe"))
            lines = ok(kmsnet("receive", "--home", str(bob), "--json", "--timeout", "10")).splitlines()
            items = [json.loads(line) for line in lines]
            messages = [i for i in items if i["type"] == "message"]
            assert [(m["from"], m["text"]) for m in messages] == [("alice", "hello bob"), ("alice", "from a pipe")]
            assert messages[0]["id"] == sent["id"]
            assert any(i["type"] == "event" and i["event"] == "session_established" for i in items)
            # And back.
            ok(kmsnet("send", "--home", str(bob), "--to", "alice", "hi alice"))
            text = ok(kmsnet("receive", "--home", str(alice), "--timeout", "10"))
            assert "[bob] hi alice" in text
            status = json.loads(ok(kmsnet("status", "--home", str(alice), "--json")))
            assert status["name"] == "alice" and status["feed"]["crl_number"] >= 1 and not status["feed"]["stale"]
            assert [s["peer"] for s in status["sessions"]] == ["bob"]
            bob_status = json.loads(ok(kmsnet("status", "--home", str(bob), "--json")))
            assert bob_status["sessions"][0]["safety_number"] == status["sessions"][0]["safety_number"]

            # The first mistakes a user makes: one line each, the documented exit code.
            fails(kmsnet("send", "--home", str(alice), "--to", "carol", "hi"), 1, "node named 'carol' has enrolled")
            before = (alice / "keystore.db").read_bytes()
            fails(kmsnet("status", "--home", str(alice), passphrase="wrong"), 1, "wrong passphrase")
            assert (alice / "keystore.db").read_bytes() == before
            fails(kmsnet("status", "--home", str(tmp_path / "nobody")), 1, "kmsnet node init")
            fails(kmsnet("send", "--home", str(alice), "--to", "bob", "--relay", "http://x", "hi"), 1, "relay URL")
            # Enrolled while the relay is down: it works, and says who cannot write to carol yet.
            token = ok(kmsnet("ca", "token", "--home", str(ca_home), "carol", passphrase=CA_PASS)).strip()
            carol = kmsnet("node", "init", "carol", "--home", str(tmp_path / "carol"), "--ca", ca_url, "--token", token,
                           "--relay", "ws://127.0.0.1:9", "--ca-fingerprint", fingerprint)  # fmt: skip
            assert carol.returncode == 0, carol.stderr
            assert "nobody can write to carol until it first goes online" in carol.stderr
    # The relay is gone: sending says so (exit 3) instead of hanging, and keeps the message.
    gone = kmsnet("send", "--home", str(alice), "--to", "bob", "are you there")
    fails(gone, 3, "waits in the outbox and goes out when any kmsnet command or the chat for this home next connects")
    assert gone.stdout.startswith("queued ") and gone.stdout.endswith(" for bob (relay unreachable)\n")
    # A first message cannot be queued: it needs the peer's prekeys from the relay.
    fails(kmsnet("send", "--home", str(alice), "--to", "carol", "hi"), 3, relay_url)
