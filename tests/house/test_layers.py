"""The arrows of docs/ARCHITECTURE.md, checked by walking every module's imports.

The rules are read from that page's tables, so the page and the code cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGES = ("protocol", "node", "relay", "scenarios", "kmsnet", "ca")


def doc_table(heading: str) -> dict[str, set[str]]:
    """The table under `## heading` in docs/ARCHITECTURE.md: each row's room (first column) and the
    names in backquotes in its last column."""
    section = ARCHITECTURE.read_text(encoding="utf-8").split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = line.strip("|").split("|")
            rows[cells[0].strip().strip("`").rstrip("/")] = set(re.findall(r"`([\w.]+)`", cells[-1]))
    return rows


#: Which rooms each room may import (besides itself).
ALLOWED = doc_table("Who may import whom")
#: What a room must not reach even indirectly, through any chain of imports.
UNREACHABLE = doc_table("What a room must never reach, even through other modules")
#: Libraries (standard or not) a room never imports.
FORBIDDEN = doc_table("What `protocol/` never imports")


def test_the_tables_name_every_room_and_only_rooms() -> None:
    assert set(ALLOWED) == set(PACKAGES)
    assert all(allowed <= set(PACKAGES) - {room} for room, allowed in ALLOWED.items())
    # Spot checks that the page says what the product design says.
    assert ALLOWED["protocol"] == set() and ALLOWED["relay"] == ALLOWED["node"] == {"protocol"}
    assert "node" in ALLOWED["ca"] and "ca" not in ALLOWED["node"]
    assert UNREACHABLE["relay"] >= {"protocol.handshake", "protocol.ratchet", "protocol.session"}
    assert FORBIDDEN["protocol"] >= {"asyncio", "time", "os", "secrets", "random"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_point_one_way(package: str) -> None:
    refused = (set(PACKAGES) - ALLOWED[package] - {package}) | FORBIDDEN.get(package, set())
    offences = []
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = imported_roots(path) & refused
        if wrong:
            offences.append(f"{path.relative_to(ROOT)} imports {sorted(wrong)}")
    assert offences == []


def test_walker_sees_a_wrong_arrow(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom node.kms import X\nfrom . import sibling\n")
    assert imported_roots(bad) == {"asyncio", "node"}


def repo_modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name (a package by its own name)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The project modules `path` (module `name`) imports, with the packages that importing them runs."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    # Importing a.b.c runs a and a.b first.
    with_parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 2)}
    return with_parents & set(known)


def import_chain(start: str, targets: set[str], known: dict[str, Path]) -> list[str] | None:
    """The shortest chain of imports from `start` to any of `targets`, or None."""
    came_from: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        if current in targets:
            chain = [current]
            while (previous := came_from[chain[-1]]) is not None:
                chain.append(previous)
            return chain[::-1]
        for nxt in sorted(imported_modules(known[current], current, known)):
            if nxt not in came_from:
                came_from[nxt] = current
                queue.append(nxt)
    return None


@pytest.mark.parametrize("package", sorted(UNREACHABLE))
def test_package_never_reaches_forbidden_modules_transitively(package: str) -> None:
    known = repo_modules()
    offences = []
    for name in sorted(m for m in known if m == package or m.startswith(package + ".")):
        chain = import_chain(name, UNREACHABLE[package], known)
        if chain is not None:
            offences.append(" -> ".join(chain))
    assert offences == []


def test_transitive_walker_follows_chains(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("from pkg import b\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "b.py").write_text("from . import c\n")
    (tmp_path / "pkg" / "c.py").write_text("import json\n")
    known = {"a": tmp_path / "a.py", "pkg": tmp_path / "pkg" / "__init__.py"}
    known |= {"pkg.b": tmp_path / "pkg" / "b.py", "pkg.c": tmp_path / "pkg" / "c.py"}
    assert import_chain("a", {"pkg.c"}, known) == ["a", "pkg.b", "pkg.c"]
    assert import_chain("pkg.c", {"a"}, known) is None


# --- the CA (ca/): its own process, used only from above ----------------------------------------------
#: Who may import `ca`: itself and the composition layers above it (the command line, the lab, the
#: tests and benchmarks). Below it, node/ (whose keystore and audit building blocks the CA uses),
#: relay/ and protocol/ never do: the client side of enrolment lives in node/.
CA_USERS = {"ca", "kmsnet", "scenarios", "tests", "bench"}
CA_FORBIDDEN = {"relay", "scenarios", "kmsnet"}


def test_nothing_below_the_ca_imports_it() -> None:
    tops = sorted(p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in CA_USERS)
    offences = [
        str(path.relative_to(ROOT))
        for top in tops
        for path in sorted(top.rglob("*.py"))
        if "ca" in imported_roots(path)
    ]
    assert "node" in {top.name for top in tops} and offences == []


def test_the_ca_imports_only_node_and_protocol_of_ours() -> None:
    offences = []
    for path in sorted((ROOT / "ca").rglob("*.py")):
        wrong = imported_roots(path) & CA_FORBIDDEN
        if wrong:
            offences.append(f"{path.relative_to(ROOT)} imports {sorted(wrong)}")
    assert offences == []
