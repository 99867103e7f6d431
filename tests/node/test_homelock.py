"""node.homelock: one exclusive writer per home, released by the kernel however its holder ends."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from node.errors import HomeInUse
from node.homelock import LOCK_NAME, HomeLock, read_holder


def test_one_holder_at_a_time_and_the_holder_is_described(tmp_path: Path) -> None:
    home = tmp_path / "alice"
    with HomeLock.acquire(home, "kmsnet receive --follow", serves=True) as lock:
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert stat.S_IMODE((home / LOCK_NAME).stat().st_mode) == 0o600
        # Another open file description, even in this process, is another would-be writer.
        assert HomeLock.try_acquire(home, "kmsnet send") is None
        with pytest.raises(HomeInUse) as refused:
            HomeLock.acquire(home, "kmsnet send")
        assert str(refused.value) == (
            f"{home} is in use by `kmsnet receive --follow` (pid {os.getpid()}): wait until it ends, or stop it"
        )
        holder = read_holder(home)
        assert holder is not None and (holder.serves, holder.serving) == (True, False)
        lock.set_serving(True)
        assert read_holder(home).serving  # type: ignore[union-attr]
    second = HomeLock.try_acquire(home, "kmsnet send")
    assert second is not None
    assert read_holder(home).command == "kmsnet send"  # type: ignore[union-attr]
    second.release()
    second.release()  # idempotent


def test_a_holder_killed_with_sigkill_leaves_the_home_free(tmp_path: Path) -> None:
    home = tmp_path / "alice"
    code = (
        "import sys, time; from node.homelock import HomeLock; "
        f"lock = HomeLock.acquire({str(home)!r}, 'kmsnet chat'); print('held', flush=True); time.sleep(60)"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        with pytest.raises(HomeInUse, match=rf"`kmsnet chat` \(pid {proc.pid}\)"):
            HomeLock.acquire(home, "kmsnet send")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with HomeLock.acquire(home, "kmsnet send"):  # the stale description is simply replaced
        assert read_holder(home).pid == os.getpid()  # type: ignore[union-attr]


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"pid": "x"}', b"\xff\xfe"])
def test_an_unreadable_description_names_nobody_in_particular(tmp_path: Path, content: bytes) -> None:
    (tmp_path / LOCK_NAME).write_bytes(content)
    assert read_holder(tmp_path) is None
    assert read_holder(tmp_path / "missing") is None
    with HomeLock.acquire(tmp_path, "kmsnet send"), pytest.raises(HomeInUse, match="another kmsnet process"):
        (tmp_path / LOCK_NAME).write_bytes(content)  # torn while held
        HomeLock.acquire(tmp_path, "kmsnet send")


def test_a_home_that_cannot_be_created_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(Exception, match="cannot lock"):
        HomeLock.acquire(tmp_path / "file" / "alice", "kmsnet send")


def test_a_home_made_for_nothing_is_removed_again(tmp_path: Path) -> None:
    """`node init` that fails must leave nothing behind: not even the lock it took."""
    home = tmp_path / "new" / "alice"
    HomeLock.acquire(home, "kmsnet node init").release()
    assert not home.exists()
    with HomeLock.acquire(home, "kmsnet node init"):
        (home / "keystore.db").write_bytes(b"made")
    assert sorted(p.name for p in home.iterdir()) == ["keystore.db", LOCK_NAME]
    existing = tmp_path / "bob"
    existing.mkdir()
    HomeLock.acquire(existing, "kmsnet node init").release()
    assert [p.name for p in existing.iterdir()] == [LOCK_NAME]  # not ours to remove
