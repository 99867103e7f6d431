"""`kmsnet relay`: its options reach the relay, and its help prints the examples one per line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kmsnet import relay_cli
from kmsnet.cli import cli
from protocol import certs
from relay.server import RelayConfig
from tests.support.pki import CA


@pytest.fixture
def ca_pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(certs.certificate_pem(CA.root))
    return path


def test_rate_and_burst_reach_the_relay(ca_pem: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[RelayConfig] = []

    async def serve(config: RelayConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(relay_cli, "_serve", serve)
    args = ["relay", "--ca-cert", str(ca_pem), "--rate", "50", "--burst", "7", "--resend-after", "1.5"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (seen[0].rate, seen[0].burst, seen[0].resend_after) == (50.0, 7, 1.5)
    result = CliRunner().invoke(cli, ["relay", "--ca-cert", str(ca_pem)])
    assert (seen[1].rate, seen[1].burst, seen[1].resend_after) == (1000.0, 2000, 3.0)


@pytest.mark.parametrize("bad", [["--rate", "0"], ["--burst", "0"], ["--rate", "fast"], ["--resend-after", "0"]])
def test_a_bad_rate_or_burst_is_a_usage_error(ca_pem: Path, bad: list[str]) -> None:
    result = CliRunner().invoke(cli, ["relay", "--ca-cert", str(ca_pem), *bad])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["relay"], ["send"], ["receive"], ["chat"], ["scenario"], ["demo"]])
def test_help_prints_each_example_on_its_own_line(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    examples = result.output.split("Examples:", 1)[1].split("Exit codes:", 1)[0]
    lines = [line.strip() for line in examples.splitlines() if line.strip()]
    assert lines and all(line.startswith(("kmsnet ", "echo ", "#")) for line in lines), lines
