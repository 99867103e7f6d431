"""Helpers and fixtures of tests/cli/test_kms_cli.py that other test modules use too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
PASS = "cli test passphrase"


def run(
    home: Path | None, *args: str, stdin: bytes = b"", passphrase: str | None = PASS, **env: str
) -> subprocess.CompletedProcess[bytes]:
    """`python -m kmsnet kms ARGS` with cheap Argon2, no terminal, and only the environment given here."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}
    base["KMSNET_ARGON2_PROFILE"] = "test"
    if home is not None:
        base["KMSNET_HOME"] = str(home)
    if passphrase is not None:
        base["KMSNET_PASSPHRASE"] = passphrase
    return subprocess.run(
        [sys.executable, "-m", "kmsnet", "kms", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env={**base, **env},
        start_new_session=True,  # no controlling terminal: a prompt would fail instead of hanging
        check=False,
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def fails(result: subprocess.CompletedProcess[bytes], code: int, fragment: str = "") -> str:
    """Assert the exit code and the one-line, traceback-free error on stderr."""
    err = result.stderr.decode()
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err
    if code != 2:  # click's usage errors print the usage line before the error
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err
    return err


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    ok(run(home, "create", "session1"))
    return home
