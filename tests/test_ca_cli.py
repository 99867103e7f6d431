"""`kmsnet ca ...` and `kmsnet node init` as a user runs them: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import ssl
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmsnet.ca_cli import ca as ca_group
from kmsnet.node_cli import node as node_group
from node.keystore import Keystore
from node.node import Node
from protocol import certs

ROOT = Path(__file__).resolve().parent.parent
PASS = "cli ca passphrase"
NODE_PASS = "cli node passphrase"
RELAY = "ws://127.0.0.1:8765"


def env(passphrase: str | None = PASS) -> dict[str, str]:
    """The environment of a user with cheap Argon2 and no other KMSNET_ setting."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}
    base["KMSNET_ARGON2_PROFILE"] = "test"
    if passphrase is not None:
        base["KMSNET_PASSPHRASE"] = passphrase
    return base


def run(*args: str, passphrase: str | None = PASS) -> subprocess.CompletedProcess[str]:
    """`python -m kmsnet ARGS` without a terminal (a prompt fails instead of hanging)."""
    return subprocess.run(
        [sys.executable, "-m", "kmsnet", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env(passphrase),
        start_new_session=True,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], code: int, fragment: str = "") -> str:
    """Assert the exit code and a one-line error on stderr, without a traceback."""
    err = result.stderr
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err
    if code != 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    return err


@pytest.fixture
def ca_home(tmp_path: Path) -> Path:
    home = tmp_path / "ca"
    ok(run("ca", "init", "--home", str(home)))
    return home


