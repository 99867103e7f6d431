"""The attack lab reaches protocol and node secrets only through the hazmat door (protocol/hazmat.py,
node/hazmat.py): no underscore attribute of another object, no private serialisation unpacked by position.

Checked by walking the syntax of every module in scenarios/, so that a change to a private layout
breaks a hazmat test, never a scenario silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def foreign_underscore_reads(tree: ast.Module) -> list[str]:
    """`x._name` where x is not `self` or `cls`: a private attribute of someone else's object."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


def _is_private_source(node: ast.AST, tainted: set[str]) -> bool:
    """A `to_bytes()` result, a keystore record (`<...>keystore.get(...)`), or a name bound to one."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id in tainted:
            return True
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute):
            owner = sub.func.value
            if sub.func.attr == "to_bytes":
                return True
            if sub.func.attr == "get" and "keystore" in ast.unparse(owner):
                return True
    return False


def unpacked_private_serialisations(tree: ast.Module) -> list[str]:
    """`msgpack.unpackb(...)` of a `to_bytes()` result or a keystore record: reading a private
    layout by position (names bound to such values are followed within each function)."""
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    top = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
    found: set[tuple[int, str]] = set()
    for scope in [*functions, ast.Module(body=top, type_ignores=[])]:
        tainted: set[str] = set()
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign | ast.NamedExpr) and _is_private_source(node.value, tainted):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                tainted.update(t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name))
        for node in ast.walk(scope):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("unpackb", "loads")
                and any(_is_private_source(arg, tainted) for arg in node.args)
            ):
                found.add((node.lineno, ast.unparse(node)))
    return [f"line {line}: {text}" for line, text in sorted(found)]


def test_scenarios_go_through_the_hazmat_door() -> None:
    offences = []
    for path in sorted((ROOT / "scenarios").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for found in foreign_underscore_reads(tree) + unpacked_private_serialisations(tree):
            offences.append(f"{path.relative_to(ROOT)} {found}")
    assert offences == []


def test_the_scan_sees_what_it_forbids() -> None:
    bad = ast.parse(
        "def f(node, keystore):\n"
        "    s = node._session('bob')\n"
        "    _, _, dhs, *rest = msgpack.unpackb(s.ratchet.to_bytes())\n"
        "    raw = keystore.get('node', 'prekeys')\n"
        "    kems = msgpack.unpackb(raw)[2]\n"
        "    return self._own, cls._too, body.__class__\n"
        "def g(found):\n"
        "    raw = found.onetime\n"
        "    return msgpack.unpackb(raw)\n"
    )
    assert foreign_underscore_reads(bad) == ["line 2: ._session"]
    assert [line.split(":")[0] for line in unpacked_private_serialisations(bad)] == ["line 3", "line 5"]
    fine = ast.parse("text = msgpack.unpackb(received.data)\nstate = Session.from_bytes(session.to_bytes())\n")
    assert foreign_underscore_reads(fine) == unpacked_private_serialisations(fine) == []
