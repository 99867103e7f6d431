"""A SoftHSM token for the tests: `softhsm_token` makes one per test session in a temporary directory.

SoftHSM reads its configuration (SOFTHSM2_CONF) when the module is initialised, which a process
does once while it holds sessions; so every test in a run shares one token (made as the
hsm-theft scenario makes its own), and each test's keys are kept apart by their random CKA_IDs.
Child processes (`kmsnet ...`) inherit SOFTHSM2_CONF. Without SoftHSM installed the
tests that need it skip locally and fail under CI=true (`.ci/run` installs it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.pkcs11 import TokenSlot
from scenarios.cases.hsm_theft import make_softhsm_token, softhsm_module

TOKEN_LABEL = "kmsnet-test"
PIN = "4711-test-pin"


@dataclass(frozen=True)
class SoftHsm:
    """The test token: where it is, its PIN, and its SoftHSM configuration (SOFTHSM2_CONF while the run lasts)."""

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


def require_softhsm() -> None:
    """Skip the calling test when SoftHSM is not installed here; under CI=true, fail instead."""
    if softhsm_module() is None:
        reason = "SoftHSM is not installed (apt-get install softhsm2; .ci/run does it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session", name="softhsm_token")
def softhsm_token_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """One initialised SoftHSM token for the whole run (module docstring)."""
    require_softhsm()
    slot, conf = make_softhsm_token(tmp_path_factory.mktemp("softhsm"), TOKEN_LABEL, PIN)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(conf))
        yield SoftHsm(slot, PIN, conf)
