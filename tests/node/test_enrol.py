"""node/enrol.py: enrolment against a real CA HTTP server on 127.0.0.1, and everything it refuses."""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from http import HTTPStatus
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from ca.http import Request, Response
from node.enrol import STAGING_FILE, enrol_node, parse_fingerprint
from node.errors import (
    AlreadyEnrolled,
    CaProtocolError,
    CaUnreachable,
    CertificateRefused,
    EnrolmentInputError,
    EnrolmentRefused,
    EnrolmentUnfinished,
    FingerprintMismatch,
    KeystoreCorrupt,
    LinkError,
    StorageError,
    TrustError,
    Unavailable,
    WrongPassphrase,
)
from node.keystore import ARGON2_TEST, Keystore
from node.kms import KeyManagementSystem
from node.node import Node
from protocol import certs
from tests.support.enrol import (
    PASS,
    RELAY,
    RunningCa,
    ca,  # noqa: F401 - fixtures, passed by name
    enrol,
)


def assert_nothing_written(home: Path) -> None:
    assert not home.exists() or list(home.iterdir()) == []


async def test_enrolment_with_the_right_fingerprint_creates_what_the_node_reads(ca: RunningCa, tmp_path: Path) -> None:
    home = tmp_path / "alice"
    token = ca.admin.token("alice")
    result = await enrol(home, "alice", ca.url, token.secret, ca_fingerprint=ca.fingerprint.upper())
    assert result.fingerprint_checked and result.ca_fingerprint == ca.fingerprint
    assert result.keystore == home / "keystore.db"
    assert [p.name for p in home.iterdir()] == ["keystore.db"]  # no temporary file left
    with Keystore.open(result.keystore, passphrase=PASS) as keystore:
        assert keystore.names("node") == ["ca_url", "certificate", "identity", "relay", "root"]
        assert keystore.get("node", "ca_url") == ca.url.encode()  # where renewals go
        assert keystore.get("node", "root") == ca.authority.root_pem
        assert keystore.get("node", "relay") == RELAY.encode()
        node = Node(keystore)  # reads the layout and verifies the certificate under the pinned root
        assert (node.name, node.relay_url) == ("alice", RELAY)
        assert (
            node.identity.public_bytes
            == certs.verify(node.certificate, ca.authority.root, node.clock()).public_key.public_bytes_raw()
        )
    assert {c.serial for c in ca.authority.list(session=ca.admin.session) if c.name == "alice"} == {result.serial}


async def test_without_a_fingerprint_it_enrols_and_returns_the_fingerprint_to_check(
    ca: RunningCa, tmp_path: Path
) -> None:
    result = await enrol(tmp_path / "bob", "bob", ca.url + "/", ca.admin.token("bob").secret)
    assert (result.fingerprint_checked, result.ca_fingerprint) == (False, ca.fingerprint)


async def test_a_wrong_fingerprint_is_refused_and_nothing_is_written(ca: RunningCa, tmp_path: Path) -> None:
    home = tmp_path / "alice"
    token = ca.admin.token("alice")
    wrong = ca.fingerprint[:-2] + ("00" if not ca.fingerprint.endswith("00") else "11")
    with pytest.raises(FingerprintMismatch) as refused:
        await enrol(home, "alice", ca.url, token.secret, ca_fingerprint=wrong)
    assert isinstance(refused.value, TrustError)
    assert_nothing_written(home)
    # Refused before the token was sent: it still enrols alice.
    await enrol(home, "alice", ca.url, token.secret, ca_fingerprint=ca.fingerprint)


async def test_a_refused_token_writes_nothing(ca: RunningCa, tmp_path: Path) -> None:
    home = tmp_path / "alice"
    with pytest.raises(EnrolmentRefused, match="unknown enrolment token"):
        await enrol(home, "alice", ca.url, "A" * 22)
    token = ca.admin.token("bob")
    with pytest.raises(EnrolmentRefused, match="the token is for 'bob'"):
        await enrol(home, "alice", ca.url, token.secret)
    assert_nothing_written(home)


async def test_a_file_that_is_not_a_keystore_is_never_touched(ca: RunningCa, tmp_path: Path) -> None:
    home = tmp_path / "alice"
    home.mkdir()
    (home / "keystore.db").write_bytes(b"precious")
    token = ca.admin.token("alice")
    with pytest.raises(KeystoreCorrupt):
        await enrol(home, "alice", ca.url, token.secret)
    assert (home / "keystore.db").read_bytes() == b"precious"
    assert [p.name for p in home.iterdir()] == ["keystore.db"]


async def test_a_kms_keystore_is_joined_and_a_node_is_never_replaced(ca: RunningCa, tmp_path: Path) -> None:
    home = tmp_path / "alice"
    kms = KeyManagementSystem(home=home, passphrase=PASS, argon2=ARGON2_TEST)
    kms.generate_symmetric_key("session1")
    sealed = kms.encrypt_data_symmetric("session1", "kept")
    kms.close()
    await enrol(home, "alice", ca.url, ca.admin.token("alice").secret)
    with Keystore.open(home / "keystore.db", passphrase=PASS) as keystore:
        assert Node(keystore).name == "alice"
    again = KeyManagementSystem(home=home, passphrase=PASS)
    assert again.decrypt_data_symmetric("session1", sealed) == "kept"
    again.close()
    with pytest.raises(AlreadyEnrolled):
        await enrol(home, "alice", ca.url, ca.admin.token("alice").secret)


