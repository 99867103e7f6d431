"""The arrows of ARCHITECTURE.md, checked by walking every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "protocol": {"node", "relay", "scenarios", "kmsnet", "asyncio", "socket", "websockets", "sqlite3", "time"},
    "node": {"relay", "scenarios", "kmsnet"},
    "relay": {"node", "scenarios", "kmsnet"},
    "scenarios": {"kmsnet"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package: str) -> None:
    offences = []
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = imported_roots(path) & FORBIDDEN[package]
        if wrong:
            offences.append(f"{path.relative_to(ROOT)} imports {sorted(wrong)}")
    assert offences == []


def test_walker_sees_a_wrong_arrow(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom node.kms import X\nfrom . import sibling\n")
    assert imported_roots(bad) == {"asyncio", "node"}


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
