"""Words for users: every public error and event code, and every message the code base raises or
reports, must read as a sentence for people, without a Python class name or a library's debug repr.

The walk is static (the source's raise sites and security events, read with `ast`) plus dynamic
(the codes themselves, a CLI failure under --json, garbage fed to the parsers a user's file meets).
"""

from __future__ import annotations

import ast
import builtins
import inspect
import json
import re
from pathlib import Path

import pytest

import ca.errors
import node.errors
import protocol.errors
import relay.errors
from kmsnet.cli import main
from kmsnet.exits import CODE_NAMES
from kmsnet.options import node_failures
from node.errors import code_of, network_words
from node.events import EVENTS
from protocol import certs, revocation
from protocol.errors import DecodeError, ProtocolError, RemoteError, library_detail
from protocol.peer import event_name
from tests.support.pki import CA, NOW

ROOT = Path(__file__).resolve().parent.parent.parent
PACKAGES = ("protocol", "node", "relay", "kmsnet", "scenarios", "ca")
SOURCES = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
MODULES = (protocol.errors, node.errors, ca.errors, relay.errors)
CLASSES = sorted(
    {cls for module in MODULES for _, cls in inspect.getmembers(module, inspect.isclass) if issubclass(cls, Exception)},
    key=lambda cls: cls.__name__,
)
#: Class names a user must never read: ours and the builtin exceptions'.
NAMES = {cls.__name__ for cls in CLASSES} | {
    name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
}  # fmt: skip
DEBUG = re.compile(r"\[Errno \d+\]|ParseError \{|<\w+(\.\w+)*( object)? at 0x|<ObjectIdentifier|\bTraceback\b")


def class_names_in(text: str) -> set[str]:
    return {word for word in re.findall(r"\b[A-Za-z_]\w*\b", text) if word in NAMES}


def readable(text: str) -> bool:
    return not class_names_in(text) and not DEBUG.search(text)


@pytest.mark.parametrize("code", sorted(EVENTS))
def test_every_event_code_is_snake_case_and_described_in_words(code: str) -> None:
    assert re.fullmatch(r"[a-z]+(_[a-z]+)*", code)
    assert readable(EVENTS[code]) and len(EVENTS[code].split()) >= 4


def test_every_event_a_node_reports_is_a_documented_code() -> None:
    reported = set()
    # The node's own events, and the ones its per-peer engines return (protocol/peer.py).
    for path in (*sorted((ROOT / "node").glob("*.py")), ROOT / "protocol" / "peer.py"):
        for call in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) in ("SecurityEvent", "PeerEvent"):
                first = call.args[0]
                if isinstance(first, ast.Constant):
                    reported.add(first.value)
    assert reported and reported <= set(EVENTS), reported - set(EVENTS)
    # The others are named after the check that refused (protocol.peer.event_name): every refusal a peer's
    # input can cause, which are the leaves of RemoteError.
    for cls in CLASSES:
        if issubclass(cls, RemoteError) and not cls.__subclasses__():
            assert event_name(cls.__new__(cls)) in EVENTS, cls


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_code_is_snake_case_and_a_failure_under_json_carries_it(cls: type[Exception]) -> None:
    code = code_of(cls)
    assert re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", code) and code.replace("_", "") == cls.__name__.lower()
    if not issubclass(cls, node.errors.NodeError):
        return
    try:
        error = cls("the words a person reads")
    except TypeError:  # a class with its own fields (AuditChainBroken, AdminLocked...)
        error = cls.__new__(cls)
        Exception.__init__(error, "the words a person reads")
    with pytest.raises(Exception) as failure, node_failures():
        raise error
    record = failure.value.record()  # type: ignore[attr-defined]
    assert record["code"] == code and record["message"] == "the words a person reads"
    assert record["exit"] in CODE_NAMES


