"""`kmsnet scenario list|run`: the timeline, --json, --report, and exit code 5."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kmsnet.cli import cli, main
from kmsnet.exits import SCENARIO_FAILED, USAGE
from protocol import handshake
from scenarios import registry
from tests.support.scenarios_helpers import without_transcript_signature_check
from tests.support.softhsm import require_softhsm

ROOT = Path(__file__).resolve().parent.parent.parent


def test_list_shows_every_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenario", "list", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [item["name"] for item in listed] == list(registry.ORDER)
    assert all(item["expected"] and item["story"] for item in listed)


def test_run_prints_a_timeline_and_a_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenario", "run", "tamper"]) == 0
    out = capsys.readouterr().out
    assert "attacker flipped a bit" in out
    assert "bob REFUSED authentication_failed" in out
    assert "PASS in" in out and "5 of 5 tampered messages refused" in out


def test_run_json_streams_events_and_ends_with_a_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenario", "run", "replay", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["type"] == "verdict" and lines[-1]["passed"] is True
    assert lines[-1]["scenario"] == "replay"
    events = lines[:-1]
    assert all(e["type"] == "event" and e["scenario"] == "replay" for e in events)
    assert any(e["kind"] == "refuse" for e in events) and any(e.get("detail") for e in events)


def test_unknown_scenario_and_missing_name_are_usage_errors() -> None:
    assert main(["scenario", "run", "no-such-thing"]) == USAGE
    assert main(["scenario", "run"]) == USAGE
    assert main(["scenario", "run", "tamper", "--all"]) == USAGE


def test_breaking_the_transcript_signature_check_makes_mitm_signed_exit_5(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(handshake, "verify_signature", without_transcript_signature_check)
    assert main(["scenario", "run", "mitm-signed", "--json"]) == SCENARIO_FAILED
    captured = capsys.readouterr()
    verdict = json.loads(captured.out.splitlines()[-1])
    assert verdict["passed"] is False
    leaks = [json.loads(line) for line in captured.out.splitlines() if '"kind": "leak"' in line]
    assert leaks, "the attack must be shown succeeding: the attacker reads a message"
    assert "outcome not as asserted: mitm-signed" in captured.err


def test_report_is_written_and_its_path_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.html"
    assert main(["scenario", "run", "reorder-drop", "--report", str(report)]) == 0
    page = report.read_text()
    assert "<svg" in page and "reorder-drop" in page and "PASS" in page
    assert capsys.readouterr().out.rstrip().endswith(f"report: {report.resolve()}")
    assert main(["scenario", "run", "reorder-drop", "--report", str(report), "--json"]) == 0
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last == {"type": "report", "path": str(report.resolve())}


@pytest.mark.parametrize("no_color", ["", "1"])
def test_checks_show_expected_and_actual_in_colour_unless_no_color(
    no_color: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_COLOR", no_color)
    result = CliRunner().invoke(cli, ["scenario", "run", "tamper"], color=True)  # as on a terminal
    assert result.exit_code == 0
    assert "tampered messages refused: expected 5, got 5" in click.unstyle(result.output)
    assert "the session survives (Bob's reply arrives): expected yes, got yes" in click.unstyle(result.output)
    assert ("\x1b[32m" in result.output) == (not no_color)


def test_run_all_passes_as_in_ci(tmp_path: Path) -> None:
    require_softhsm()  # hsm-theft needs it
    done = subprocess.run(
        [sys.executable, "-m", "kmsnet", "scenario", "run", "--all", "--report", str(tmp_path / "all.html")],
        capture_output=True, text=True, timeout=110, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "25 of 25 scenarios passed" in done.stdout
    # Every story, check and timeline line reads as words: no Python booleans, no class names.
    page = re.sub(r"<[^>]+>", " ", (tmp_path / "all.html").read_text())
    for text in (done.stdout, page):
        assert not re.findall(r"\b(?:True|False|None)\b", text)
        assert not re.findall(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+)+\b", text)
