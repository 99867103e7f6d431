"""The node's encrypted keystore: sealed records in one SQLite file.

Every secret a node holds (KMS keys now; identity keys, prekeys and ratchet states later) lives
here as a record `(namespace, name) -> bytes`. Namespaces and names are stored in clear (they
are labels, not secrets); every value is sealed:

    sealed = nonce (12 bytes, random) || AES-256-GCM(data key, value, aad) || tag (16 bytes)
    aad    = b"kmsnet-keystore/1 record" || u16 len || namespace || u16 len || name   (UTF-8)

so a record copied onto another (namespace, name) fails to authenticate. The data key is 256
random bits, generated when the file is created and never stored in clear: the `meta` table holds
it wrapped (AES-256-GCM) under a key-encryption key (KEK) derived either

- from a passphrase with Argon2id (parameters and a 16-byte salt in `meta`; `ARGON2_INTERACTIVE`
  by default: 64 MiB, 3 iterations, 4 lanes), or
- from a 32-byte key file with HKDF-SHA256 (the key file is only read, never written), or
- not derived at all: an AES-256 key generated in a PKCS#11 token (`token=`, then `pin=`), which
  wraps and unwraps the data key inside the token (AES-GCM there); the header names the token
  and the key, and the key never leaves the token. Whoever copies such a file needs the token too.

The wrapped data key's associated data is the file's header (format, KDF and its parameters), so
editing the parameters is detected like a wrong passphrase. A wrong passphrase raises
`WrongPassphrase` before anything is written: the file stays byte-identical.

Nonce bound: nonces are 96-bit random values. NIST SP 800-38D keeps the chance of a repeated
nonce under 2**-32 for up to 2**32 seals under one key; a keystore seals once per `put`, so a
file would need four billion writes to reach that bound (a node writes a few per message).

The file is SQLite in WAL mode with `synchronous=FULL` (a committed write survives a power cut)
and `secure_delete=ON` (a deleted record's bytes are overwritten). After deleting secrets, call
`scrub()` to checkpoint and truncate the write-ahead log, so no copy of the old pages lingers
there either. Other tables may share the file (the audit log does): `connection` and
`transaction()` are there for them.

Python cannot wipe memory reliably: key bytes stay in the process until garbage-collected. The
keystore keeps them out of `repr`, logs and exceptions.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import struct
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from node.errors import KeystoreCorrupt, KeystoreError, KeystoreNotFound, StorageError, WrongPassphrase
from node.pkcs11 import Pin, TokenKeyRef, TokenSession, TokenSlot

FORMAT = "kmsnet-keystore/1"
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
SALT_SIZE = 16

_RECORD_AAD = b"kmsnet-keystore/1 record"
_DATA_KEY_AAD = b"kmsnet-keystore/1 data-key"
_KEY_FILE_INFO = b"kmsnet-keystore/1 key-file kek"
_DERIVED_INFO = b"kmsnet-keystore/1 derived "
_BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (namespace, name)
) WITHOUT ROWID;
"""


# --- AES-256-GCM ------------------------------------------------------------------------------------


def aes_gcm_seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt with AES-256-GCM under a fresh random 96-bit nonce; return nonce || ciphertext || tag."""
    return _aes_gcm_seal_from_parts(key, secrets.token_bytes(NONCE_SIZE), plaintext, aad)


def _aes_gcm_seal_from_parts(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """`aes_gcm_seal` with the nonce given: the seam test vectors go through."""
    _check_key(key)
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"AES-GCM nonce must be {NONCE_SIZE} bytes")
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def aes_gcm_open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Decrypt what `aes_gcm_seal` returned; raise `cryptography.exceptions.InvalidTag` if it does not authenticate.

    A blob too short to hold a nonce and a tag is refused the same way, so callers have one
    failure to translate.
    """
    _check_key(key)
    if len(sealed) < NONCE_SIZE + TAG_SIZE:
        raise InvalidTag
    return AESGCM(key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)


def _check_key(key: bytes) -> None:
    # Only AES-256: a 128- or 192-bit key here would be a bug elsewhere, not a choice.
    if len(key) != KEY_SIZE:
        raise ValueError(f"AES-256-GCM key must be {KEY_SIZE} bytes")


