"""What `kmsnet demo` is asked for (`DemoOptions`), the nodes it runs, and how a step fails (`DemoFailure`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kmsnet.exits import BAD_INPUT

MIN_NODES, MAX_NODES = 2, 20
#: The first three nodes have names; the story is told with them.
NAMED = ("alice", "bob", "carol")


def node_names(count: int) -> list[str]:
    """alice, bob, carol, then node4, node5, ..."""
    return list(NAMED[:count]) + [f"node{i}" for i in range(len(NAMED) + 1, count + 1)]


@dataclass(frozen=True)
class DemoOptions:
    """What `kmsnet demo` was asked for."""

    nodes: int = 3
    keep: Path | None = None
    as_json: bool = False
    color: bool | None = None  # None: colour when stdout is a terminal


class DemoFailure(Exception):
    """A step did not go as scripted: one line naming the step, and an exit code."""

    def __init__(self, step: str, detail: str, code: int = BAD_INPUT) -> None:
        super().__init__(f"{step}: {detail}")
        self.code = code
