"""Helpers and fixtures of tests/ca/test_ca_pkcs11.py that other test modules use too."""

from __future__ import annotations

import subprocess

from tests.support.ca_cli import run as cli_run


def run(*args: str, pin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m kmsnet ARGS` without a terminal, with the token PIN in KMSNET_PKCS11_PIN if given."""
    return cli_run(*args, **({} if pin is None else {"KMSNET_PKCS11_PIN": pin}))