# --- key derivation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Argon2Params:
    """Argon2id cost parameters; `memory_cost` is in KiB. Stored in the file, so each file keeps its own."""

    memory_cost: int
    iterations: int
    lanes: int

    def __post_init__(self) -> None:
        # Bounds also protect `open` from a file whose header asks for absurd work.
        if not 1 <= self.lanes <= 64:
            raise ValueError("argon2 lanes must be within 1..64")
        if not 8 * self.lanes <= self.memory_cost <= 4 * 1024 * 1024:
            raise ValueError("argon2 memory_cost must be within 8*lanes KiB..4 GiB")
        if not 1 <= self.iterations <= 64:
            raise ValueError("argon2 iterations must be within 1..64")


ARGON2_INTERACTIVE = Argon2Params(memory_cost=64 * 1024, iterations=3, lanes=4)
"""The default for new keystores: about 0.1-0.3 s and 64 MiB to open."""

ARGON2_TEST = Argon2Params(memory_cost=32, iterations=1, lanes=4)
"""Cheap and weak: for test suites only (the command line's `KMSNET_ARGON2_PROFILE=test`)."""

ARGON2_PROFILES = {"interactive": ARGON2_INTERACTIVE, "test": ARGON2_TEST}


#: A stand-in for a passphrase that carries the keys `kmsnet unlock` derived from the real one, by
#: keystore salt (kmsnet/unlock.py): it opens those keystores without Argon2, and creates none.
UNLOCKED_PREFIX = "kmsnet-unlocked:v1:"


def unlocked_passphrase(keys: dict[bytes, bytes]) -> str:
    """The stand-in passphrase for these {salt: key-encryption key} pairs (see UNLOCKED_PREFIX)."""
    return UNLOCKED_PREFIX + ",".join(f"{salt.hex()}.{kek.hex()}" for salt, kek in keys.items())


def _passphrase_kek(passphrase: str, salt: bytes, params: Argon2Params) -> bytes:
    if passphrase.startswith(UNLOCKED_PREFIX):
        keys = dict(pair.split(".", 1) for pair in passphrase.removeprefix(UNLOCKED_PREFIX).split(",") if "." in pair)
        if salt.hex() not in keys:
            raise WrongPassphrase("the unlocked key is not this keystore's: give its passphrase")
        return bytes.fromhex(keys[salt.hex()])
    # NFC so that the same passphrase typed on two keyboards derives the same key.
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    kdf = Argon2id(
        salt=salt, length=KEY_SIZE, iterations=params.iterations, lanes=params.lanes, memory_cost=params.memory_cost
    )
    return kdf.derive(secret)


def _key_file_kek(key_file: Path, salt: bytes) -> bytes:
    try:
        ikm = key_file.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read key file {key_file}: {exc.strerror}") from exc
    if len(ikm) != KEY_SIZE:
        raise KeystoreError(f"key file {key_file} must hold exactly {KEY_SIZE} bytes")
    return HKDF(hashes.SHA256(), KEY_SIZE, salt=salt, info=_KEY_FILE_INFO).derive(ikm)


def _parse_header(header: bytes, path: Path) -> tuple[str, dict[str, Any], bytes]:
    """(kdf, params, salt) of a keystore header; `KeystoreCorrupt` unless it is one this version reads."""
    try:
        parsed = json.loads(header)
        params = parsed["params"]
        salt = bytes.fromhex(params["salt"])
        kdf = parsed["kdf"]
        if parsed["format"] != FORMAT or len(salt) != SALT_SIZE or kdf not in ("argon2id", "key-file", "pkcs11"):
            raise ValueError("unsupported header")
    except (ValueError, KeyError, TypeError) as exc:
        raise KeystoreCorrupt(f"{path} has an unreadable or unsupported header") from exc
    return str(kdf), dict(params), salt


def _token_wrap(slot: TokenSlot, pin: Pin, params: dict[str, object]) -> tuple[bytes, bytes]:
    """(wrapped data key, header) for a new keystore whose data key a new AES key in `slot`'s token wraps."""
    with TokenSession.open(slot, pin) as session:
        kek = session.generate_aes256("kmsnet-keystore-kek")
        params.update(module=slot.module, token=slot.token, key_id=kek.ref.key_id.hex(), label=kek.ref.label)
        header = _header("pkcs11", params)
        nonce = secrets.token_bytes(NONCE_SIZE)
        return nonce + kek.encrypt(nonce, secrets.token_bytes(KEY_SIZE), _DATA_KEY_AAD + header), header