def _texts(call: ast.Call) -> list[tuple[str, list[ast.FormattedValue]]]:
    """The string literals an exception, event or failure is built from, with their interpolations."""
    found = []
    for arg in [*call.args, *(k.value for k in call.keywords)]:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            found.append((arg.value, []))
        elif isinstance(arg, ast.JoinedStr):
            text = "".join(v.value for v in arg.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
            found.append((text, [v for v in arg.values if isinstance(v, ast.FormattedValue)]))
    return found


#: Errors that only a programmer meets (an API misused), never a user: their words may name types.
PROGRAMMER_ERRORS = {"LocalError", "TypeError", "AssertionError", "NotImplementedError"}


def _user_facing(call: ast.Call) -> bool:
    name = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
    if name in PROGRAMMER_ERRORS:
        return False
    return name in NAMES or name in {"SecurityEvent", "CliFailure", "DemoFailure", "act", "check", "add", "emit"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_message_names_a_class_or_prints_a_repr_of_an_error(path: Path) -> None:
    problems = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # Whatever is raised (a private exception class too), and whatever is reported.
    raised = {id(node.exc) for node in ast.walk(tree) if isinstance(node, ast.Raise) and node.exc is not None}
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call):
            continue
        name = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
        if not _user_facing(call) and (id(call) not in raised or name in PROGRAMMER_ERRORS):
            continue
        for text, values in _texts(call):
            if class_names_in(text):
                problems.append(f"line {call.lineno}: {sorted(class_names_in(text))} in {text!r}")
            for value in values:
                source = ast.unparse(value.value)
                if "__name__" in source or "__class__" in source:
                    problems.append(f"line {call.lineno}: a class name interpolated: {source}")
                if value.conversion == ord("r") and re.fullmatch(r"(exc|e|err|error|bad|refusal)", source):
                    problems.append(f"line {call.lineno}: the repr of an error: {source!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "data", [b"", b"garbage", b"\x30\x03\x02\x01\x01", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"]
)
def test_a_bad_certificate_file_is_refused_in_words(data: bytes) -> None:
    with pytest.raises(DecodeError) as refused:
        certs.load_certificate(data)
    assert readable(str(refused.value)) and str(refused.value).startswith("not an X.509 certificate")


@pytest.mark.parametrize("der", [b"", b"garbage", b"\x30\x03\x02\x01\x01"])
def test_a_garbage_crl_is_refused_in_words(der: bytes) -> None:
    with pytest.raises(ProtocolError) as refused:
        revocation.RevocationState().accept(der, CA.root, NOW)
    assert readable(str(refused.value))


def test_library_details_are_kept_only_when_they_read_as_words() -> None:
    assert library_detail(ValueError("1 is not a valid X509 version")) == ": 1 is not a valid X509 version"
    assert library_detail(ValueError("error parsing asn1 value: ParseError { kind: ShortData }")) == ""
    assert library_detail(ValueError("No <ObjectIdentifier(oid=2.5.29.19)> extension was found")) == ""


def test_network_failures_are_words_without_errno() -> None:
    assert network_words(ConnectionRefusedError(111, "Connect call failed")) == "nothing is listening there"
    assert network_words(TimeoutError()) == "no answer in time"
    assert readable(network_words(OSError(13, "Permission denied")))


def test_an_unreachable_ca_names_the_command_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMSNET_PASSPHRASE", "a passphrase for the test")
    monkeypatch.setenv("KMSNET_ARGON2_PROFILE", "test")
    code = main([
        "node", "init", "x", "--home", str(tmp_path), "--ca", "http://127.0.0.1:9", "--token", "t",
        "--relay", "ws://127.0.0.1:9", "--json",
    ])  # fmt: skip
    record = json.loads(capsys.readouterr().err)
    assert code == 3 and record["code"] == "ca_unreachable" and record["exit"] == 3
    assert "is `kmsnet ca serve` running on 127.0.0.1:9?" in record["message"] and readable(record["message"])
