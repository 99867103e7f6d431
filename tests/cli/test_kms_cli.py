"""`kmsnet kms ...` in real subprocesses: round trips, --json, stdin, exit codes, one-line errors."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import click
import pytest

from kmsnet.cli import main
from kmsnet.exits import CliFailure
from kmsnet.kms_cli import kms as kms_group
from kmsnet.options import StoreOptions, duration, node_failures
from node import errors
from tests.support.kms_cli import (
    PASS,
    fails,
    home,  # noqa: F401 - fixtures, passed by name
    ok,
    run,
)


def test_encrypt_decrypt_round_trip_through_argv_and_stdin(home: Path) -> None:
    token = ok(run(home, "encrypt", "session1", "Hello World")).strip()
    assert token.startswith("kmsnet:v1:session1:1:")
    assert run(home, "decrypt", "session1", token).stdout == b"Hello World"
    binary = bytes(range(256)) + b"\n"
    piped = ok(run(home, "encrypt", "session1", "-", stdin=binary)).strip()
    assert run(home, "decrypt", "session1", stdin=piped.encode() + b"\n").stdout == binary
    assert run(home, "decrypt", "session1", "-", stdin=piped.encode()).stdout == binary


def test_json_output_is_one_object_per_line(home: Path) -> None:
    created = json.loads(ok(run(home, "create", "user1", "--type", "rsa-3072", "--json")))
    assert created["key"] == "user1" and created["type"] == "rsa-3072" and created["state"] == "enabled"
    encrypted = json.loads(ok(run(home, "encrypt", "user1", "Hello Asymmetric", "--json")))
    assert encrypted["ciphertext"].startswith("kmsnet:v1:user1:1:")
    decrypted = json.loads(ok(run(home, "decrypt", "user1", encrypted["ciphertext"], "--json")))
    assert decrypted == {
        "key": "user1",
        "version": 1,
        "compromised": False,
        "plaintext": "Hello Asymmetric",
        "plaintext_base64": "SGVsbG8gQXN5bW1ldHJpYw==",
    }
    lines = ok(run(home, "list", "--json")).splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["session1", "user1"]


def test_rotate_rewrap_and_min_version(home: Path) -> None:
    old = ok(run(home, "encrypt", "session1", "v1 data")).strip()
    assert json.loads(ok(run(home, "rotate", "session1", "--json")))["primary_version"] == 2
    assert ok(run(home, "encrypt", "session1", "x")).startswith("kmsnet:v1:session1:2:")
    assert ok(run(home, "decrypt", "session1", old)) == "v1 data"
    new = ok(run(home, "rewrap", "session1", stdin=old.encode())).strip()
    assert new.startswith("kmsnet:v1:session1:2:") and "v1 data" not in new
    ok(run(home, "set-min-version", "session1", "2"))
    fails(run(home, "decrypt", "session1", old), 1, "minimum decryption version")
    assert ok(run(home, "decrypt", "session1", new)) == "v1 data"


def test_sign_and_verify(home: Path) -> None:
    ok(run(home, "create", "releases", "--type", "ed25519"))
    signature = ok(run(home, "sign", "releases", stdin=b"app contents")).strip()
    assert "releases version 1" in ok(run(home, "verify", "releases", signature, stdin=b"app contents"))
    assert json.loads(ok(run(home, "verify", "releases", signature, "app contents", "--json")))["valid"] is True
    fails(run(home, "verify", "releases", signature, stdin=b"app contentz"), 4, "does not verify")
    assert "BEGIN PUBLIC KEY" in ok(run(home, "public-key", "releases"))


def test_tampered_ciphertext_exits_4(home: Path) -> None:
    token = ok(run(home, "encrypt", "session1", "secret")).strip()
    body = token.rsplit(":", 1)[1]
    flipped = token[: -len(body)] + ("B" if body[0] == "A" else "A") + body[1:]
    fails(run(home, "decrypt", "session1", flipped), 4, "does not authenticate")
    fails(run(home, "decrypt", "session1", "garbage"), 4, "not a kmsnet token")


def test_refusals_exit_1(home: Path) -> None:
    token = ok(run(home, "encrypt", "session1", "x")).strip()
    fails(run(home, "decrypt", "nope", token), 1, "no key 'nope'")
    fails(run(home, "create", "session1"), 1, "exists")
    fails(run(home, "sign", "session1", "x"), 1, "aes256-gcm")
    ok(run(home, "disable", "session1"))
    fails(run(home, "encrypt", "session1", "x"), 1, "disabled")
    ok(run(home, "enable", "session1"))
    ok(run(home, "encrypt", "session1", "x"))
    fails(run(home.parent / "empty", "list"), 1, "no keystore")


def test_wrong_passphrase_exits_1_and_leaves_the_file_unchanged(home: Path) -> None:
    path = home / "keystore.db"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    fails(run(home, "list", passphrase="wrong"), 1, "wrong passphrase")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_usage_errors_exit_2(home: Path) -> None:
    fails(run(home, "encrypt"), 2, "Missing argument")
    fails(run(home, "create", "k", "--type", "des"), 2, "Invalid value")
    fails(run(home, "create", "k", "--rotation-period", "soon"), 2, "not a duration")
    fails(run(None, "list", "--profile", "no/such"), 2, "--profile")
    fails(run(home, "list", "--passphrase", PASS), 2, "No such option")  # never on argv
    fails(run(home, "list", passphrase=None), 2, "no passphrase")


def test_storage_failure_exits_3(tmp_path: Path) -> None:
    (tmp_path / "keystore.db").mkdir()
    fails(run(tmp_path, "list"), 3, "keystore")


def test_passphrase_file(tmp_path: Path) -> None:
    secret = tmp_path / "passphrase"
    secret.write_text("from a file\n")
    ok(run(tmp_path, "create", "k", "--passphrase-file", str(secret), passphrase=None))
    ok(run(tmp_path, "list", passphrase="from a file"))  # the trailing newline was not part of it
    ok(run(tmp_path, "list", passphrase=None, KMSNET_PASSPHRASE_FILE=str(secret)))


def test_destroy_schedules_cancels_and_destroys(home: Path) -> None:
    scheduled = json.loads(ok(run(home, "destroy", "session1", "--days", "7", "--json")))
    assert scheduled["state"] == "pending_deletion" and scheduled["deletion_date"]
    fails(run(home, "destroy", "session1", "--days", "6"), 2)
    fails(run(home, "enable", "session1"), 1, "pending_deletion")
    assert "disabled" in ok(run(home, "cancel-deletion", "session1"))
    ok(run(home, "enable", "session1"))
    fails(run(home, "destroy", "session1", "--now"), 1, "aborted")  # no terminal to confirm on
    assert "destroyed" in ok(run(home, "destroy", "session1", "--now", "--yes"))
    fails(run(home, "encrypt", "session1", "x"), 1, "destroyed")
    assert "session1: destroyed" in ok(run(home, "list"))


def test_compromised_version(home: Path) -> None:
    token = ok(run(home, "encrypt", "session1", "old secret")).strip()
    ok(run(home, "compromise", "session1", "1"))
    fails(run(home, "encrypt", "session1", "x"), 4, "compromised")
    fails(run(home, "decrypt", "session1", token), 4, "compromised")
    allowed = run(home, "decrypt", "session1", token, "--allow-compromised")
    assert allowed.returncode == 0 and allowed.stdout == b"old secret"
    assert allowed.stderr.decode().startswith("warning: version 1 of session1 is compromised")
    ok(run(home, "rotate", "session1"))
    assert ok(run(home, "rewrap", "session1", token)).startswith("kmsnet:v1:session1:2:")


def test_audit_lists_and_verifies(home: Path) -> None:
    ok(run(home, "encrypt", "session1", "x"))
    lines = [json.loads(line) for line in ok(run(home, "audit", "--json")).splitlines()]
    assert [(e["actor"], e["action"], e["fields"]["key_id"]) for e in lines] == [
        ("cli", "create", "session1"),
        ("cli", "encrypt", "session1"),
    ]
    assert "audit log intact: 2 entries" in ok(run(home, "audit", "--verify"))
    raw = sqlite3.connect(home / "keystore.db")
    raw.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1")
    raw.commit()
    raw.close()
    fails(run(home, "audit", "--verify"), 4, "seq 1")


def test_auto_rotation_period_is_stored(home: Path) -> None:
    created = json.loads(ok(run(home, "create", "rotating", "--rotation-period", "12h", "--json")))
    assert created["rotation_period_seconds"] == 12 * 3600


@pytest.mark.parametrize("command", sorted(kms_group.commands))
def test_every_command_has_help_with_examples_and_exit_codes(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kms", command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "Examples:" in text and "kmsnet kms" in text and "Exit codes" in text


def test_group_help_names_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kms", "--help"]) == 0
    text = capsys.readouterr().out
    assert "KMSNET_PASSPHRASE" in text and "KMSNET_ARGON2_PROFILE" in text


# --- the shared option helpers, in process ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("12h", 43200), ("30d", 2592000), ("2w", 1209600)]
)
def test_duration(text: str, seconds: int) -> None:
    parsed = duration(None, None, text)  # type: ignore[arg-type]
    assert parsed is not None and parsed.total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "0d", "1y", "1.5h", "-1d", "d"])
def test_bad_duration(text: str) -> None:
    with pytest.raises(click.BadParameter):
        duration(None, None, text)  # type: ignore[arg-type]


def test_passphrase_file_beats_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "p"
    secret.write_text("from file\r\n")
    monkeypatch.setenv("KMSNET_PASSPHRASE", "from env")
    assert StoreOptions(tmp_path, secret, "test").passphrase() == "from file"
    assert StoreOptions(tmp_path, None, "test").passphrase() == "from env"
    monkeypatch.setenv("KMSNET_PASSPHRASE", "")
    with pytest.raises(CliFailure, match="empty"):
        StoreOptions(tmp_path, None, "test").passphrase()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidCiphertext("x"), 4),
        (errors.InvalidSignature("x"), 4),
        (errors.CompromisedVersion("x"), 4),
        (errors.KeystoreCorrupt("x"), 4),
        (errors.AuditChainBroken(3, "x"), 4),
        (errors.StorageError("x"), 3),
        (errors.RelayUnreachable("x"), 3),
        (FileNotFoundError(2, "No such file", "f"), 3),
        (errors.WrongPassphrase("x"), 1),
        (errors.KeyNotFound("x"), 1),
        (errors.VersionTooOld("x"), 1),
        (errors.MessageTooLong("x"), 1),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_node_errors_map_to_exit_codes(error: Exception, code: int) -> None:
    with pytest.raises(CliFailure) as info, node_failures():
        raise error
    assert info.value.exit_code == code
