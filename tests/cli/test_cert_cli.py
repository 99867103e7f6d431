"""`kmsnet cert show`: a node's own certificate, readable, as JSON, and as PEM that openssl reads."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import certs
from tests.support.enrol import PASS, RunningCa, ca, enrol  # noqa: F401 - ca is a fixture

ROOT = Path(__file__).resolve().parent.parent.parent


def kmsnet(*args: str, passphrase: str = PASS) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}
    return subprocess.run(
        [sys.executable, "-m", "kmsnet", "cert", *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**env, "KMSNET_PASSPHRASE": passphrase}, start_new_session=True, check=False,
    )  # fmt: skip


async def test_cert_show_reads_the_nodes_own_certificate(ca: RunningCa, tmp_path: Path) -> None:
    home = tmp_path / "alice"
    enrolment = await enrol(home, "alice", ca.url, ca.admin.token("alice").secret)
    text, as_json, pem = await asyncio.gather(
        *(asyncio.to_thread(kmsnet, "show", "--home", str(home), *extra) for extra in ([], ["--json"], ["--pem"]))
    )
    assert text.returncode == as_json.returncode == pem.returncode == 0, text.stderr + as_json.stderr + pem.stderr

    record = json.loads(as_json.stdout)
    assert record["subject"] == "CN=alice" and record["serial"] == f"{enrolment.serial:x}"
    assert record["status"] == "valid" and record["not_after"].endswith("Z") and record["left"]
    assert record["ca_fingerprint_sha256"] == ca.fingerprint and record["key"].startswith("Ed25519 ")
    assert record["key_usage"] == ["digital signature"]

    assert "Subject:     CN=alice" in text.stdout and f"Serial:      {enrolment.serial:x}" in text.stdout
    assert f"CA root:     SHA-256 {ca.fingerprint}" in text.stdout and ": valid (" in text.stdout

    parsed = certs.load_certificate(pem.stdout.encode())
    assert certs.fingerprint(parsed).hex() == record["fingerprint_sha256"]
    if shutil.which("openssl"):
        shown = subprocess.run(
            ["openssl", "x509", "-noout", "-subject", "-serial"], input=pem.stdout, capture_output=True, text=True,
            timeout=30, check=True,
        )  # fmt: skip
        assert "CN = alice" in shown.stdout or "CN=alice" in shown.stdout


def test_cert_show_without_a_node_says_what_to_run(tmp_path: Path) -> None:
    result = kmsnet("show", "--home", str(tmp_path))
    assert result.returncode == 1 and result.stderr == f"error: no node in {tmp_path} (run `kmsnet node init` first)\n"


@pytest.mark.parametrize("args", [["--help"], ["show", "--help"]])
def test_cert_help_has_examples_and_exit_codes(args: list[str]) -> None:
    result = kmsnet(*args)
    assert result.returncode == 0 and "Exit codes:" in result.stdout
