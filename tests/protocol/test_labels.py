"""protocol.labels: every label distinct, versioned, listed; signing labels prefix-free; one home."""

from __future__ import annotations

import ast
from pathlib import Path

from protocol import labels

ROOT = Path(__file__).resolve().parent.parent.parent


def test_labels_are_distinct_and_versioned() -> None:
    assert len(set(labels.ALL_LABELS)) == len(labels.ALL_LABELS)
    for label in labels.ALL_LABELS:
        assert label.startswith(b"kmsnet/v1/")
    module_labels = {v for k, v in vars(labels).items() if k.startswith("LABEL_")}
    assert module_labels == set(labels.ALL_LABELS), "every LABEL_* constant is listed in ALL_LABELS"
    assert set(labels.SIGNING_LABELS) <= set(labels.ALL_LABELS)


def test_signing_labels_are_prefix_free() -> None:
    """The identity key signs LABEL || data for several purposes; no label may be a prefix of another,
    or a signature for one purpose could be read as one for another."""
    for a in labels.SIGNING_LABELS:
        for b in labels.SIGNING_LABELS:
            if a is not b:
                assert not b.startswith(a), (a, b)


def test_no_protocol_module_but_labels_spells_a_label() -> None:
    """A `kmsnet/v1/` byte string anywhere else in protocol/ is a label living outside its home."""
    strays = []
    for path in sorted((ROOT / "protocol").glob("*.py")):
        if path.name == "labels.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, bytes) and b"kmsnet/" in node.value:
                strays.append(f"{path.name}: {node.value!r}")
    assert strays == []
