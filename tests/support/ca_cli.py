"""Helpers and fixtures of tests/cli/test_ca_cli.py that other test modules use too."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ca.admin import code_at
from node.clock import utcnow

ROOT = Path(__file__).resolve().parent.parent.parent
PASS = "cli ca passphrase"


def env(passphrase: str | None = PASS) -> dict[str, str]:
    """The environment of a user with cheap Argon2 and no other KMSNET_ setting."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}
    base["KMSNET_ARGON2_PROFILE"] = "test"
    if passphrase is not None:
        base["KMSNET_PASSPHRASE"] = passphrase
    return base


def run(*args: str, passphrase: str | None = PASS, **more_env: str) -> subprocess.CompletedProcess[str]:
    """`python -m kmsnet ARGS` without a terminal (a prompt fails instead of hanging), `more_env` added."""
    return subprocess.run(
        [sys.executable, "-m", "kmsnet", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**env(passphrase), **more_env},
        start_new_session=True,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], code: int, fragment: str = "") -> str:
    """Assert the exit code and a one-line error on stderr, without a traceback."""
    err = result.stderr
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err
    if code != 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    return err


@dataclass(frozen=True)
class Authenticator:
    """An administrator's authenticator app, on the real clock."""

    secret: bytes

    def code(self, ahead: int = 0) -> str:
        """The code shown now, or `ahead` 30-second steps later (the CA accepts one step ahead)."""
        return code_at(self.secret, utcnow() + timedelta(seconds=30 * ahead))

    def wrong_code(self) -> str:
        """A code no step near now has."""
        near = {self.code(ahead) for ahead in range(-2, 3)}
        return next(code for code in ("000000", "111111", "222222", "333333", "444444", "555555") if code not in near)