def _token_unwrap(params: dict[str, Any], pin: Pin, wrapped: bytes, header: bytes, path: Path) -> bytes:
    """The data key, unwrapped inside the token the header names."""
    try:
        slot = TokenSlot(str(params["module"]), str(params["token"]))
        ref = TokenKeyRef(slot, bytes.fromhex(str(params["key_id"])), "aes256", str(params["label"]))
    except (KeyError, ValueError) as exc:
        raise KeystoreCorrupt(f"{path} has an unreadable or unsupported header") from exc
    with TokenSession.open(slot, pin) as session:
        data_key = session.aes256(ref).decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], _DATA_KEY_AAD + header)
    if data_key is None or len(data_key) != KEY_SIZE:
        raise KeystoreCorrupt(f"the token's key does not open {path}")
    return data_key


def _record_aad(namespace: str, name: str) -> bytes:
    ns, nm = namespace.encode("utf-8"), name.encode("utf-8")
    return _RECORD_AAD + struct.pack(">H", len(ns)) + ns + struct.pack(">H", len(nm)) + nm


def _header(kdf: str, params: dict[str, object]) -> bytes:
    # Canonical JSON: the same header always gives the same bytes, which the data key's AAD covers.
    return json.dumps({"format": FORMAT, "kdf": kdf, "params": params}, sort_keys=True, separators=(",", ":")).encode()


