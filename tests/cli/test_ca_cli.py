"""`kmsnet ca ...` and `kmsnet node init|renew|rekey` as a user runs them: real subprocesses, exit codes,
one-line errors, TOTP codes from the administrator's "authenticator app" (`Authenticator`)."""

from __future__ import annotations

import hashlib
import json
import re
import select
import signal
import sqlite3
import ssl
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca import CertificateAuthority
from ca.admin import secret_from_uri
from kmsnet.ca_cli import ca as ca_group
from kmsnet.node_cli import node as node_group
from node.audit import AuditLog
from node.enrol import STAGING_FILE
from node.keystore import Keystore
from node.node import Node
from protocol import certs
from tests.support.ca_cli import PASS, ROOT, Authenticator, env, fails, ok, run
from tests.support.ca_helpers import csr_pem

NODE_PASS = "cli node passphrase"
RELAY = "ws://127.0.0.1:8765"


def audit_actions(home: Path) -> list[tuple[str, str, dict[str, object]]]:
    """(actor, action, fields) of every entry of the CA's audit log, read straight from ca.db."""
    with Keystore.open(home / "ca.db", passphrase=PASS) as keystore:
        return [(e.actor, e.action, dict(e.fields)) for e in AuditLog(keystore, name="ca").entries()]


@pytest.fixture
def new_ca(tmp_path: Path) -> tuple[Path, Authenticator]:
    """A CA just made by `ca init --json`, nobody logged in, and its first administrator's authenticator."""
    home = tmp_path / "ca"
    record = json.loads(ok(run("ca", "init", "--home", str(home), "--json")))
    return home, Authenticator(secret_from_uri(record["admin"]["otpauth"]))


@pytest.fixture
def ca_home(new_ca: tuple[Path, Authenticator]) -> Path:
    """A CA with an admin session open (`ca login`), as after a user's first steps."""
    home, authenticator = new_ca
    ok(run("ca", "login", "--home", str(home), "--otp", authenticator.code()))
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
    uri = re.search(r"otpauth://totp/kmsnet:admin\?\S+", result.stderr)
    assert uri is not None and "issuer=kmsnet" in uri[0] and len(secret_from_uri(uri[0])) == 20
    assert stat.S_IMODE((home / "ca.db").stat().st_mode) == 0o600
    before = (home / "ca.db").read_bytes(), (home / "ca.pem").read_bytes()
    fails(run("ca", "init", "--home", str(home)), 1, "exists")
    assert ((home / "ca.db").read_bytes(), (home / "ca.pem").read_bytes()) == before

    result = run("ca", "init", "--home", str(tmp_path / "other"), "--json", "--name", "lab-ca")
    record = json.loads(ok(result))
    assert record["fingerprint"] == fingerprint_of(tmp_path / "other" / "ca.pem")
    assert record["root"] == str(tmp_path / "other" / "ca.pem")
    assert (record["admin"]["name"], record["admin"]["role"]) == ("admin", "admin")
    assert "otpauth" not in result.stderr  # shown once, where asked


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


# --- administrators: sessions, TOTP codes, roles, the audit log ---------------------------------------


def test_admin_actions_need_a_session_or_a_code_and_refusals_are_audited(new_ca: tuple[Path, Authenticator]) -> None:
    home, app = new_ca
    fails(run("ca", "token", "--home", str(home), "alice"), 4, "no admin session")
    fails(run("ca", "token", "--home", str(home), "alice", "--otp", app.wrong_code()), 4, "wrong TOTP code")
    fails(run("ca", "token", "--home", str(home), "alice", "--otp", "12345"), 4, "wrong TOTP code")
    code = app.code()
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}\n", ok(run("ca", "token", "--home", str(home), "alice", "--otp", code)))
    fails(run("ca", "token", "--home", str(home), "bob", "--otp", code), 4, "used already")  # a code works once
    # The one-shot session ended with its command.
    fails(run("ca", "token", "--home", str(home), "bob"), 4, "no admin session")
    fails(run("ca", "token", "--home", str(home), "bob", "--admin", "nobody", "--otp", app.code(1)), 4, "nobody")

    entries = audit_actions(home)
    refusals = [
        (actor, action, fields.get("reason"))
        for actor, action, fields in entries
        if "login" in action or "refused" in action
    ]
    assert [(actor, action) for actor, action, _ in refusals] == [
        ("?", "admin_refused"),
        ("admin", "login_failed"),
        ("admin", "login_failed"),
        ("admin", "login"),
        ("admin", "login_failed"),
        ("?", "admin_refused"),
        ("nobody", "login_failed"),
    ]
    assert "used already" in str(refusals[4][2])
    tokens = [fields for _, action, fields in entries if action == "token_issued"]
    assert tokens == [{"node": "alice", "expires_at": tokens[0]["expires_at"]}]  # never the token itself
    assert code not in json.dumps(entries)  # nor a code


