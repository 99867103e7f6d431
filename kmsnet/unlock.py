"""`kmsnet unlock`: type a home's passphrase once, and let the next commands open its keystores
without it for a bounded time.

What is kept, and where (the trade-off, also in the README):
- Never the passphrase. `unlock` derives each keystore's key-encryption key (the Argon2id output
  for that keystore's salt: it opens that keystore and nothing else) and seals those keys with
  AES-256-GCM under a fresh random 32-byte secret, into HOME/.unlocked (mode 0600), with the
  expiry inside the sealed part.
- The secret goes to a separate file (0600) in the per-login runtime directory
  ($XDG_RUNTIME_DIR/kmsnet, a tmpfs emptied at logout; else a 0700 directory of this user's in
  the system's temporary directory). Either file alone is useless: a backup or a stolen disk
  image of HOME holds only the sealed keys, and the secret does not outlive the login.
- Anyone who can act as this user while it is unlocked can open the keystores, as they could
  wait for the passphrase to be typed. `kmsnet lock` ends it early; expiry ends it anyway.
- No OS keyring is used (none is a dependency); the runtime directory plays its part.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

from ca.authority import CA_DB
from node.home import KEYSTORE_FILE
from node.keystore import Keystore, aes_gcm_open, aes_gcm_seal, unlocked_passphrase

UNLOCK_FILE = ".unlocked"
DEFAULT_LIFETIME = timedelta(minutes=15)
MAX_LIFETIME = timedelta(hours=12)
_AAD = b"kmsnet unlock v1 "


class UnlockError(Exception):
    """The home cannot be unlocked (no keystore in it, an unsafe runtime directory)."""


def unlock(home: Path, passphrase: str, lifetime: timedelta, now: datetime) -> datetime:
    """Keep the keys of HOME's keystores (node or KMS keystore, CA) until `now + lifetime`; return
    that expiry. Raises the keystore's errors for a wrong passphrase, UnlockError without one."""
    stores = [home / name for name in (KEYSTORE_FILE, CA_DB) if (home / name).exists()]
    keys = dict(Keystore.passphrase_key(path, passphrase) for path in stores)
    if not keys:
        raise UnlockError(f"no keystore in {home} to unlock")
    expires = now + min(lifetime, MAX_LIFETIME)
    secret = secrets.token_bytes(32)
    body = json.dumps({"expires": expires.isoformat(), "keys": {s.hex(): k.hex() for s, k in keys.items()}})
    _write_private(home / UNLOCK_FILE, aes_gcm_seal(secret, body.encode(), _aad(home)))
    secret_path = _secret_path(home)
    assert secret_path is not None  # made when missing
    _write_private(secret_path, secret)
    return expires


def unlocked(home: Path, now: datetime) -> str | None:
    """The stand-in passphrase that opens HOME's keystores, while an unlock holds; else None (and
    what an expired or broken unlock left behind is removed)."""
    sealed_path = home / UNLOCK_FILE
    if not sealed_path.exists():
        return None
    try:
        secret_path = _secret_path(home, create=False)
    except UnlockError:
        secret_path = None  # an unsafe runtime directory: treat as locked (and ask for the passphrase)
    if secret_path is None or not secret_path.exists():
        return None
    try:
        body = json.loads(aes_gcm_open(secret_path.read_bytes(), sealed_path.read_bytes(), _aad(home)))
        if datetime.fromisoformat(body["expires"]) > now:
            return unlocked_passphrase({bytes.fromhex(s): bytes.fromhex(k) for s, k in body["keys"].items()})
    except Exception:  # noqa: BLE001, S110 - unreadable, tampered or from another home: locked again
        pass
    lock(home)
    return None


def lock(home: Path) -> bool:
    """Forget HOME's unlock now; whether there was one."""
    found = False
    try:
        secret_path = _secret_path(home, create=False)
    except UnlockError:
        secret_path = None  # not ours to touch; the sealed half alone opens nothing
    for path in (home / UNLOCK_FILE, secret_path):
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                found = True
    return found


def _aad(home: Path) -> bytes:
    # Bound to the home it was made for: a sealed file copied to another home does not open there.
    return _AAD + str(home.resolve()).encode()


def _secret_path(home: Path, *, create: bool = True) -> Path | None:
    name = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:32]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        directory = Path(runtime) / "kmsnet"
    else:
        directory = Path(tempfile.gettempdir()) / f"kmsnet-{os.getuid()}"
    if not directory.exists():
        if not create:
            return None
        directory.mkdir(mode=0o700)
    info = directory.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise UnlockError(f"{directory} is not a private directory of this user's: not keeping a secret there")
    return directory / name


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to a new 0600 file and move it over `path` (never readable by others, even briefly)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    tmp.replace(path)
