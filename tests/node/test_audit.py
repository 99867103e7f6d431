"""node/audit.py: the hash chain, its canonical encoding, signatures, and every kind of tampering."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.audit import GENESIS, AuditLog, entry_hash
from node.errors import AuditChainBroken
from node.keystore import ARGON2_TEST, Keystore

T0 = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


class Clock:
    """A clock that moves one second per reading, so entries have distinct, known times."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "keystore.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Keystore]:
    with Keystore.open(db_path, passphrase="pw", create=True, argon2=ARGON2_TEST) as ks:
        yield ks


def fill(log: AuditLog, count: int = 5) -> None:
    for i in range(count):
        log.append("alice", "encrypt", {"key_id": f"k{i}", "version": i + 1, "outcome": "ok"})


def tamper(db_path: Path, sql: str, *params: object) -> None:
    """Edit the file behind the log's back, as an attacker with write access would."""
    raw = sqlite3.connect(db_path)
    raw.execute(sql, params)
    raw.commit()
    raw.close()


def broken_at(log: AuditLog) -> int:
    with pytest.raises(AuditChainBroken) as info:
        log.verify()
    return info.value.seq


def test_entries_chain_and_verify(store: Keystore) -> None:
    log = AuditLog(store, name="kms", clock=Clock())
    assert log.verify() == 0
    fill(log, 3)
    entries = list(log.entries())
    assert [e.seq for e in entries] == [1, 2, 3]
    assert entries[0].prev_hash == GENESIS
    assert entries[1].prev_hash == entries[0].hash
    assert entries[0].time == "2030-01-02T03:04:06.123456+00:00"
    assert entries[2].fields == {"key_id": "k2", "version": 3, "outcome": "ok"}
    assert log.verify() == 3
    assert [e.seq for e in log.entries(after=1, limit=1)] == [2]


def test_hash_is_sha256_over_canonical_json() -> None:
    canonical = (
        b'{"action":"rotate","actor":"bob","fields":{"a":1,"b":null,"k":"x"},'
        b'"prev_hash":"' + b"00" * 32 + b'","seq":1,"time":"2030-01-02T03:04:05.123456+00:00"}'
    )
    expected = hashlib.sha256(b"kmsnet-audit/1\n" + canonical).digest()
    fields = {"k": "x", "b": None, "a": 1}
    assert entry_hash(1, "2030-01-02T03:04:05.123456+00:00", "bob", "rotate", fields, GENESIS) == expected


def test_time_can_be_passed_and_must_be_aware(store: Keystore) -> None:
    log = AuditLog(store, name="kms")
    entry = log.append("a", "x", at=datetime(2031, 5, 6, tzinfo=UTC))
    assert entry.time == "2031-05-06T00:00:00.000000+00:00"
    with pytest.raises(ValueError):
        log.append("a", "x", at=datetime(2031, 5, 6))  # naive on purpose
    with pytest.raises(TypeError):
        log.append("a", "x", {"material": b"\x00" * 32})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        log.append("a", "x", {"nested": {"a": 1}})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        AuditLog(store, name="bad name; DROP TABLE")


def test_append_follows_the_callers_transaction(store: Keystore) -> None:
    log = AuditLog(store, name="kms")
    fill(log, 2)
    with pytest.raises(RuntimeError), store.transaction():
        log.append("a", "x")
        raise RuntimeError("rolled back")
    assert log.verify() == 2
    assert log.append("a", "y").seq == 3


def test_logs_are_independent_and_persist(store: Keystore, db_path: Path) -> None:
    kms_log, ca_log = AuditLog(store, name="kms"), AuditLog(store, name="ca")
    fill(kms_log, 3)
    fill(ca_log, 1)
    store.close()
    with Keystore.open(db_path, passphrase="pw") as again:
        assert AuditLog(again, name="kms").verify() == 3
        assert AuditLog(again, name="ca").verify() == 1


def test_to_json(store: Keystore) -> None:
    entry = AuditLog(store, name="kms").append("a", "x", {"k": 1})
    data = entry.to_json()
    assert data["hash"] == entry.hash.hex()
    assert data["prev_hash"] == "00" * 32
    assert data["signature"] is None
    assert data["fields"] == {"k": 1}


# --- tampering ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "seq"),
    [
        ("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2", 2),
        ('UPDATE audit_log SET fields = \'{"key_id":"k9","outcome":"ok","version":3}\' WHERE seq = 3', 3),
        ("UPDATE audit_log SET time = '2000-01-01T00:00:00.000000+00:00' WHERE seq = 4", 4),
        ("UPDATE audit_log SET fields = 'not json' WHERE seq = 2", 2),
    ],
    ids=["actor", "fields", "time", "unparseable"],
)
def test_edited_entry_is_named(store: Keystore, db_path: Path, sql: str, seq: int) -> None:
    log = AuditLog(store, name="kms")
    fill(log)
    tamper(db_path, sql)
    assert broken_at(log) == seq


def test_removed_entry_is_named(store: Keystore, db_path: Path) -> None:
    log = AuditLog(store, name="kms")
    fill(log)
    tamper(db_path, "DELETE FROM audit_log WHERE seq = 3")
    assert broken_at(log) == 3


def test_removed_then_renumbered_entry_is_named(store: Keystore, db_path: Path) -> None:
    log = AuditLog(store, name="kms")
    fill(log)
    tamper(db_path, "DELETE FROM audit_log WHERE seq = 3")
    tamper(db_path, "UPDATE audit_log SET seq = seq - 1 WHERE seq > 3")
    assert broken_at(log) == 3


