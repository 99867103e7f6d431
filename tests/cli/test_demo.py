"""`kmsnet demo`, run as `make demo` runs it: a real CA, relay and nodes as child processes, and a
transcript that shows every event the demo promises."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kmsnet.demo import DemoOptions
from kmsnet.demo.transcript import Transcript

ROOT = Path(__file__).resolve().parent.parent.parent
#: One transcript line: "  12.34s  alice  ◆ session_established bob: ...".
LINE = re.compile(r"^\s*\d+\.\d\ds  (\S+)\s+(.) (.*)$")
SAFETY = r"safety number ((?:\d{5} ){7}\d{5})"


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}
    return subprocess.run(
        [sys.executable, "-m", "kmsnet", "demo", "--no-color", *args], capture_output=True, text=True,
        timeout=120, cwd=ROOT, env=env, start_new_session=True, check=False,
    )  # fmt: skip


def lanes(stdout: str) -> dict[str, list[str]]:
    """The transcript's lines by lane, each as "MARKER TEXT", in order."""
    out: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        match = LINE.match(line)
        if match:
            out.setdefault(match[1], []).append(f"{match[2]} {match[3]}")
    return out


def first(lines: list[str], pattern: str) -> int:
    """Index of the first line matching `pattern`."""
    return next(i for i, line in enumerate(lines) if re.search(pattern, line))


def test_the_demo_shows_enrolment_chat_catch_up_revocation_and_a_clean_shutdown() -> None:
    result = demo("--nodes", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr == ""
    by = lanes(result.stdout)
    alice, bob, carol = by["alice"], by["bob"], by["carol"]
    times = [float(m[1]) for m in re.finditer(r"^\s*(\d+\.\d\d)s  ", result.stdout, re.MULTILINE)]
    assert len(times) > 30 and times == sorted(times), "the transcript's times go backwards"
    assert "fast key derivation" in result.stdout
    assert [s for s in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]") if s in result.stdout] == [
        "[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]",
    ]  # fmt: skip
    assert any(re.match(r"◆ admin 'admin' \(role admin\) logged in with TOTP code \d{6}", line) for line in by["ca"])
    for lines in (alice, bob, carol):
        assert any(line.startswith("◆ enrolled: certificate ") for line in lines)

    # Both ways, with the same safety number on both sides of the session.
    assert '✉ from alice: "Hi bob, it\'s alice."' in bob
    assert '✉ from bob: "Hi alice! Got it, the session works."' in alice
    at_bob = re.search(f"session_established alice: accepted .*{SAFETY}", "\n".join(bob))
    at_alice = re.search(f"session_established bob: initiated .*{SAFETY}", "\n".join(alice))
    assert at_bob and at_alice and at_bob[1] == at_alice[1]
    assert "· bob answered alice: a DH ratchet step, fresh keys from here on" in alice

    # Carol was offline while alice and bob wrote to her; she catches up when she comes back.
    sends = "\n".join(alice + bob)
    assert sends.count("to carol: ") >= 2 and sends.count("(offline: the relay keeps it)") == 2
    back = first(carol, "comes back online")
    assert first(carol, '✉ from alice: "Carol, call me') > back
    assert first(carol, '✉ from bob: "Carol, alice and I') > back

    # Revoked: the CA says so, alice and bob hear it from the feed, and alice's next send is refused.
    assert any(line.startswith("✖ carol revoked (key-compromise)") for line in by["ca"])
    assert any(line.startswith("◆ crl_published number=2 revoked=1") for line in by["relay"])
    for lines in (alice, bob):
        assert any(line.startswith("✖ peer_revoked carol: certificate ") for line in lines)
    refused = [line for line in alice if line.startswith("✖ refused (exit 4): error: ")]
    assert len(refused) == 1 and "revoked" in refused[0]

    assert "  clean shutdown: 4 processes stopped, every one exited 0" in by["demo"]
    assert "summary: 5 messages sent, 5 delivered; DH ratchet steps: 2; sends refused: 1" in result.stdout


def test_a_kept_workspace_can_be_continued_by_hand(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    result = demo("--nodes", "4", "--keep", str(ws))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    # The fourth node writes to alice.
    assert '✉ from node4: "Hello alice, node4 here."' in lanes(result.stdout)["alice"]

    for name in ("ca", "alice", "bob", "carol", "node4"):
        assert (ws / name).is_dir()
    assert (ws / "ca" / "ca.db").exists() and (ws / "alice" / "keystore.db").exists()
    secret = ws / "passphrase"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((ws / "admin.otpauth").stat().st_mode) == 0o600
    assert f'KMSNET_PASSPHRASE="$(cat {secret})"' in result.stdout
    assert f"kmsnet chat --home {ws / 'alice'}" in result.stdout
    assert f"kmsnet chat --home {ws / 'bob'}" in result.stdout
    assert "kmsnet relay --port " in result.stdout and f"kmsnet ca serve --home {ws / 'ca'}" in result.stdout

    # The printed passphrase opens the nodes, which remember their sessions.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}
    env["KMSNET_PASSPHRASE"] = secret.read_text().strip()
    status = subprocess.run(
        [sys.executable, "-m", "kmsnet", "status", "--home", str(ws / "alice"), "--json"],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    )  # fmt: skip
    sessions = {s["peer"]: s["state"] for s in json.loads(status.stdout)["sessions"]}
    assert set(sessions) == {"bob", "carol", "node4"} and sessions["carol"] == "closed"


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    result = demo("--keep", str(tmp_path / "busy"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: demo: workspace: ") and "not empty" in result.stderr
    result = demo("--nodes", "21")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_a_line_read_before_the_last_one_shown_never_shows_an_earlier_time(capsys: pytest.CaptureFixture[str]) -> None:
    out = Transcript(DemoOptions(nodes=3, keep=None, as_json=True, color=False), ["alice", "bob"], steps=6)
    now = time.monotonic()
    out.line("alice", "send", "later", at=now + 2)
    out.line("bob", "message", "read earlier, drained after", at=now + 1)
    first, second = (json.loads(line)["t"] for line in capsys.readouterr().out.splitlines())
    assert second == first >= 2