def test_login_opens_a_session_for_later_commands_and_logout_ends_it(new_ca: tuple[Path, Authenticator]) -> None:
    home, app = new_ca
    fails(run("ca", "login", "--home", str(home)), 2, "no TOTP code")
    environment = {"KMSNET_OTP": app.code()}
    result = subprocess.run(
        [sys.executable, "-m", "kmsnet", "ca", "login", "--home", str(home), "--json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**env(), **environment}, start_new_session=True,
        check=False,
    )  # fmt: skip
    record = json.loads(ok(result))
    assert (record["admin"], record["role"]) == ("admin", "admin")
    expires = datetime.fromisoformat(record["expires_at"])
    assert timedelta(minutes=14) < expires - datetime.now(UTC) <= timedelta(minutes=15)
    ok(run("ca", "token", "--home", str(home), "alice"))
    ok(run("ca", "token", "--home", str(home), "bob"))
    assert ok(run("ca", "logout", "--home", str(home))) == "logged out\n"
    fails(run("ca", "token", "--home", str(home), "carol"), 4, "no admin session")
    assert ok(run("ca", "logout", "--home", str(home))) == "no admin session was open\n"


def test_roles_from_the_command_line(ca_home: Path) -> None:
    operator = ok(run("ca", "admin", "add", "--home", str(ca_home), "carol", "--role", "operator")).strip()
    assert operator.startswith("otpauth://totp/kmsnet:carol?")
    auditor = json.loads(ok(run("ca", "admin", "add", "--home", str(ca_home), "dave", "--role", "auditor", "--json")))
    fails(run("ca", "admin", "add", "--home", str(ca_home), "dave", "--role", "auditor"), 1, "exists already")
    fails(run("ca", "admin", "add", "--home", str(ca_home), "eve", "--role", "root"), 2, "root")
    listed = [
        json.loads(line) for line in ok(run("ca", "admin", "list", "--home", str(ca_home), "--json")).splitlines()
    ]
    assert [(a["name"], a["role"]) for a in listed] == [("admin", "admin"), ("carol", "operator"), ("dave", "auditor")]

    carol, dave = Authenticator(secret_from_uri(operator)), Authenticator(secret_from_uri(auditor["otpauth"]))
    as_carol = ["--admin", "carol", "--otp"]
    ok(run("ca", "token", "--home", str(ca_home), "alice", *as_carol, carol.code()))
    fails(run("ca", "list", "--home", str(ca_home), *as_carol, carol.code(1)), 4, "role 'operator' may not")
    ok(run("ca", "login", "--home", str(ca_home), "--admin", "dave", "--otp", dave.code()))  # replaces admin's session
    assert "alice" not in ok(run("ca", "list", "--home", str(ca_home)))  # a token is no certificate yet
    ok(run("ca", "audit", "--home", str(ca_home), "--verify"))
    fails(run("ca", "token", "--home", str(ca_home), "bob"), 4, "role 'auditor' may not")
    fails(run("ca", "revoke", "--home", str(ca_home), "alice"), 4, "role 'auditor' may not")
    fails(run("ca", "admin", "remove", "--home", str(ca_home), "carol"), 4, "role 'auditor' may not")
    refused = [f["action"] for _, action, f in audit_actions(ca_home) if action == "admin_refused"]
    assert refused == ["list", "token", "revoke", "admins"]


def test_revoke_list_and_an_edited_audit_log_from_the_command_line(ca_home: Path) -> None:
    token = ok(run("ca", "token", "--home", str(ca_home), "mallory")).strip()
    with CertificateAuthority.open(ca_home, PASS) as authority:  # a second process on ca.db meanwhile is fine
        pem = authority.enrol(token, csr_pem("mallory"))
    serial = certs.load_certificate(pem).serial_number
    fails(run("ca", "revoke", "--home", str(ca_home)), 2, "NAME or --serial")
    fails(run("ca", "revoke", "--home", str(ca_home), "nobody"), 1, "no valid certificate")
    fails(run("ca", "revoke", "--home", str(ca_home), "mallory", "--reason", "bored"), 2, "bored")
    record = json.loads(
        ok(run("ca", "revoke", "--home", str(ca_home), "mallory", "--reason", "key-compromise", "--json"))
    )
    assert [c["serial"] for c in record["revoked"]] == [f"{serial:x}"] and record["crl_number"] >= 1
    fails(run("ca", "revoke", "--home", str(ca_home), "--serial", f"{serial:x}"), 1, "revoked already")

    lines = ok(run("ca", "list", "--home", str(ca_home))).splitlines()
    mallory = next(line for line in lines if " mallory " in line)
    assert mallory.startswith(f"{serial:016x}") and "revoked (key-compromise, " in mallory
    assert any(" ca " in line and line.endswith("valid") for line in lines)
    listed = [json.loads(line) for line in ok(run("ca", "list", "--home", str(ca_home), "--json")).splitlines()]
    assert {c["name"]: c["status"] for c in listed} == {"ca": "valid", "mallory": "revoked"}

    verified = ok(run("ca", "audit", "--home", str(ca_home), "--verify")).splitlines()
    assert any("certificate_revoked" in line and "reason=key-compromise" in line for line in verified)
    assert verified[-1].startswith(f"audit log verified: {len(verified) - 1} entries")

    # Someone with write access to ca.db (but not the root key) rewrites history.
    with sqlite3.connect(ca_home / "ca.db") as db:
        seq = db.execute("SELECT seq FROM audit_log WHERE action = 'certificate_revoked'").fetchone()[0]
        db.execute('UPDATE audit_log SET fields = \'{"reason":"superseded"}\' WHERE seq = ?', (seq,))
    fails(run("ca", "audit", "--home", str(ca_home), "--verify"), 4, f"audit log broken at seq {seq}: entry edited")
    assert "certificate_revoked" in ok(run("ca", "audit", "--home", str(ca_home)))  # still readable, not trusted


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

    # A home where the keystore cannot be made (here a directory is in its way): it fails before the
    # token is redeemed, so the same token works once the home is fixed.
    (alice / STAGING_FILE).mkdir(parents=True)
    fails(run(*node_init, "--token", token, passphrase=NODE_PASS), 3, "cannot open keystore")
    (alice / STAGING_FILE).rmdir()

    result = run(*node_init, "--token", token, "--ca-fingerprint", fingerprint, "--json", passphrase=NODE_PASS)
    record = json.loads(ok(result))
    assert (record["name"], record["ca_fingerprint"], record["fingerprint_checked"]) == ("alice", fingerprint, True)
    # No relay runs in this test: enrolled all the same, and told who cannot write to alice yet.
    assert result.stderr.startswith("warning: alice is enrolled, but cannot reach the relay at ws://127.0.0.1:8765")
    assert result.stderr.count("\n") == 1 and "nobody can write to alice until it first goes online" in result.stderr
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


def test_node_renew_and_rekey_as_a_user_runs_them(ca_home: Path, ca_url: str, tmp_path: Path) -> None:
    alice = tmp_path / "alice"
    token = ok(run("ca", "token", "--home", str(ca_home), "alice")).strip()
    init = ["node", "init", "alice", "--home", str(alice), "--ca", ca_url, "--relay", RELAY, "--token", token]
    first = json.loads(ok(run(*init, "--json", passphrase=NODE_PASS)))
    renewed = json.loads(ok(run("node", "renew", "--home", str(alice), "--json", passphrase=NODE_PASS)))
    assert renewed["previous_serial"] == first["serial"] and renewed["serial"] != first["serial"]
    assert renewed["renew_at"] < renewed["not_after"]

    ok(run("ca", "revoke", "--home", str(ca_home), "alice", "--reason", "key-compromise"))
    fails(run("node", "renew", "--home", str(alice), passphrase=NODE_PASS), 4, "revoked")
    fails(run("node", "renew", "--home", str(tmp_path / "nobody"), passphrase=NODE_PASS), 1, "node init")
    token = ok(run("ca", "token", "--home", str(ca_home), "alice")).strip()
    rekey = ["--home", str(alice), "--ca", ca_url, "--token", token]
    fails(run("node", "rekey", "bob", *rekey, passphrase=NODE_PASS), 1, "not 'bob'")
    result = ok(run("node", "rekey", "alice", *rekey, passphrase=NODE_PASS))
    assert result.startswith("re-keyed alice: new key, certificate ")
    ok(run("node", "renew", "--home", str(alice), passphrase=NODE_PASS))  # the new key is not revoked
    with Keystore.open(alice / "keystore.db", passphrase=NODE_PASS) as keystore:
        assert Node(keystore).name == "alice"


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
        [ca_group, ["login", "--help"]],
        [ca_group, ["logout", "--help"]],
        [ca_group, ["revoke", "--help"]],
        [ca_group, ["list", "--help"]],
        [ca_group, ["audit", "--help"]],
        [ca_group, ["admin", "--help"]],
        [ca_group, ["admin", "add", "--help"]],
        [ca_group, ["admin", "list", "--help"]],
        [ca_group, ["admin", "remove", "--help"]],
        [node_group, ["init", "--help"]],
        [node_group, ["renew", "--help"]],
        [node_group, ["rekey", "--help"]],
    ],
)
def test_every_command_has_help_with_exit_codes(args: list[object]) -> None:
    group, argv = args
    result = CliRunner().invoke(group, argv)  # type: ignore[arg-type]
    assert result.exit_code == 0
    assert "Exit codes:" in result.output
    if argv[-2:] != ["admin", "--help"] and argv != ["--help"]:
        assert "Examples:" in result.output