@pytest.fixture
def ca_url(ca_home: Path) -> Iterator[str]:
    """`kmsnet ca serve` on a free port, as a subprocess; stopped with SIGTERM, which must exit 0."""
    command = [sys.executable, "-m", "kmsnet", "ca", "serve", "--home", str(ca_home), "--http", "127.0.0.1:0"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env(), start_new_session=True
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "ca serve printed no URL"
            url = proc.stdout.readline().strip()
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
            yield url
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            logs = proc.stderr.read()
            assert "Traceback" not in logs
            assert "ca_stopped" in logs
        finally:
            if proc.poll() is None:
                proc.kill()


def fingerprint_of(pem_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(pem_path.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# --- ca init, ca token ---------------------------------------------------------------------------------


def test_ca_init_prints_the_fingerprint_and_refuses_a_second_time(tmp_path: Path) -> None:
    home = tmp_path / "ca"
    result = run("ca", "init", "--home", str(home))
    assert ok(result).strip() == fingerprint_of(home / "ca.pem")
    assert "Root fingerprint" in result.stderr
    assert stat.S_IMODE((home / "ca.db").stat().st_mode) == 0o600
    before = (home / "ca.db").read_bytes(), (home / "ca.pem").read_bytes()
    fails(run("ca", "init", "--home", str(home)), 1, "exists")
    assert ((home / "ca.db").read_bytes(), (home / "ca.pem").read_bytes()) == before

    record = json.loads(ok(run("ca", "init", "--home", str(tmp_path / "other"), "--json", "--name", "lab-ca")))
    assert record["fingerprint"] == fingerprint_of(tmp_path / "other" / "ca.pem")
    assert record["root"] == str(tmp_path / "other" / "ca.pem")


def test_ca_init_without_a_passphrase_is_a_usage_error(tmp_path: Path) -> None:
    fails(run("ca", "init", "--home", str(tmp_path / "ca"), passphrase=None), 2, "no passphrase")
    assert not (tmp_path / "ca" / "ca.db").exists()


def test_ca_token_prints_the_token_alone(ca_home: Path) -> None:
    token = ok(run("ca", "token", "--home", str(ca_home), "alice"))
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}\n", token)
    record = json.loads(ok(run("ca", "token", "--home", str(ca_home), "bob", "--ttl", "10m", "--json")))
    assert record["name"] == "bob" and re.fullmatch(r"[A-Za-z0-9_-]{22}", record["token"])


def test_ca_token_errors(ca_home: Path, tmp_path: Path) -> None:
    fails(run("ca", "token", "--home", str(tmp_path / "none"), "alice"), 1, "no CA in")
    fails(run("ca", "token", "--home", str(ca_home), "ca"), 1, "CA's own node name")
    fails(run("ca", "token", "--home", str(ca_home), "Not-A-Name"), 1, "invalid node name")
    fails(run("ca", "token", "--home", str(ca_home), "alice", "--ttl", "30d"), 1, "lifetime")
    fails(run("ca", "token", "--home", str(ca_home), "alice", "--ttl", "soon"), 2, "duration")
    fails(run("ca", "token", "--home", str(ca_home), "alice", passphrase="wrong"), 1, "wrong passphrase")


# --- ca serve + node init ------------------------------------------------------------------------------


def test_enrolment_end_to_end_as_a_user_runs_it(ca_home: Path, ca_url: str, tmp_path: Path) -> None:
    with urllib.request.urlopen(f"{ca_url}/healthz", timeout=10) as answer:
        assert answer.read() == b"ok\n"
    fingerprint = fingerprint_of(ca_home / "ca.pem")
    token = ok(run("ca", "token", "--home", str(ca_home), "alice")).strip()
    alice = tmp_path / "alice"
    node_init = ["node", "init", "alice", "--home", str(alice), "--ca", ca_url, "--relay", RELAY]

    # A wrong fingerprint: trust failure, nothing written, the token is not spent.
    wrong = "0" * 64
    fails(run(*node_init, "--token", token, "--ca-fingerprint", wrong, passphrase=NODE_PASS), 4, "not enrolling")
    assert not alice.exists() or list(alice.iterdir()) == []

    result = run(*node_init, "--token", token, "--ca-fingerprint", fingerprint, "--json", passphrase=NODE_PASS)
    record = json.loads(ok(result))
    assert (record["name"], record["ca_fingerprint"], record["fingerprint_checked"]) == ("alice", fingerprint, True)
    assert result.stderr == ""
    with Keystore.open(alice / "keystore.db", passphrase=NODE_PASS) as keystore:
        node = Node(keystore)
        assert (node.name, node.relay_url) == ("alice", RELAY)
        assert certs.fingerprint(node.root).hex() == fingerprint

    # The token is spent; the existing keystore is never overwritten.
    fails(run(*node_init, "--token", token, passphrase=NODE_PASS), 1, "holds a node already")
    fails(
        run(
            "node",
            "init",
            "alice",
            "--home",
            str(tmp_path / "again"),
            "--ca",
            ca_url,
            "--relay",
            RELAY,
            "--token",
            token,
        ),
        4,
        "used already",
    )

    # Without a fingerprint it enrols and says what to compare.
    bob_token = ok(run("ca", "token", "--home", str(ca_home), "bob")).strip()
    result = run(
        "node", "init", "bob", "--home", str(tmp_path / "bob"), "--ca", ca_url, "--relay", RELAY, "--token", bob_token
    )
    assert ok(result).startswith("enrolled bob: ")
    assert result.stderr.startswith("warning: ") and fingerprint in result.stderr


def test_node_init_errors(tmp_path: Path) -> None:
    base = ["node", "init", "alice", "--home", str(tmp_path / "alice"), "--relay", RELAY, "--token", "A" * 22]
    fails(run(*base, "--ca", "http://127.0.0.1:9"), 3, "cannot reach the CA")
    fails(run(*base, "--ca", "ftp://127.0.0.1:1"), 1, "not a CA URL")
    fails(run(*base, "--ca", "http://127.0.0.1:9", "--ca-fingerprint", "xyz"), 1, "64 hex digits")
    fails(run("node", "init", "alice", "--home", str(tmp_path), "--relay", RELAY), 2, "Missing option")
    assert not (tmp_path / "alice").exists()


def test_ca_serve_refuses_a_missing_ca_and_a_bad_address(tmp_path: Path, ca_home: Path) -> None:
    fails(run("ca", "serve", "--home", str(tmp_path / "none")), 1, "no CA in")
    fails(run("ca", "serve", "--home", str(ca_home), "--http", "127.0.0.1"), 2, "HOST:PORT")
    fails(run("ca", "serve", "--home", str(ca_home), "--http", "127.0.0.1:0", "--relay", "http://x"), 1, "relay URL")


# --- ca relay-cert -------------------------------------------------------------------------------------


def test_ca_relay_cert_writes_a_usable_pair_and_never_overwrites(ca_home: Path, tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "relay.pem", tmp_path / "relay.key"
    args = ["ca", "relay-cert", "--home", str(ca_home), "--out-cert", str(cert_path), "--out-key", str(key_path)]
    record = json.loads(ok(run(*args, "--host", "127.0.0.1", "--host", "relay.lab", "--json")))
    assert record["hosts"] == ["127.0.0.1", "relay.lab"]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)  # the pair `kmsnet relay --tls-cert/--tls-key` loads
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((ca_home / "ca.pem").read_bytes()))

    before = cert_path.read_bytes(), key_path.read_bytes()
    fails(run(*args), 1, "never overwritten")
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before
    fails(run(*args[:-2], "--out-key", str(tmp_path / "new.key")), 1, "never overwritten")
    assert not (tmp_path / "new.key").exists()
    other = ["--out-cert", str(tmp_path / "c.pem"), "--out-key", str(tmp_path / "k.pem")]
    fails(run("ca", "relay-cert", "--home", str(ca_home), *other, "--host", "bad host!"), 1, "DNS name")
    assert not (tmp_path / "c.pem").exists() and not (tmp_path / "k.pem").exists()


# --- help ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [ca_group, ["--help"]],
        [ca_group, ["init", "--help"]],
        [ca_group, ["serve", "--help"]],
        [ca_group, ["token", "--help"]],
        [ca_group, ["relay-cert", "--help"]],
        [node_group, ["init", "--help"]],
    ],
)
def test_every_command_has_help_with_exit_codes(args: list[object]) -> None:
    group, argv = args
    result = CliRunner().invoke(group, argv)  # type: ignore[arg-type]
    assert result.exit_code == 0
    assert "Exit codes:" in result.output
    if argv != ["--help"]:
        assert "Examples:" in result.output
