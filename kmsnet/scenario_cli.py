"""`kmsnet scenario list|run`: the attack lab on the command line.

`run` prints a timeline as things happen (who sent what, what the relay and the attacker did,
what each node accepted or refused and why) and a verdict per scenario; `--json` streams the
same events as NDJSON and ends with a verdict object; `--report FILE.html` writes one
self-contained page with the sequence diagrams. Exit code 5 when an outcome is not as asserted.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import click

from kmsnet import logs
from kmsnet.colour import color
from kmsnet.exits import EPILOG, SCENARIO_FAILED, CliFailure
from kmsnet.options import json_flag
from scenarios import registry, runner
from scenarios.report import render
from scenarios.timeline import Event, Kind, Sink, in_words

EXAMPLES = """
Examples:

\b
  kmsnet scenario list
  kmsnet scenario run mitm-signed
  kmsnet scenario run session-compromise --report report.html
  kmsnet scenario run --all --json > all.ndjson
"""

#: How each kind of event is marked in the terminal timeline.
MARKS = {
    Kind.STORY: "==",
    Kind.SEND: "->",
    Kind.RELAY: "..",
    Kind.ATTACK: "!!",
    Kind.FAULT: "XX",
    Kind.ACCEPT: "ok",
    Kind.REFUSE: "NO",
    Kind.NOTICE: "--",
    Kind.LEAK: "$$",
    Kind.SAFE: "  ",
    Kind.CHECK: "??",
    Kind.VERDICT: "=>",
}


@click.group(epilog=EXAMPLES + "\n" + EPILOG)
def scenario() -> None:
    """Scripted attacks and faults, each with an asserted outcome.

    Each scenario starts a CA, a relay and nodes on 127.0.0.1 in a temporary directory, plays
    its story (a malicious relay, stolen keys, a killed process...) and checks what must happen.
    """


@scenario.command("list", epilog=EPILOG)
@json_flag()
def list_scenarios(as_json: bool) -> None:
    """The scenarios: name, the attack or fault, the expected outcome."""
    for item in registry.all_scenarios():
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "type": "scenario",
                        "name": item.name,
                        "attack": item.attack,
                        "expected": item.expected,
                        "story": item.story,
                    }
                )
            )
        else:
            click.echo(f"{item.name:<20} {item.attack}\n{'':<20} expected: {item.expected}")


@scenario.command("run", epilog=EXAMPLES + "\n" + EPILOG)
@click.argument("name", required=False)
@click.option("--all", "run_all", is_flag=True, help="Run every scenario, in order.")
@json_flag("Stream events as NDJSON; end with a verdict object.")
@click.option("--verbose", "-v", is_flag=True, help="Also show every frame the relay routed.")
@click.option(
    "--report",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write a self-contained HTML report (sequence diagrams, verdicts, what the attacker could read).",
)
def run(name: str | None, run_all: bool, as_json: bool, verbose: bool, report: Path | None) -> None:
    """Run scenario NAME (or --all) and check its outcome; exit 5 if it is not as asserted."""
    if (name is None) == (not run_all):
        raise click.UsageError("give one scenario NAME, or --all")
    try:
        selected = registry.all_scenarios() if run_all else [registry.get(name or "")]
    except KeyError:
        raise click.UsageError(f"no scenario {name!r}; `kmsnet scenario list` shows them") from None
    logs.configure("WARNING")
    started = time.monotonic()
    results = asyncio.run(_run_all(selected, as_json=as_json, verbose=verbose))
    seconds = time.monotonic() - started
    if report is not None:
        try:
            report.write_text(render(results), encoding="utf-8")
        except OSError as exc:
            raise CliFailure(f"cannot write {report}: {exc.strerror}") from exc
        where = report.resolve()
        click.echo(json.dumps({"type": "report", "path": str(where)}) if as_json else f"\nreport: {where}")
    failed = [r.scenario.name for r in results if not r.passed]
    if run_all:
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "type": "verdict",
                        "scenario": "all",
                        "passed": not failed,
                        "count": len(results),
                        "failed": failed,
                        "seconds": round(seconds, 3),
                    }
                )
            )
        else:
            click.echo(f"\n{len(results) - len(failed)} of {len(results)} scenarios passed in {seconds:.1f} s")
    if failed:
        raise CliFailure(f"outcome not as asserted: {', '.join(failed)}", SCENARIO_FAILED)


async def _run_all(selected: list[registry.Scenario], *, as_json: bool, verbose: bool) -> list[runner.Result]:
    results = []
    for item in selected:
        if as_json:
            sink = _json_sink(item.name)
        else:
            click.echo(f"\n## {item.name}: {item.attack}\n   expected: {item.expected}\n")
            sink = _text_sink(verbose)
        result = await runner.run(item, sinks=(sink,))
        if as_json:
            click.echo(json.dumps(result.verdict_json()))
        else:
            for check in result.checks:
                mark = click.style("ok  ", fg="green") if check.ok else click.style("FAIL", fg="red", bold=True)
                values = f"expected {in_words(check.expected)}, got {in_words(check.actual)}"
                click.echo(f"   {mark} {check.name}: {click.style(values, dim=check.ok)}", color=color())
            word, hue = ("PASS", "green") if result.passed else ("FAIL", "red")
            verdict = click.style(word, fg=hue, bold=True)
            click.echo(f"   {verdict} in {result.seconds:.2f} s: {result.headline}", color=color())
        results.append(result)
    return results


def _json_sink(name: str) -> Sink:
    def sink(event: Event) -> None:
        if event.kind is not Kind.VERDICT:
            click.echo(json.dumps({**event.to_json(), "scenario": name}))

    return sink


def _text_sink(verbose: bool) -> Sink:
    def sink(event: Event) -> None:
        if (event.detail and not verbose) or event.kind in (Kind.CHECK, Kind.VERDICT):
            return
        click.echo(f"{event.t:7.2f}s {event.actor:<9} {MARKS[event.kind]} {event.text}")

    return sink
