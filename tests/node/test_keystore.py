"""node/keystore.py: sealed records, unlocking, atomicity, nothing in clear on disk, AES-GCM vectors."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from node.errors import KeystoreCorrupt, KeystoreError, KeystoreNotFound, StorageError, WrongPassphrase
from node.keystore import (
    ARGON2_INTERACTIVE,
    ARGON2_TEST,
    Argon2Params,
    Keystore,
    _aes_gcm_seal_from_parts,
    aes_gcm_open,
    aes_gcm_seal,
)

VECTORS = Path(__file__).parent.parent / "vectors" / "wycheproof"
PASS = "correct horse battery staple"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk_bytes(path: Path) -> bytes:
    """The database file and any WAL / shared-memory side files, as one blob to search."""
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "keystore.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Keystore]:
    with Keystore.open(db_path, passphrase=PASS, create=True, argon2=ARGON2_TEST) as ks:
        yield ks


# --- records --------------------------------------------------------------------------------------


def test_put_get_delete_names(store: Keystore) -> None:
    assert store.get("ns", "a") is None
    store.put("ns", "a", b"one")
    store.put("ns", "b/x", b"two")
    store.put("other", "a", b"three")
    assert store.get("ns", "a") == b"one"
    assert store.names("ns") == ["a", "b/x"]
    assert store.names("ns", "b/") == ["b/x"]
    store.put("ns", "a", b"replaced")
    assert store.get("ns", "a") == b"replaced"
    assert store.delete("ns", "a") is True
    assert store.delete("ns", "a") is False
    assert store.get("ns", "a") is None
    assert store.get("other", "a") == b"three"


def test_memory_keystore_works_without_a_file() -> None:
    with Keystore.memory() as ks:
        ks.put("ns", "k", b"v")
        assert ks.get("ns", "k") == b"v"
        assert ks.path is None
        ks.scrub()  # nothing to checkpoint, and no error


def test_values_persist_across_reopen(db_path: Path) -> None:
    with Keystore.open(db_path, passphrase=PASS, create=True, argon2=ARGON2_TEST) as ks:
        ks.put("ns", "k", b"persisted")
    with Keystore.open(db_path, passphrase=PASS) as ks:
        assert ks.get("ns", "k") == b"persisted"


def test_file_settings(store: Keystore, db_path: Path) -> None:
    db = store.connection
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA secure_delete").fetchone()[0] == 1
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    header = json.loads(db.execute("SELECT value FROM meta WHERE name = 'header'").fetchone()[0])
    assert header["kdf"] == "argon2id"
    assert header["params"]["memory_cost"] == ARGON2_TEST.memory_cost


def test_interactive_defaults_are_interactive_strength() -> None:
    assert Argon2Params(memory_cost=64 * 1024, iterations=3, lanes=4) == ARGON2_INTERACTIVE


@pytest.mark.parametrize(
    ("memory_cost", "iterations", "lanes"), [(31, 1, 4), (32, 0, 4), (32, 1, 0), (5 * 1024 * 1024, 1, 4), (32, 65, 4)]
)
def test_argon2_params_are_bounded(memory_cost: int, iterations: int, lanes: int) -> None:
    with pytest.raises(ValueError):
        Argon2Params(memory_cost, iterations, lanes)


# --- unlocking ------------------------------------------------------------------------------------


def test_wrong_passphrase_is_refused_and_leaves_the_file_byte_identical(store: Keystore, db_path: Path) -> None:
    store.put("ns", "k", b"v")
    store.close()
    before = digest(db_path)
    with pytest.raises(WrongPassphrase):
        Keystore.open(db_path, passphrase="wrong")
    assert digest(db_path) == before
    with Keystore.open(db_path, passphrase=PASS) as ks:
        assert ks.get("ns", "k") == b"v"


def test_missing_file_without_create(db_path: Path) -> None:
    with pytest.raises(KeystoreNotFound):
        Keystore.open(db_path, passphrase=PASS)
    assert not db_path.exists()


@pytest.mark.parametrize("credentials", [{}, {"passphrase": PASS, "key_file": Path("k")}])
def test_exactly_one_credential(db_path: Path, credentials: dict[str, object]) -> None:
    with pytest.raises(KeystoreError, match="exactly one"):
        Keystore.open(db_path, create=True, **credentials)  # type: ignore[arg-type]


def test_key_file_unlocks_and_a_wrong_one_does_not(tmp_path: Path, db_path: Path) -> None:
    key_file, other = tmp_path / "kek", tmp_path / "other"
    key_file.write_bytes(os.urandom(32))
    other.write_bytes(os.urandom(32))
    with Keystore.open(db_path, key_file=key_file, create=True) as ks:
        ks.put("ns", "k", b"v")
    key_bytes = key_file.read_bytes()
    with Keystore.open(db_path, key_file=key_file) as ks:
        assert ks.get("ns", "k") == b"v"
    assert key_file.read_bytes() == key_bytes  # read, never written
    before = digest(db_path)
    with pytest.raises(WrongPassphrase):
        Keystore.open(db_path, key_file=other)
    assert digest(db_path) == before
    with pytest.raises(KeystoreError, match="key file"):
        Keystore.open(db_path, passphrase=PASS)


def test_key_file_must_be_32_bytes(tmp_path: Path, db_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"x" * 31)
    with pytest.raises(KeystoreError, match="32 bytes"):
        Keystore.open(db_path, key_file=short, create=True)
    assert not db_path.exists()


def test_passphrase_store_refuses_a_key_file(store: Keystore, db_path: Path, tmp_path: Path) -> None:
    store.close()
    key_file = tmp_path / "kek"
    key_file.write_bytes(os.urandom(32))
    with pytest.raises(KeystoreError, match="passphrase"):
        Keystore.open(db_path, key_file=key_file)


def test_passphrase_is_unicode_normalised(db_path: Path) -> None:
    with Keystore.open(db_path, passphrase="caf\u00e9", create=True, argon2=ARGON2_TEST) as ks:
        ks.put("ns", "k", b"v")
    with Keystore.open(db_path, passphrase="cafe\u0301") as ks:
        assert ks.get("ns", "k") == b"v"


def test_not_a_keystore(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(KeystoreCorrupt):
        Keystore.open(garbage, passphrase=PASS)
    empty_sqlite = tmp_path / "empty.db"
    sqlite3.connect(empty_sqlite).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(KeystoreCorrupt):
        Keystore.open(empty_sqlite, passphrase=PASS)


def test_a_directory_in_place_of_the_file_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "keystore.db").mkdir()
    with pytest.raises(StorageError):
        Keystore.open(tmp_path / "keystore.db", passphrase=PASS)


def test_edited_header_does_not_unlock(store: Keystore, db_path: Path) -> None:
    store.close()
    raw = sqlite3.connect(db_path)
    header = json.loads(raw.execute("SELECT value FROM meta WHERE name = 'header'").fetchone()[0])
    header["params"]["iterations"] += 1
    raw.execute("UPDATE meta SET value = ? WHERE name = 'header'", (json.dumps(header).encode(),))
    raw.commit()
    raw.close()
    with pytest.raises(WrongPassphrase):
        Keystore.open(db_path, passphrase=PASS)


def test_unreadable_header_is_corrupt(store: Keystore, db_path: Path) -> None:
    store.close()
    raw = sqlite3.connect(db_path)
    raw.execute("UPDATE meta SET value = ? WHERE name = 'header'", (b"{not json",))
    raw.commit()
    raw.close()
    with pytest.raises(KeystoreCorrupt):
        Keystore.open(db_path, passphrase=PASS)


# --- sealing --------------------------------------------------------------------------------------


def test_records_cannot_be_swapped_or_edited(store: Keystore, db_path: Path) -> None:
    store.put("ns", "alice", b"alice's key")
    store.put("ns", "bob", b"bob's key")
    raw = sqlite3.connect(db_path)
    sealed = raw.execute("SELECT sealed FROM records WHERE name = 'alice'").fetchone()[0]
    raw.execute("UPDATE records SET sealed = ? WHERE name = 'bob'", (sealed,))
    raw.commit()
    with pytest.raises(KeystoreCorrupt, match="ns/bob"):
        store.get("ns", "bob")
    raw.execute("INSERT INTO records VALUES ('other', 'alice', ?)", (sealed,))
    raw.commit()
    with pytest.raises(KeystoreCorrupt):
        store.get("other", "alice")
    flipped = bytes([sealed[0] ^ 1]) + sealed[1:]
    raw.execute("UPDATE records SET sealed = ? WHERE name = 'alice'", (flipped,))
    raw.commit()
    raw.close()
    with pytest.raises(KeystoreCorrupt):
        store.get("ns", "alice")


def test_values_and_the_data_key_never_reach_the_disk(store: Keystore, db_path: Path) -> None:
    secret = os.urandom(32)
    store.put("ns", "label-in-clear", secret)
    on_disk = disk_bytes(db_path)
    assert b"label-in-clear" in on_disk  # names are labels, stored in clear: the search works
    assert secret not in on_disk
    assert store._data_key not in on_disk


def test_deleted_record_leaves_no_trace_after_scrub(store: Keystore, db_path: Path) -> None:
    store.put("ns", "doomed", os.urandom(64))
    store.put("ns", "kept", b"v")
    sealed = store.connection.execute("SELECT sealed FROM records WHERE name = 'doomed'").fetchone()[0]
    assert sealed in disk_bytes(db_path)
    store.delete("ns", "doomed")
    store.scrub()
    assert sealed not in disk_bytes(db_path)
    assert store.get("ns", "kept") == b"v"


def test_repr_shows_no_key_bytes(store: Keystore) -> None:
    text = repr(store)
    assert store._data_key.hex() not in text
    assert repr(store._data_key) not in text
    assert "keystore.db" in text
    assert repr(Keystore.memory()) == "<Keystore :memory:>"


# --- transactions ---------------------------------------------------------------------------------


def test_transaction_commits_all_or_nothing(store: Keystore) -> None:
    with store.transaction():
        store.put("ns", "a", b"1")
        store.put("ns", "b", b"2")
    assert store.names("ns") == ["a", "b"]
    with pytest.raises(RuntimeError), store.transaction():
        store.put("ns", "c", b"3")
        store.delete("ns", "a")
        raise RuntimeError("boom")
    assert store.names("ns") == ["a", "b"]


def test_nested_transaction_rolls_back_only_its_own_writes(store: Keystore) -> None:
    with store.transaction():
        store.put("ns", "outer", b"1")
        with pytest.raises(RuntimeError), store.transaction():
            store.put("ns", "inner", b"2")
            raise RuntimeError("boom")
        with store.transaction():
            store.put("ns", "inner-ok", b"3")
    assert store.names("ns") == ["inner-ok", "outer"]


def test_transaction_is_visible_to_another_connection_only_after_commit(store: Keystore, db_path: Path) -> None:
    with store.transaction():
        store.put("ns", "a", b"1")
        with Keystore.open(db_path, passphrase=PASS) as other:
            assert other.get("ns", "a") is None
    with Keystore.open(db_path, passphrase=PASS) as other:
        assert other.get("ns", "a") == b"1"


# --- the AES-256-GCM wrapper ----------------------------------------------------------------------


def test_seal_open_round_trip_and_failures() -> None:
    key = os.urandom(32)
    sealed = aes_gcm_seal(key, b"data", b"aad")
    assert len(sealed) == 12 + 4 + 16
    assert aes_gcm_open(key, sealed, b"aad") == b"data"
    assert aes_gcm_seal(key, b"data", b"aad")[:12] != sealed[:12]  # fresh nonce each time
    with pytest.raises(InvalidTag):
        aes_gcm_open(key, sealed, b"other aad")
    with pytest.raises(InvalidTag):
        aes_gcm_open(key, sealed[:27], b"aad")
    with pytest.raises(ValueError):
        aes_gcm_seal(os.urandom(16), b"data", b"")
    with pytest.raises(ValueError):
        _aes_gcm_seal_from_parts(key, b"short", b"data", b"")


def aes_gcm_vectors() -> list[dict[str, str]]:
    data = json.loads((VECTORS / "aes_gcm_test.json").read_text())
    return [
        test
        for group in data["testGroups"]
        if group["keySize"] == 256 and group["ivSize"] == 96 and group["tagSize"] == 128
        for test in group["tests"]
    ]


AES_GCM_VECTORS = aes_gcm_vectors()


def test_wycheproof_aes_gcm_selection_is_complete() -> None:
    results = [t["result"] for t in AES_GCM_VECTORS]
    assert (len(results), results.count("valid"), results.count("invalid")) == (66, 39, 27)


@pytest.mark.parametrize("vector", AES_GCM_VECTORS, ids=lambda t: f"tc{t['tcId']}-{t['result']}")
def test_wycheproof_aes_gcm(vector: dict[str, str]) -> None:
    key, iv, aad, msg = (bytes.fromhex(vector[k]) for k in ("key", "iv", "aad", "msg"))
    sealed = iv + bytes.fromhex(vector["ct"]) + bytes.fromhex(vector["tag"])
    if vector["result"] == "valid":
        assert _aes_gcm_seal_from_parts(key, iv, msg, aad) == sealed
        assert aes_gcm_open(key, sealed, aad) == msg
    else:
        with pytest.raises(InvalidTag):
            aes_gcm_open(key, sealed, aad)
