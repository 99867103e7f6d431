"""Helpers and fixtures of tests/cli/test_cli_chat.py that other test modules use too."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CA_PASS = "ca passphrase"
NODE_PASS = "node passphrase"


def env(passphrase: str | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}
    base["KMSNET_ARGON2_PROFILE"] = "test"
    if passphrase is not None:
        base["KMSNET_PASSPHRASE"] = passphrase
    return base


def kmsnet(*args: str, passphrase: str | None = NODE_PASS, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmsnet", *args], input=stdin, capture_output=True, text=True, timeout=60,
        cwd=ROOT, env=env(passphrase), start_new_session=True, check=False,
    )  # fmt: skip


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stderr)
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr, result.stderr


@contextlib.contextmanager
def serving(*args: str, passphrase: str | None = None) -> Iterator[str]:
    """A long-running `kmsnet` command; yields the URL it prints first; SIGTERM must end it with 0."""
    with subprocess.Popen(
        [sys.executable, "-m", "kmsnet", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT, env=env(passphrase), start_new_session=True,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stderr is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, f"{args[0]} printed no URL"
            yield proc.stdout.readline().strip()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            assert "Traceback" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
