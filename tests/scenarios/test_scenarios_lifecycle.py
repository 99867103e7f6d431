"""The trust-lifecycle scenarios (issue #12) exit 5 once their defence is patched out: each defence is
what makes its scenario pass (the scenarios themselves run in tests/scenarios/test_scenarios.py)."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from kmsnet.cli import main
from kmsnet.exits import SCENARIO_FAILED
from node import epoch, node, sessions
from protocol import handshake, peer, prekeys
from protocol.peer import Outcome


def without_archive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replaced sessions are thrown away (what the 30 s tie-break did to the losing INIT's session)."""
    monkeypatch.setattr(peer, "MAX_ARCHIVED", 0)


def without_stale_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every verified INIT is answered, however old."""
    monkeypatch.setattr(peer.Conversation, "check_init", lambda self, created, initiator, *, confirmed: None)


def without_certificate_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions never end with the certificate they were made under."""

    def never(self: peer.Conversation, now: datetime, not_after: datetime) -> bool:
        return False

    monkeypatch.setattr(peer.Conversation, "expire", never)


def leaky_reservations(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reservation counts as done before (and whether or not) its commit succeeded, and stays in
    memory when that commit fails (the engine is not reloaded from the disk): the old behaviour whole.
    The send that made the reservation may still fail (its history record shares the failed commit);
    the ones after it leave under numbers no durable state covers."""

    def reserve(self: node.Node, peer: str, outcome: Outcome) -> None:
        if outcome.puts:
            self._commit(peer, outcome).add_done_callback(lambda fut: fut.exception())

    monkeypatch.setattr(node.Node, "_reserve", reserve)
    monkeypatch.setattr(sessions.Sessions, "guard", lambda self, peer, durable: durable)


def without_rollback_detector(monkeypatch: pytest.MonkeyPatch) -> None:
    """No epoch file is ever found: a restored keystore goes on from its old sessions."""
    monkeypatch.setattr(epoch.EpochFile, "read", lambda self: 0)


def without_message_0_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any message of the initiator's first chain is taken as message 0."""
    monkeypatch.setattr(handshake, "require_message_0", lambda message, ephemeral: None)


def without_quota_or_early_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any initiator may fill the replay cache, and the prekey rotates on its weekly schedule only."""
    monkeypatch.setattr(prekeys.PrekeySecrets, "quota_left", lambda self, spk_id, initiator: True)
    monkeypatch.setattr(prekeys.PrekeySecrets, "rotation_wanted", lambda self: False)


@pytest.mark.parametrize(
    ("name", "patch", "failing"),
    [
        ("crossed-inits", without_archive, "Alice's messages Bob received, in order, once"),
        ("stale-init", without_stale_check, "old INIT refused as stale"),
        ("renewal-revocation", without_certificate_binding, "the thief's messages Bob accepted"),
        # How the old behaviour loses depends on when the failed commit lands against the sends (seen
        # under load): nonces reused after the restart, or sends that never fail and then messages lost
        # after it. Either way an outcome the defence guarantees fails, and the scenario exits 5.
        (
            "fsync-failure",
            leaky_reservations,
            (
                "(key, nonce) pairs used for two ciphertexts",
                "a send failed once the disk was full",
                "messages after the restart that arrived",
            ),
        ),
        ("state-rollback", without_rollback_detector, "plaintexts the attacker recovered by XOR"),
        ("init-swap", without_message_0_check, "the swapped-in message shown to Bob as the first"),
        ("replay-cache-fill", without_quota_or_early_rotation, "keys Mallory put in the replay cache"),
    ],
)
def test_a_lifecycle_scenario_exits_5_without_its_defence(
    name: str,
    patch: object,
    failing: str | tuple[str, ...],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    patch(monkeypatch)  # type: ignore[operator]
    assert main(["scenario", "run", name, "--json"]) == SCENARIO_FAILED
    verdict = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert verdict["passed"] is False and verdict["error"] is None  # an outcome failed, nothing broke
    failed = {check["name"] for check in verdict["checks"] if not check["ok"]}
    assert failed & ({failing} if isinstance(failing, str) else set(failing)), failed
