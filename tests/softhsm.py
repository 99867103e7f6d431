"""A SoftHSM token for the tests: `softhsm_token` makes one per test session in a temporary directory.

PKCS#11 reads its configuration (SOFTHSM2_CONF) once per process, when the module is first
loaded, and SoftHSM does not see tokens created after that; so every test in a run shares one
token, and each test's keys are kept apart by their random CKA_IDs. Without SoftHSM installed the
tests that need it skip locally and fail under CI=true (`.ci/run` installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.pkcs11 import TokenSlot

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
TOKEN_LABEL = "kmsnet-test"
PIN = "4711-test-pin"
SO_PIN = "9999-test-so"


@dataclass(frozen=True)
class SoftHsm:
    """The test token: where it is, its PIN, and the environment a `kmsnet` subprocess needs to use it."""

    slot: TokenSlot
    pin: str
    conf: Path

    @property
    def module(self) -> str:
        """The PKCS#11 module's path."""
        return self.slot.module

    @property
    def token(self) -> str:
        """The token's label."""
        return self.slot.token

    def env(self) -> dict[str, str]:
        """Environment for a child process: this token's configuration and PIN."""
        return {"SOFTHSM2_CONF": str(self.conf), "KMSNET_PKCS11_PIN": self.pin}


def _module() -> str | None:
    return next((path for path in MODULE_CANDIDATES if Path(path).exists()), None)


@pytest.fixture(scope="session", name="softhsm_token")
def softhsm_token_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """One initialised SoftHSM token for the whole run (module docstring)."""
    module = _module()
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        reason = "SoftHSM is not installed (apt-get install softhsm2; .ci/run does it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(conf))
        subprocess.run(
            [util, "--init-token", "--free", "--label", TOKEN_LABEL, "--pin", PIN, "--so-pin", SO_PIN],
            check=True,
            capture_output=True,
        )
        yield SoftHsm(TokenSlot(module, TOKEN_LABEL), PIN, conf)
