"""Stable event codes: each remote error class names its code, and PROTOCOL.md §15.1 lists exactly
the events a node reports (node/events.py)."""

from __future__ import annotations

import re
from pathlib import Path

from node.errors import code_of
from node.events import EVENTS
from protocol import errors

ROOT = Path(__file__).resolve().parent.parent.parent

REMOTE = [
    cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.RemoteError) and cls is not errors.RemoteError
]


def test_every_remote_error_names_its_own_code_and_no_two_share_one() -> None:
    assert len(REMOTE) > 20
    for cls in REMOTE:
        assert isinstance(cls.__dict__.get("code"), str), f"{cls.__name__} inherits its code"
        assert code_of(cls) == cls.code
    assert len({cls.code for cls in REMOTE}) == len(REMOTE)


def test_a_renamed_class_keeps_its_code() -> None:
    renamed = type("SomethingElse", (errors.StaleInit,), {"code": errors.StaleInit.code})
    assert code_of(renamed) == "stale_init"


def test_protocol_md_lists_exactly_the_events_a_node_reports() -> None:
    text = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
    section = text.split("### 15.1 Security events", 1)[1].split("\n## ", 1)[0]
    table = dict(re.findall(r"^\| `([a-z_]+)` \| (.+) \|$", section, re.M))
    assert table == EVENTS
