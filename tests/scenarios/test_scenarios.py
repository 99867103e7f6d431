"""Every scenario of the attack lab runs as a test and must reach its asserted verdict; and breaking
a defence must make its scenario fail."""

from __future__ import annotations

import pytest

from protocol import handshake
from scenarios import registry, runner
from scenarios.registry import Context, Scenario
from scenarios.report import render
from scenarios.timeline import Kind
from tests.support.scenarios_helpers import without_transcript_signature_check
from tests.support.softhsm import require_softhsm


@pytest.mark.parametrize("name", registry.ORDER)
async def test_scenario_reaches_its_verdict(name: str) -> None:
    if name == "hsm-theft":
        require_softhsm()
    result = await runner.run(registry.get(name))
    assert result.error is None, result.error
    assert result.checks, "a scenario must assert something"
    assert result.passed, [c for c in result.checks if not c.ok]
    assert result.events[-1].kind is Kind.VERDICT


def test_registry_holds_the_fifteen_of_product_md_hsm_theft_and_the_lifecycle_ones_in_order() -> None:
    names = [s.name for s in registry.all_scenarios()]
    assert names == list(registry.ORDER)
    assert len(names) == 25
    with pytest.raises(KeyError):
        registry.get("no-such-scenario")


async def test_mitm_signed_fails_once_the_transcript_signature_check_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handshake, "verify_signature", without_transcript_signature_check)
    result = await runner.run(registry.get("mitm-signed"))
    assert not result.passed
    failed = {c.name: c for c in result.checks if not c.ok}
    assert failed["plaintexts the attacker read"].actual >= 1  # real decryption of Bob's answer
    assert failed["messages accepted that the claimed sender never wrote"].actual == 1
    assert any(e.kind is Kind.LEAK for e in result.events)


async def test_harvest_now_falls_for_hybrid_too_if_ml_kem_were_broken() -> None:
    # The scenario's own control check runs the same attack with the ML-KEM secret; it must read all.
    result = await runner.run(registry.get("harvest-now"))
    control = next(c for c in result.checks if c.name.startswith("control"))
    assert control.ok and control.actual == control.expected > 0


async def test_a_scenario_that_breaks_fails_its_verdict_with_the_reason() -> None:
    async def broken(ctx: Context) -> None:
        ctx.check("something held", 1, 1)
        raise RuntimeError("the lab caught fire")

    result = await runner.run(Scenario("broken", "a bug", "nothing", "It breaks.", broken))
    assert not result.passed
    assert result.error == "an unexpected error (runtime error): the lab caught fire"
    assert "broke off" in result.headline


async def test_a_scenario_without_checks_does_not_pass() -> None:
    async def silent(ctx: Context) -> None:
        ctx.story("nothing is asserted")

    result = await runner.run(Scenario("silent", "none", "nothing", "Silence.", silent))
    assert not result.passed and result.error is None


async def test_report_is_one_self_contained_page_with_a_diagram_and_a_read_table() -> None:
    result = await runner.run(registry.get("session-compromise"))
    page = render([result])
    assert page.startswith("<!DOCTYPE html>")
    assert "<svg" in page and "What the attacker could read" in page
    assert "43–45" in page  # the window the stolen state opened
    for fetch in ("<script", "<link", "src=", "@import", "url(http"):
        assert fetch not in page
    assert page.count("http://") == page.count("xmlns='http://www.w3.org/2000/svg'")