@contextlib.contextmanager
def _storage_errors(what: str) -> Iterator[None]:
    """Turn SQLite failures into `StorageError`, naming the operation (never a value)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageError(f"keystore {what} failed: {exc}") from exc


# --- the keystore ---------------------------------------------------------------------------------


class Keystore:
    """Sealed `(namespace, name) -> bytes` records in one SQLite file (or in memory).

    Open with `Keystore.open(path, passphrase=...)` or `Keystore.memory()`; use as a context
    manager or call `close()`. One instance is one SQLite connection: share it within a thread.
    """

    def __init__(self, db: sqlite3.Connection, data_key: bytes, path: Path | None) -> None:
        """Internal: use `open` or `memory`."""
        self._db = db
        self._data_key = data_key
        self._path = path
        self._depth = 0
        # One connection, usable from the event loop and from a node's journal thread: every
        # operation holds this lock, a transaction for its whole length.
        self._lock = threading.RLock()
        self._sync = True  # synchronous=FULL, as opened

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        passphrase: str | None = None,
        key_file: Path | None = None,
        create: bool = False,
        argon2: Argon2Params = ARGON2_INTERACTIVE,
        pin: Pin | None = None,
        token: TokenSlot | None = None,
    ) -> Keystore:
        """Open the keystore at `path`, unlocking it with exactly one of `passphrase`, `key_file`
        or `pin` (the PIN of the PKCS#11 token whose key wraps its data key).

        With `create=True` a missing file is created (mode 0600, with `argon2` cost parameters
        when a passphrase is used; with `pin`, its data key wrapped by a new key in `token`); an
        existing file is opened with its own parameters. Raises `KeystoreNotFound`,
        `WrongPassphrase` (nothing written), `KeystoreCorrupt` (not a kmsnet keystore, or a
        damaged header), `StorageError`, or the token's errors.
        """
        path = Path(path)
        if [passphrase, key_file, pin].count(None) != 2:
            raise KeystoreError("give exactly one of a passphrase, a key file or a token PIN")
        if not path.exists():
            if not create:
                raise KeystoreNotFound(f"no keystore at {path}")
            if pin is not None and token is None:
                raise KeystoreError("a keystore unlocked by a token needs the token to make its key in")
            cls._create_file(path, passphrase, key_file, argon2, (token, pin))
        return cls._unlock(path, passphrase, key_file, pin)

    @staticmethod
    def unlocked_by(path: Path | str) -> str:
        """How the keystore at `path` is unlocked: "passphrase", "key-file" or "pkcs11" (reads only its header).

        Raises `KeystoreNotFound` or `KeystoreCorrupt`.
        """
        path = Path(path)
        if not path.exists():
            raise KeystoreNotFound(f"no keystore at {path}")
        try:
            db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open keystore {path}: {exc}") from exc
        try:
            header, _ = Keystore._read_meta(db, path)
        finally:
            db.close()
        kdf = _parse_header(header, path)[0]
        return {"argon2id": "passphrase", "key-file": "key-file"}.get(kdf, "pkcs11")

    @classmethod
    def memory(cls) -> Keystore:
        """A keystore that lives in memory only (for tests and the seed's `KeyManagementSystem()`)."""
        db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        db.executescript(_SCHEMA)
        return cls(db, secrets.token_bytes(KEY_SIZE), None)

    @staticmethod
    def _create_file(
        path: Path,
        passphrase: str | None,
        key_file: Path | None,
        argon2: Argon2Params,
        token: tuple[TokenSlot | None, Pin | None],
    ) -> None:
        salt = secrets.token_bytes(SALT_SIZE)
        params: dict[str, object] = {"salt": salt.hex()}
        slot, pin = token
        if slot is not None and pin is not None:
            wrapped, header = _token_wrap(slot, pin, params)
        else:
            if passphrase is not None:
                kdf = "argon2id"
                params.update(memory_cost=argon2.memory_cost, iterations=argon2.iterations, lanes=argon2.lanes)
                kek = _passphrase_kek(passphrase, salt, argon2)
            else:
                assert key_file is not None
                kdf = "key-file"
                kek = _key_file_kek(key_file, salt)
            header = _header(kdf, params)
            wrapped = aes_gcm_seal(kek, secrets.token_bytes(KEY_SIZE), _DATA_KEY_AAD + header)
        # Build the file under a temporary name and link it into place, so a crash never leaves
        # a half-made keystore where the real one belongs.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            with _storage_errors("create"):
                db = sqlite3.connect(tmp, isolation_level=None)
                try:
                    os.chmod(tmp, 0o600)
                    db.execute("PRAGMA journal_mode=WAL")
                    db.executescript(_SCHEMA)
                    db.executemany(
                        "INSERT INTO meta (name, value) VALUES (?, ?)", [("header", header), ("wrapped_key", wrapped)]
                    )
                finally:
                    db.close()
            # link, not rename: if another process created the keystore meanwhile, keep theirs.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def _unlock(cls, path: Path, passphrase: str | None, key_file: Path | None, pin: Pin | None) -> Keystore:
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open keystore {path}: {exc}") from exc
        try:
            # Only reads until the data key unwraps: a wrong passphrase must leave the file as it was.
            db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            header, wrapped = cls._read_meta(db, path)
            data_key = cls._unwrap(header, wrapped, (passphrase, key_file, pin), path)
            with _storage_errors("open"):
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA secure_delete=ON")
        except BaseException:
            db.close()
            raise
        return cls(db, data_key, path)

    @classmethod
    def passphrase_key(cls, path: Path | str, passphrase: str) -> tuple[bytes, bytes]:
        """(salt, key-encryption key) that `passphrase` derives for the keystore at `path`, checked to
        unwrap its data key: what `kmsnet unlock` keeps for a while instead of the passphrase.
        Raises what `open` raises (`WrongPassphrase`...)."""
        with cls.open(path, passphrase=passphrase) as keystore:
            header, _ = cls._read_meta(keystore._db, Path(path))
        params = json.loads(header)["params"]
        salt = bytes.fromhex(params["salt"])
        cost = Argon2Params(params["memory_cost"], params["iterations"], params["lanes"])
        return salt, _passphrase_kek(passphrase, salt, cost)

    @staticmethod
    def _read_meta(db: sqlite3.Connection, path: Path) -> tuple[bytes, bytes]:
        try:
            rows = dict(db.execute("SELECT name, value FROM meta WHERE name IN ('header', 'wrapped_key')").fetchall())
        except sqlite3.DatabaseError as exc:
            raise KeystoreCorrupt(f"{path} is not a kmsnet keystore") from exc
        header, wrapped = rows.get("header"), rows.get("wrapped_key")
        if not isinstance(header, bytes) or not isinstance(wrapped, bytes):
            raise KeystoreCorrupt(f"{path} is not a kmsnet keystore (no header)")
        return header, wrapped

    @staticmethod
    def _unwrap(header: bytes, wrapped: bytes, secret: tuple[str | None, Path | None, Pin | None], path: Path) -> bytes:
        passphrase, key_file, pin = secret
        kdf, params, salt = _parse_header(header, path)
        if kdf == "pkcs11":
            if pin is None:
                raise KeystoreError(f"{path} is unlocked by a PKCS#11 token: give its PIN")
            return _token_unwrap(params, pin, wrapped, header, path)
        try:
            cost = None
            if kdf == "argon2id":
                cost = Argon2Params(params["memory_cost"], params["iterations"], params["lanes"])
        except (KeyError, TypeError) as exc:
            raise KeystoreCorrupt(f"{path} has an unreadable or unsupported header") from exc
        if cost is not None:
            if passphrase is None:
                raise KeystoreError(f"{path} is unlocked by a passphrase, not a key file")
            kek = _passphrase_kek(passphrase, salt, cost)
        else:
            if key_file is None:
                raise KeystoreError(f"{path} is unlocked by a key file, not a passphrase")
            kek = _key_file_kek(key_file, salt)
        try:
            data_key = aes_gcm_open(kek, wrapped, _DATA_KEY_AAD + header)
        except InvalidTag:
            raise WrongPassphrase(f"wrong passphrase or key file for {path}") from None
        if len(data_key) != KEY_SIZE:
            raise KeystoreCorrupt(f"{path} holds a data key of the wrong size")
        return data_key

    # -- records ---------------------------------------------------------------------------------

    def derived_key(self, purpose: str) -> bytes:
        """A 32-byte key for `purpose`, derived from the data key (HKDF-SHA256): whoever holds it has
        unlocked this keystore. The control socket's requests prove the passphrase with it."""
        info = _DERIVED_INFO + purpose.encode("utf-8")
        return HKDF(hashes.SHA256(), KEY_SIZE, salt=None, info=info).derive(self._data_key)

    def put(self, namespace: str, name: str, value: bytes) -> None:
        """Seal `value` and store it under (namespace, name), replacing any previous value."""
        sealed = aes_gcm_seal(self._data_key, value, _record_aad(namespace, name))
        with self._lock, _storage_errors("write"):
            self._db.execute(
                "INSERT INTO records (namespace, name, sealed) VALUES (?, ?, ?) "
                "ON CONFLICT (namespace, name) DO UPDATE SET sealed = excluded.sealed",
                (namespace, name, sealed),
            )

    def seal_many(self, puts: dict[tuple[str, str], bytes]) -> list[tuple[str, str, bytes]]:
        """Sealed rows for `write_sealed` (done apart so that a writer thread only runs SQL)."""
        return [(ns, nm, aes_gcm_seal(self._data_key, value, _record_aad(ns, nm))) for (ns, nm), value in puts.items()]

    def write_sealed(
        self, rows: list[tuple[str, str, bytes]], deletes: set[tuple[str, str]], *, sync: bool = True
    ) -> None:
        """Write rows from `seal_many` and apply `deletes`, in one transaction.

        Meant for a writer thread: the statements and the commit run inside SQLite, which
        releases the interpreter, so the event loop keeps running meanwhile. With `sync` the
        commit is fsynced (synchronous=FULL), which also makes every earlier commit durable;
        without, it survives a crash of the process but not of the machine (synchronous=NORMAL
        in WAL mode).
        """
        with self._lock, _storage_errors("write"):
            if sync != self._sync:
                self._db.execute(f"PRAGMA synchronous={'FULL' if sync else 'NORMAL'}")
                self._sync = sync
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if rows:
                    self._db.executemany(
                        "INSERT INTO records (namespace, name, sealed) VALUES (?, ?, ?) "
                        "ON CONFLICT (namespace, name) DO UPDATE SET sealed = excluded.sealed",
                        rows,
                    )
                if deletes:
                    self._db.executemany("DELETE FROM records WHERE namespace = ? AND name = ?", deletes)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get(self, namespace: str, name: str) -> bytes | None:
        """The unsealed value under (namespace, name), or None; `KeystoreCorrupt` if it does not authenticate."""
        with self._lock, _storage_errors("read"):
            row = self._db.execute(
                "SELECT sealed FROM records WHERE namespace = ? AND name = ?", (namespace, name)
            ).fetchone()
        if row is None:
            return None
        try:
            return aes_gcm_open(self._data_key, row[0], _record_aad(namespace, name))
        except InvalidTag:
            raise KeystoreCorrupt(f"keystore record {namespace}/{name} does not authenticate") from None

    def delete(self, namespace: str, name: str) -> bool:
        """Delete the record; return whether it existed. Call `scrub()` afterwards to clear the log too."""
        with self._lock, _storage_errors("delete"):
            cursor = self._db.execute("DELETE FROM records WHERE namespace = ? AND name = ?", (namespace, name))
        return cursor.rowcount > 0

    def names(self, namespace: str, prefix: str = "") -> list[str]:
        """The names in `namespace` (starting with `prefix`), sorted."""
        with self._lock, _storage_errors("read"):
            rows = self._db.execute("SELECT name FROM records WHERE namespace = ? ORDER BY name", (namespace,))
            return [name for (name,) in rows if name.startswith(prefix)]

    def items(self, namespace: str) -> list[tuple[str, bytes]]:
        """Every (name, unsealed value) in `namespace`, sorted by name, read at once (a load of many records)."""
        with self._lock, _storage_errors("read"):
            rows = self._db.execute(
                "SELECT name, sealed FROM records WHERE namespace = ? ORDER BY name", (namespace,)
            ).fetchall()
        out = []
        for name, sealed in rows:
            try:
                out.append((name, aes_gcm_open(self._data_key, sealed, _record_aad(namespace, name))))
            except InvalidTag:
                raise KeystoreCorrupt(f"keystore record {namespace}/{name} does not authenticate") from None
        return out

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Make the writes inside atomic: all committed on a normal exit, none on an exception.

        Transactions nest (inner ones are savepoints). The outer one takes SQLite's write lock
        at once (`BEGIN IMMEDIATE`), so a read-modify-write inside cannot race another process;
        it holds the instance's lock throughout, so it cannot interleave with another thread's.
        """
        with self._lock:
            yield from self._transaction()

    def _transaction(self) -> Iterator[None]:
        depth = self._depth
        savepoint = f"sp{depth}"
        with _storage_errors("begin"):
            self._db.execute(f"SAVEPOINT {savepoint}" if depth else "BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield
        except BaseException:
            with _storage_errors("rollback"):
                self._db.execute(f"ROLLBACK TO {savepoint}" if depth else "ROLLBACK")
                if depth:
                    self._db.execute(f"RELEASE {savepoint}")
            raise
        else:
            with _storage_errors("commit"):
                self._db.execute(f"RELEASE {savepoint}" if depth else "COMMIT")
        finally:
            self._depth = depth

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the file, without waiting for readers (a passive checkpoint)."""
        if self._path is not None:
            with self._lock, _storage_errors("checkpoint"):
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def auto_checkpoint(self, on: bool) -> None:
        """Let SQLite checkpoint inside a commit once the log is 1,000 pages long (its default), or not:
        a writer that checkpoints by itself (the node's journal) turns it off."""
        with self._lock, _storage_errors("configure"):
            self._db.execute(f"PRAGMA wal_autocheckpoint={1000 if on else 0}")

    def scrub(self) -> None:
        """Checkpoint the write-ahead log into the file and truncate it (best effort while others read).

        With `secure_delete=ON`, a deleted record is overwritten in the database pages; the log may
        still hold older copies of those pages until this runs.
        """
        if self._path is not None:
            with _storage_errors("checkpoint"):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        """The file, or None for an in-memory keystore."""
        return self._path

    @property
    def connection(self) -> sqlite3.Connection:
        """The SQLite connection, for sibling tables in the same file (the audit log); use `transaction()`."""
        return self._db

    def close(self) -> None:
        """Close the connection; the instance is unusable afterwards."""
        self._db.close()

    def __enter__(self) -> Keystore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Keystore {self._path or ':memory:'}>"
