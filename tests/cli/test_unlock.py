"""kmsnet/unlock.py and `kmsnet unlock`/`lock`: a home's keys kept for a bounded time, never the
passphrase, sealed apart from the secret that opens them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from kmsnet import unlock
from node.errors import WrongPassphrase
from node.keystore import ARGON2_TEST, Keystore, unlocked_passphrase
from tests.support.pki import NOW

PASS = "unlock test passphrase"
ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    home = tmp_path / "alice"
    with Keystore.open(home / "keystore.db", passphrase=PASS, create=True, argon2=ARGON2_TEST) as keystore:
        keystore.put("node", "x", b"kept")
    return home


def test_an_unlock_opens_the_keystore_until_it_expires(home: Path) -> None:
    expires = unlock.unlock(home, PASS, timedelta(minutes=15), NOW)
    assert expires == NOW + timedelta(minutes=15)
    held = unlock.unlocked(home, NOW + timedelta(minutes=14))
    assert held is not None and PASS not in held
    with Keystore.open(home / "keystore.db", passphrase=held) as keystore:
        assert keystore.get("node", "x") == b"kept"
    assert unlock.unlocked(home, expires + timedelta(seconds=1)) is None
    assert not (home / unlock.UNLOCK_FILE).exists()  # an expired unlock is removed


def test_what_is_kept_is_private_and_never_the_passphrase(home: Path) -> None:
    unlock.unlock(home, PASS, timedelta(hours=100), NOW)  # capped at MAX_LIFETIME
    sealed = home / unlock.UNLOCK_FILE
    secrets = list(Path(os.environ["XDG_RUNTIME_DIR"], "kmsnet").iterdir())
    assert len(secrets) == 1
    for path in (sealed, secrets[0]):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert PASS.encode() not in path.read_bytes()
    assert unlock.unlocked(home, NOW + unlock.MAX_LIFETIME + timedelta(seconds=1)) is None
    # Either file alone is useless: without the secret, nothing opens.
    unlock.unlock(home, PASS, timedelta(minutes=5), NOW)
    next(Path(os.environ["XDG_RUNTIME_DIR"], "kmsnet").iterdir()).unlink()
    assert unlock.unlocked(home, NOW) is None


def test_a_sealed_file_copied_to_another_home_does_not_open(home: Path, tmp_path: Path) -> None:
    unlock.unlock(home, PASS, timedelta(minutes=5), NOW)
    other = tmp_path / "bob"
    other.mkdir()
    (other / unlock.UNLOCK_FILE).write_bytes((home / unlock.UNLOCK_FILE).read_bytes())
    assert unlock.unlocked(other, NOW) is None


def test_lock_forgets_at_once_and_a_wrong_passphrase_unlocks_nothing(home: Path) -> None:
    with pytest.raises(WrongPassphrase):
        unlock.unlock(home, "not the passphrase", timedelta(minutes=5), NOW)
    assert not (home / unlock.UNLOCK_FILE).exists()
    unlock.unlock(home, PASS, timedelta(minutes=5), NOW)
    assert unlock.lock(home) and unlock.unlocked(home, NOW) is None and not unlock.lock(home)
    with pytest.raises(unlock.UnlockError, match="no keystore"):
        unlock.unlock(home.parent / "empty", PASS, timedelta(minutes=5), NOW)


def test_an_unlocked_stand_in_never_creates_a_keystore(tmp_path: Path) -> None:
    stand_in = unlocked_passphrase({b"\x01" * 16: b"\x02" * 32})
    with pytest.raises(WrongPassphrase):
        Keystore.open(tmp_path / "new.db", passphrase=stand_in, create=True, argon2=ARGON2_TEST)
    assert not (tmp_path / "new.db").exists()


def test_the_commands_unlock_and_lock_a_home(home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}

    def kmsnet(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kmsnet", *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
            env={**env, **extra}, start_new_session=True, check=False,
        )  # fmt: skip

    done = kmsnet("unlock", "--home", str(home), "--for", "5m", KMSNET_PASSPHRASE=PASS)
    assert done.returncode == 0 and done.stdout.startswith(f"unlocked {home} until "), done.stderr
    # No passphrase anywhere now, and no terminal: the unlock opens it.
    opened = kmsnet("kms", "list", "--home", str(home))
    assert opened.returncode == 0, opened.stderr
    assert kmsnet("lock", "--home", str(home)).stdout == f"locked {home}\n"
    refused = kmsnet("kms", "list", "--home", str(home))
    assert refused.returncode == 2 and "no passphrase" in refused.stderr


def test_a_runtime_directory_others_can_read_is_refused_and_reads_as_locked(home: Path) -> None:
    unlock.unlock(home, PASS, timedelta(minutes=5), NOW)
    runtime = Path(os.environ["XDG_RUNTIME_DIR"], "kmsnet")
    runtime.chmod(0o755)
    assert unlock.unlocked(home, NOW) is None  # no traceback, no secret taken from there
    with pytest.raises(unlock.UnlockError, match="not a private directory"):
        unlock.unlock(home, PASS, timedelta(minutes=5), NOW)
