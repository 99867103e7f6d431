"""Trust on first use, then verified (node/trust.py, `kmsnet trust`, `kmsnet history`): a verified
contact whose identity key changes holds every send (exit 4) until the new safety number is accepted."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from node.errors import IdentityChanged, NodeError, SafetyNumberMismatch
from node.keystore import Keystore
from node.trust import Trust, TrustState
from protocol.safety import safety_number
from tests.support.home_writer import kmsnet, now, send, world
from tests.support.lab import provision
from tests.support.pki import CA, NOW

OURS, THEIRS, NEW = bytes(32), bytes(range(32)), bytes(range(1, 33))

pytestmark = pytest.mark.timeout(240)


def test_verify_then_a_changed_key_is_held_until_its_number_is_accepted() -> None:
    trust = Trust(Keystore.memory(), lambda: OURS)
    assert trust.state("bob", THEIRS) is TrustState.UNVERIFIED
    trust.check_send("bob", THEIRS)  # trust on first use: nothing held
    with pytest.raises(NodeError, match="no identity key of bob"):
        trust.verify("bob", "1", None, NOW)
    with pytest.raises(SafetyNumberMismatch):
        trust.verify("bob", "12345 " * 8, THEIRS, NOW)
    number = safety_number(OURS, THEIRS)
    trust.verify("bob", number.replace(" ", "-"), THEIRS, NOW)  # as typed: spaces, dashes or none
    assert trust.state("bob", THEIRS) is TrustState.VERIFIED
    trust.check_send("bob", THEIRS)
    with pytest.raises(IdentityChanged, match=safety_number(OURS, NEW)) as held:
        trust.check_send("bob", NEW)
    assert "nothing sent" in str(held.value)
    assert trust.state("bob", NEW) is TrustState.CHANGED
    # The held key is what a number is checked against, before any session with it exists.
    with pytest.raises(SafetyNumberMismatch):
        trust.verify("bob", number, THEIRS, NOW)
    assert trust.verify("bob", safety_number(OURS, NEW), THEIRS, NOW) == NEW
    trust.check_send("bob", NEW)
    assert trust.forget("bob") and trust.state("bob", NEW) is TrustState.UNVERIFIED


def error_of(result: object) -> dict[str, object]:
    err = json.loads(result.err)  # type: ignore[attr-defined]
    assert isinstance(err, dict)
    return err


async def test_trust_history_and_refusals_from_the_command_line(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        alice, bob = str(w.alice), str(w.bob)
        assert (await kmsnet("receive", "--home", bob, "--timeout", "3")).code == 0  # bob's prekeys go up
        assert (await send(w.alice, "bob", "hello bob")).code == 0
        assert (await kmsnet("receive", "--home", bob, "--timeout", "3")).code == 0

        # Refusals in words, with codes.
        zed = await send(w.alice, "zed", "anyone?")
        assert zed.code == 1, zed
        assert "no node named 'zed' has enrolled with this CA, or it has never connected" in zed.err
        me = await send(w.alice, "alice", "me?")
        assert (me.code, error_of(me)["code"]) == (1, "self_send")

        shown = json.loads((await kmsnet("trust", "--home", alice, "bob", "--json")).out)
        assert shown["trust"] == "unverified"
        number = shown["safety_number"]
        wrong = await kmsnet("trust", "--home", alice, "bob", "--safety-number", "1" * 40, "--json")
        assert (wrong.code, error_of(wrong)["code"]) == (4, "safety_number_mismatch")
        ok = await kmsnet("trust", "--home", alice, "bob", "--safety-number", number, "--json")
        assert json.loads(ok.out)["trust"] == "verified", ok.err

        # Bob comes back with another identity key (a new device, or someone posing as him).
        t = now()
        new_bob = CA.enrol("bob", 0x5F2, not_before=t - timedelta(days=1), not_after=t + timedelta(days=30))
        provision(CA, new_bob, w.relay.url, tmp_path / "bob2" / "keystore.db").close()
        assert (await send(tmp_path / "bob2", "alice", "it's me, new key")).code == 0
        got = await kmsnet("receive", "--home", alice, "--json", "--timeout", "3")
        events = [json.loads(line) for line in got.out.splitlines()]
        assert any(e.get("event") == "identity_changed" for e in events)

        held = await send(w.alice, "bob", "still you?")
        assert held.code == 4, held
        error = error_of(held)
        assert error["code"] == "identity_changed" and "nothing sent" in str(error["message"])
        assert len(held.err.strip().splitlines()) == 1
        changed = json.loads((await kmsnet("trust", "--home", alice, "bob", "--json")).out)
        assert changed["trust"] == "changed" and changed["safety_number"] != number

        accepted = await kmsnet("trust", "--home", alice, "bob", "--safety-number", changed["safety_number"])
        assert accepted.code == 0 and "bob is verified" in accepted.out
        assert (await send(w.alice, "bob", "welcome back")).code == 0

        # Everything said is in alice's history, with its state; held and refused sends are not.
        listed = await kmsnet("history", "--home", alice, "--with", "bob", "--json")
        records = [json.loads(line) for line in listed.out.splitlines()]
        texts = [(r["direction"], r["text"]) for r in records]
        assert texts == [("out", "hello bob"), ("in", "it's me, new key"), ("out", "welcome back")]
        assert {r["state"] for r in records if r["direction"] == "out"} <= {"stored", "delivered"}
        limited = await kmsnet("history", "--home", alice, "--with", "bob", "--limit", "1")
        assert "welcome back" in limited.out and "hello bob" not in limited.out
        cleared = await kmsnet("history", "--home", alice, "--clear", "--with", "bob", "--json")
        assert json.loads(cleared.out)["records"] == 3
        assert (await kmsnet("history", "--home", alice, "--with", "bob")).out == ""