async def test_an_unreachable_ca_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(CaUnreachable) as failed:
        await enrol(tmp_path / "alice", "alice", f"http://127.0.0.1:{port}", "A" * 22)
    assert isinstance(failed.value, Unavailable)
    assert_nothing_written(tmp_path / "alice")


# --- enrolment that can be retried (issue #14) -----------------------------------------------------------


def failing_link(code: int) -> Callable[[str | Path, str | Path], None]:
    """`os.link` failing with `code` when it would put the prepared keystore in place (only then)."""
    real = os.link

    def link(src: str | Path, dst: str | Path) -> None:
        if Path(src).name == STAGING_FILE:
            raise OSError(code, os.strerror(code))
        real(src, dst)

    return link


def alice_serials(ca: RunningCa) -> list[int]:
    return [c.serial for c in ca.authority.list(session=ca.admin.session) if c.name == "alice"]


async def test_a_home_that_cannot_be_written_fails_before_the_token_is_spent(ca: RunningCa, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    token = ca.admin.token("alice")
    with pytest.raises(StorageError, match="cannot write the home") as failed:
        await enrol(tmp_path / "file" / "alice", "alice", ca.url, token.secret)
    assert "Errno" not in str(failed.value)
    assert alice_serials(ca) == []  # the CA was never asked
    result = await enrol(tmp_path / "alice", "alice", ca.url, token.secret)  # the same token still works
    assert alice_serials(ca) == [result.serial]


async def test_a_failed_write_after_the_ca_certified_the_key_is_finished_by_a_retry_with_the_same_token(
    ca: RunningCa, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "alice"
    token = ca.admin.token("alice")

    with monkeypatch.context() as patch:
        patch.setattr(os, "link", failing_link(errno.ENOSPC))
        with pytest.raises(EnrolmentUnfinished, match="run the same command again") as failed:
            await enrol(home, "alice", ca.url, token.secret)
    assert isinstance(failed.value, Unavailable) and "Errno" not in str(failed.value)
    assert [p.name for p in home.iterdir()] == [STAGING_FILE]  # the prepared keystore, with its key, stays
    first = alice_serials(ca)
    assert len(first) == 1
    result = await enrol(home, "alice", ca.url, token.secret)
    assert alice_serials(ca) == first == [result.serial]  # the same certificate: no orphan, no spent token
    assert [p.name for p in home.iterdir()] == ["keystore.db"]
    with Keystore.open(home / "keystore.db", passphrase=PASS) as keystore:
        assert Node(keystore).name == "alice" and keystore.get("node", "enrolling") is None
        der = keystore.get("node", "certificate")
        assert der is not None and x509.load_der_x509_certificate(der).serial_number == result.serial


async def test_a_lost_answer_is_finished_by_a_retry_and_another_key_is_still_refused(
    ca: RunningCa, tmp_path: Path
) -> None:
    token = ca.admin.token("alice")

    async def answer_too_late(request: Request) -> Response:
        pem = ca.authority.enrol(token.secret, json.loads(request.body)["csr"])
        await asyncio.sleep(1.0)  # past the client's timeout: the node never sees the certificate
        return Response.json(HTTPStatus.OK, {"certificate": pem.decode()})

    original = ca.server.routes["/enrol"]["POST"]
    ca.server.add_route("POST", "/enrol", answer_too_late)
    home = tmp_path / "alice"
    call = functools.partial(
        enrol_node, home, "alice", ca.url, token.secret, RELAY, PASS, argon2=ARGON2_TEST, timeout=0.3
    )
    with pytest.raises(EnrolmentUnfinished):
        await asyncio.to_thread(call)
    ca.server.add_route("POST", "/enrol", original)
    certified = alice_serials(ca)
    result = await enrol(home, "alice", ca.url, token.secret)
    assert alice_serials(ca) == certified == [result.serial]
    # The token's holder with another key (another home, so another key): refused, nothing written there.
    with pytest.raises(EnrolmentRefused, match="by another key"):
        await enrol(tmp_path / "mallory", "alice", ca.url, token.secret)
    assert_nothing_written(tmp_path / "mallory")
    assert alice_serials(ca) == certified


async def test_an_unfinished_enrolment_needs_its_own_passphrase(
    ca: RunningCa, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "alice"
    token = ca.admin.token("alice")
    with monkeypatch.context() as patch:
        patch.setattr(os, "link", failing_link(errno.EIO))
        with pytest.raises(EnrolmentUnfinished):
            await enrol(home, "alice", ca.url, token.secret)
    call = functools.partial(enrol_node, home, "alice", ca.url, token.secret, RELAY, "another", argon2=ARGON2_TEST)
    with pytest.raises(WrongPassphrase, match="unfinished enrolment"):
        await asyncio.to_thread(call)
    assert [p.name for p in home.iterdir()] == [STAGING_FILE]


@pytest.mark.parametrize(
    ("name", "ca_url", "relay_url", "fingerprint", "error"),
    [
        ("Alice", "http://127.0.0.1:1", RELAY, None, EnrolmentInputError),
        ("alice", "ftp://127.0.0.1:1", RELAY, None, EnrolmentInputError),
        ("alice", "http://127.0.0.1:99999", RELAY, None, EnrolmentInputError),
        ("alice", "http://127.0.0.1:1", "http://relay", None, LinkError),
        ("alice", "http://127.0.0.1:1", RELAY, "abc", EnrolmentInputError),
    ],
)
async def test_bad_arguments_are_refused_before_any_request(
    tmp_path: Path, name: str, ca_url: str, relay_url: str, fingerprint: str | None, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await enrol(tmp_path / "n", name, ca_url, "A" * 22, relay_url=relay_url, ca_fingerprint=fingerprint)
    assert_nothing_written(tmp_path / "n")


def test_fingerprints_are_read_in_the_usual_spellings() -> None:
    raw = bytes(range(32))
    assert parse_fingerprint(raw.hex()) == raw
    assert parse_fingerprint(":".join(f"{b:02X}" for b in raw)) == raw
    assert parse_fingerprint("SHA256:" + raw.hex()) == raw
    with pytest.raises(EnrolmentInputError):
        parse_fingerprint(raw.hex()[:-1])


def _csr(name: str) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(Ed25519PrivateKey.generate(), None)
        .public_bytes(serialization.Encoding.PEM)
    )


# --- a CA that misbehaves (routes replaced in the server's table) --------------------------------------


async def test_a_certificate_for_another_name_is_refused(ca: RunningCa, tmp_path: Path) -> None:
    async def wrong_name(request: Request) -> Response:
        pem = ca.authority.enrol(ca.admin.token("mallory").secret, _csr("mallory"))
        return Response.json(HTTPStatus.OK, {"certificate": pem.decode()})

    ca.server.add_route("POST", "/enrol", wrong_name)
    with pytest.raises(CertificateRefused, match="expected 'alice'"):
        await enrol(tmp_path / "alice", "alice", ca.url, "A" * 22)
    assert_nothing_written(tmp_path / "alice")


async def test_a_certificate_for_another_key_is_refused(ca: RunningCa, tmp_path: Path) -> None:
    async def other_key(request: Request) -> Response:
        pem = ca.authority.enrol(ca.admin.token("alice").secret, _csr("alice"))
        return Response.json(HTTPStatus.OK, {"certificate": pem.decode()})

    ca.server.add_route("POST", "/enrol", other_key)
    with pytest.raises(CertificateRefused, match="another key"):
        await enrol(tmp_path / "alice", "alice", ca.url, "A" * 22)
    assert_nothing_written(tmp_path / "alice")


@pytest.mark.parametrize(
    ("path", "response", "error"),
    [
        ("/ca.pem", Response(HTTPStatus.OK, b"not a certificate", "text/plain"), CaProtocolError),
        ("/ca.pem", Response.error(HTTPStatus.NOT_FOUND, "gone"), CaProtocolError),
        (
            "/ca.pem",
            Response(HTTPStatus.FOUND, b"", "text/plain", (("Location", "http://example.com/"),)),
            CaProtocolError,
        ),
        ("/ca.pem", Response(HTTPStatus.OK, b"x" * (64 * 1024 + 1), "text/plain"), CaProtocolError),
        ("/enrol", Response.json(HTTPStatus.OK, {"certificate": 5}), CaProtocolError),
        ("/enrol", Response.error(HTTPStatus.TOO_MANY_REQUESTS, "slow down"), CaUnreachable),
        ("/enrol", Response.error(HTTPStatus.IM_A_TEAPOT, "\x1b[31mred"), CaProtocolError),
    ],
)
async def test_answers_outside_the_protocol_are_refused(
    ca: RunningCa, tmp_path: Path, path: str, response: Response, error: type[Exception]
) -> None:
    async def answer(request: Request) -> Response:
        return response

    ca.server.add_route("POST" if path == "/enrol" else "GET", path, answer)
    with pytest.raises(error) as failed:
        await enrol(tmp_path / "alice", "alice", ca.url, ca.admin.token("alice").secret)
    assert "\x1b" not in str(failed.value)
    assert_nothing_written(tmp_path / "alice")


async def test_the_certificate_is_checked_at_the_given_time(ca: RunningCa, tmp_path: Path) -> None:
    token = ca.admin.token("alice")
    later = ca.authority.list(session=ca.admin.session)[0].not_after + timedelta(days=30)
    with pytest.raises(CertificateRefused, match="expired"):
        await enrol(tmp_path / "alice", "alice", ca.url, token.secret, clock=lambda: later)
    assert_nothing_written(tmp_path / "alice")