def test_relinked_entry_is_named(store: Keystore, db_path: Path) -> None:
    """seq 3 made to point elsewhere, with its own hash recomputed: the link, not the hash, breaks."""
    log = AuditLog(store, name="kms")
    fill(log)
    entry = next(e for e in log.entries() if e.seq == 3)
    fake_prev = b"\x11" * 32
    digest = entry_hash(3, entry.time, entry.actor, entry.action, entry.fields, fake_prev)
    tamper(db_path, "UPDATE audit_log SET prev_hash = ?, hash = ? WHERE seq = 3", fake_prev, digest)
    with pytest.raises(AuditChainBroken, match="does not follow") as info:
        log.verify()
    assert info.value.seq == 3


def test_cut_tail_is_detected_by_the_sealed_head(store: Keystore, db_path: Path) -> None:
    log = AuditLog(store, name="kms")
    fill(log)
    tamper(db_path, "DELETE FROM audit_log WHERE seq >= 4")
    with pytest.raises(AuditChainBroken, match=r"entries 4\.\.5 were removed") as info:
        log.verify()
    assert info.value.seq == 4


def test_reordered_entries_are_named(store: Keystore, db_path: Path) -> None:
    log = AuditLog(store, name="kms")
    fill(log)
    tamper(db_path, "UPDATE audit_log SET seq = -2 WHERE seq = 2")
    tamper(db_path, "UPDATE audit_log SET seq = 2 WHERE seq = 3")
    tamper(db_path, "UPDATE audit_log SET seq = 3 WHERE seq = -2")
    assert broken_at(log) == 2


def test_inserted_entry_with_a_valid_hash_is_named(store: Keystore, db_path: Path) -> None:
    """An attacker who knows the format forges a well-hashed entry after seq 2 and renumbers the rest."""
    log = AuditLog(store, name="kms")
    fill(log)
    prev = next(e for e in log.entries() if e.seq == 2).hash
    forged_time = "2030-01-01T00:00:00.000000+00:00"
    forged = entry_hash(3, forged_time, "mallory", "decrypt", {}, prev)
    tamper(db_path, "UPDATE audit_log SET seq = seq + 10 WHERE seq > 2")
    tamper(db_path, "UPDATE audit_log SET seq = seq - 9 WHERE seq > 10")
    tamper(
        db_path,
        "INSERT INTO audit_log VALUES ('kms', 3, ?, 'mallory', 'decrypt', '{}', ?, ?, NULL)",
        forged_time,
        prev,
        forged,
    )
    assert broken_at(log) == 4  # the forged seq 3 chains; the old seq 3 (now 4) no longer does


def test_appended_entry_outside_the_keystore_is_named(store: Keystore, db_path: Path) -> None:
    log = AuditLog(store, name="kms")
    fill(log, 2)
    prev = list(log.entries())[-1].hash
    time = "2030-01-01T00:00:00.000000+00:00"
    tamper(
        db_path,
        "INSERT INTO audit_log VALUES ('kms', 3, ?, 'mallory', 'x', '{}', ?, ?, NULL)",
        time,
        prev,
        entry_hash(3, time, "mallory", "x", {}, prev),
    )
    assert broken_at(log) == 3


def test_whole_chain_rewritten_is_caught_by_the_sealed_head(store: Keystore, db_path: Path) -> None:
    log = AuditLog(store, name="kms")
    fill(log, 3)
    rows = list(log.entries())
    prev = GENESIS
    for entry in rows:  # recompute every hash after changing the actor of seq 1
        actor = "mallory" if entry.seq == 1 else entry.actor
        digest = entry_hash(entry.seq, entry.time, actor, entry.action, entry.fields, prev)
        tamper(
            db_path,
            "UPDATE audit_log SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            actor,
            prev,
            digest,
            entry.seq,
        )
        prev = digest
    with pytest.raises(AuditChainBroken, match="rewritten"):
        log.verify()


def test_signed_log_names_the_edited_entry_even_when_rehashed(store: Keystore, db_path: Path) -> None:
    signer = Ed25519PrivateKey.generate()
    log = AuditLog(store, name="ca", signer=signer)
    fill(log, 4)
    assert all(e.signature for e in log.entries())
    assert log.verify() == 4
    entry = next(e for e in log.entries() if e.seq == 4)
    digest = entry_hash(4, entry.time, "mallory", entry.action, entry.fields, entry.prev_hash)
    tamper(db_path, "UPDATE audit_log SET actor = 'mallory', hash = ? WHERE seq = 4", digest)
    with pytest.raises(AuditChainBroken, match="signature") as info:
        log.verify()
    assert info.value.seq == 4


def test_verify_key_without_signer_requires_signatures(store: Keystore) -> None:
    fill(AuditLog(store, name="ca"), 1)
    checker = AuditLog(store, name="ca", verify_key=Ed25519PrivateKey.generate().public_key())
    with pytest.raises(AuditChainBroken, match="not signed"):
        checker.verify()


def test_missing_sealed_head_is_detected(store: Keystore) -> None:
    log = AuditLog(store, name="kms")
    fill(log, 2)
    store.delete("audit", "kms")
    assert broken_at(log) == 1


def test_an_append_after_a_cut_tail_is_refused_so_the_cut_stays_visible() -> None:
    store = Keystore.memory()
    log = AuditLog(store, name="cut")
    for i in range(3):
        log.append("admin", "token_issued", {"n": i})
    store.connection.execute("DELETE FROM audit_log WHERE log = 'cut' AND seq = 3")
    with pytest.raises(AuditChainBroken, match="removed"):
        log.append("admin", "token_issued", {"n": 3})
    with pytest.raises(AuditChainBroken, match="removed"):
        log.verify()
