"""`kmsnet` as a whole: how every command fails, is interrupted, meets a closed pipe, completes."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}
    return {**base, "KMSNET_ARGON2_PROFILE": "test", **extra}


def kmsnet(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmsnet", *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env=env(**extra), start_new_session=True, check=False,
    )  # fmt: skip


def test_with_json_an_error_is_one_json_record_on_stderr(tmp_path: Path) -> None:
    result = kmsnet("kms", "decrypt", "--home", str(tmp_path), "k", "junk", "--json")
    assert result.returncode == 1 and result.stdout == ""
    record = json.loads(result.stderr)
    assert record == {"type": "error", "code": "bad_input", "message": record["message"], "exit": 1}
    assert "no keystore" in record["message"]


def test_with_json_a_usage_error_is_json_too() -> None:
    result = kmsnet("kms", "decrypt", "--json")
    assert result.returncode == 2
    assert json.loads(result.stderr) == {
        "type": "error", "code": "usage", "message": "Missing argument 'NAME'.", "exit": 2,
    }  # fmt: skip


def test_without_json_an_error_is_one_plain_line() -> None:
    result = kmsnet("scenario", "run", "--all", "nonsense")
    assert result.returncode == 2 and result.stderr.strip().endswith("give one scenario NAME, or --all")
    assert "{" not in result.stderr


def test_a_closed_pipe_ends_quietly_with_exit_0() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsnet", "completion", "bash"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=ROOT, env=env(), start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the command writes a byte
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
    proc.stderr.close()


def test_ctrl_c_at_a_passphrase_prompt_exits_130(tmp_path: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal session of its own, asked for a new keystore's passphrase
        os.chdir(ROOT)
        argv = [sys.executable, "-m", "kmsnet", "kms", "create", "k", "--home", str(tmp_path)]
        os.execve(sys.executable, argv, env())
    seen = b""
    deadline = time.monotonic() + 60
    while b"passphrase" not in seen.lower():
        assert time.monotonic() < deadline, seen
        if select.select([fd], [], [], 1)[0]:
            seen += os.read(fd, 1024)
    os.write(fd, b"\x03")  # Ctrl-C, as the terminal sends it
    while select.select([fd], [], [], 5)[0]:
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 130, seen
    assert b"Traceback" not in seen and b"interrupted" in seen


def test_ctrl_c_while_a_command_runs_exits_130(tmp_path: Path) -> None:
    # `kms decrypt` with no argument waits for stdin: interrupt it there.
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsnet", "kms", "decrypt", "k", "--home", str(tmp_path)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True, cwd=ROOT, env=env(), start_new_session=True,
    )  # fmt: skip
    wchan = Path(f"/proc/{proc.pid}/wchan")
    deadline = time.monotonic() + 60
    while "pipe_read" not in wchan.read_text():  # until it blocks reading stdin (Python is up, main runs)
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().endswith("error: interrupted") and "Traceback" not in err


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_for_each_shell(shell: str) -> None:
    result = kmsnet("completion", shell)
    assert result.returncode == 0 and "_KMSNET_COMPLETE" in result.stdout


def test_completion_of_a_subcommand(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kmsnet"], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env=env(_KMSNET_COMPLETE="bash_complete", COMP_WORDS="kmsnet kms de", COMP_CWORD="2"),
    )  # fmt: skip
    assert result.stdout.split() == ["plain,decrypt", "plain,destroy"]
