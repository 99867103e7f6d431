"""ca/: the authority (init, tokens, enrolment, certificates, CRLs), its HTTP API and the CRL feed.

Administrators, revocation, OCSP, renewal and the audit log have their own modules (test_ca_admin,
test_ca_revoke, test_renewal); the helpers here (`Clock`, `Admin`, `csr_pem`) serve them too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import stat
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import ca.http as ca_http
from ca import CaService, CertificateAuthority
from ca.authority import CA_DB, CA_PEM, CaPolicy
from ca.errors import (
    CaError,
    CaExists,
    CaNotFound,
    CsrSignatureInvalid,
    EnrolmentError,
    EnrolmentRefused,
    InvalidRequest,
    TokenExpired,
    TokenNameMismatch,
    TokenUnknown,
    TokenUsed,
)
from ca.http import CaHttpServer, EnrolmentThrottle
from node.errors import TrustError, WrongPassphrase
from node.keystore import ARGON2_TEST, Keystore
from node.link import RelayLink, tls_context
from protocol import certs
from protocol.errors import CertificateConstraintError
from protocol.identity import IdentityKey
from protocol.link import CrlFeed, LinkFrame, Welcome
from protocol.revocation import verify_crl
from relay.server import Relay, RelayConfig
from tests.support.ca_helpers import (  # noqa: F401 - fixtures, passed by name
    PASS,
    Admin,
    Clock,
    Ticks,
    admin,
    authority,
    clock,
    csr_pem,
    get,
    home,
    http,
    init_ca,
    otp_secret,
    post,
    root_in,
    ticks,
)
from tests.support.pki import NOW


def _csr_with_bad_signature(name: str, key: Ed25519PrivateKey) -> bytes:
    """A CSR naming `key` whose signature does not verify (its last bit flipped)."""
    good = x509.load_pem_x509_csr(csr_pem(name, key)).public_bytes(serialization.Encoding.DER)
    return x509.load_der_x509_csr(good[:-1] + bytes([good[-1] ^ 1])).public_bytes(serialization.Encoding.PEM)


# --- init and open -------------------------------------------------------------------------------------


def test_init_writes_sealed_state_and_public_root_and_returns_its_fingerprint(tmp_path: Path, clock: Clock) -> None:
    home = tmp_path / "ca"
    created = CertificateAuthority.init(home, PASS, name="lab-ca", clock=clock, argon2=ARGON2_TEST)
    fingerprint = created.fingerprint
    assert (created.admin.name, created.admin.role) == ("admin", "admin")
    assert created.admin.otpauth.startswith("otpauth://totp/kmsnet:admin?")
    assert "issuer=kmsnet" in created.admin.otpauth
    assert created.admin.secret.hex() not in repr(created)
    root = x509.load_pem_x509_certificate((home / CA_PEM).read_bytes())
    assert fingerprint == hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert root.subject.rfc4514_string() == "CN=lab-ca"
    assert root.not_valid_before_utc <= NOW < root.not_valid_after_utc
    certs.check_root(root)
    assert stat.S_IMODE((home / CA_DB).stat().st_mode) == 0o600
    assert sorted(p.name for p in home.iterdir()) == [CA_DB, CA_PEM]  # no temporary files left
    with CertificateAuthority.open(home, PASS, clock=clock) as ca:
        assert ca.fingerprint == fingerprint
        assert ca.root == root


def test_init_twice_is_refused_and_leaves_the_files_alone(home: Path, clock: Clock) -> None:
    before = {p.name: p.read_bytes() for p in home.iterdir()}
    with pytest.raises(CaExists):
        CertificateAuthority.init(home, "another passphrase", clock=clock, argon2=ARGON2_TEST)
    assert {p.name: p.read_bytes() for p in home.iterdir()} == before


def test_init_refuses_a_home_holding_only_a_ca_pem(tmp_path: Path, clock: Clock) -> None:
    (tmp_path / CA_PEM).write_bytes(b"someone else's root")
    with pytest.raises(CaExists):
        CertificateAuthority.init(tmp_path, PASS, clock=clock, argon2=ARGON2_TEST)
    assert not (tmp_path / CA_DB).exists()
    assert (tmp_path / CA_PEM).read_bytes() == b"someone else's root"


def test_init_with_a_bad_root_name_creates_nothing(tmp_path: Path, clock: Clock) -> None:
    with pytest.raises(InvalidRequest):
        CertificateAuthority.init(tmp_path / "ca", PASS, name="x" * 65, clock=clock, argon2=ARGON2_TEST)
    assert not (tmp_path / "ca").exists() or not any((tmp_path / "ca").iterdir())


def test_open_needs_a_ca_and_its_passphrase(home: Path, tmp_path: Path) -> None:
    with pytest.raises(CaNotFound):
        CertificateAuthority.open(tmp_path / "nowhere", PASS)
    with pytest.raises(WrongPassphrase):
        CertificateAuthority.open(home, "wrong")


# --- tokens and enrolment ------------------------------------------------------------------------------


def test_enrolment_issues_a_certificate_that_verifies_for_the_name(
    authority: CertificateAuthority, admin: Admin
) -> None:
    identity = IdentityKey.generate()
    token = admin.token("alice")
    pem = authority.enrol(token.secret, csr_pem("alice", identity.private_key))
    verified = certs.verify(certs.load_certificate(pem), authority.root, NOW, expected_name="alice")
    assert verified.public_key.public_bytes_raw() == identity.public_bytes
    assert verified.not_before <= NOW
    assert verified.not_after - verified.not_before == timedelta(days=7)
    assert 0 < verified.serial < 2**64
    issued = {c.name: c for c in authority.list(session=admin.session)}
    assert sorted(issued) == ["alice", "ca"]
    assert (issued["alice"].kind, issued["alice"].serial) == ("node", verified.serial)
    assert issued["alice"].fingerprint == verified.fingerprint.hex()
    assert issued["alice"].not_after == verified.not_after


def test_a_token_is_one_time(authority: CertificateAuthority, admin: Admin) -> None:
    token = admin.token("alice")
    authority.enrol(token.secret, csr_pem("alice"))
    with pytest.raises(TokenUsed, match="by another key"):
        authority.enrol(token.secret, csr_pem("alice"))


def test_a_retry_by_the_same_key_gets_the_same_certificate_within_the_token_lifetime(
    authority: CertificateAuthority, admin: Admin, clock: Clock
) -> None:
    """A node that lost the answer, or could not store it, retries: no second certificate, no burnt token."""
    key = Ed25519PrivateKey.generate()
    token = admin.token("alice", timedelta(minutes=10))
    first = authority.enrol(token.secret, csr_pem("alice", key))
    clock.advance(timedelta(minutes=9))
    assert authority.enrol(token.secret, csr_pem("alice", key)) == first  # a fresh CSR, the same key
    issued = [c for c in authority.list(session=admin.session) if c.name == "alice"]
    assert [c.pem for c in issued] == [first]  # one certificate, no orphan
    entries = authority.audit_entries(session=admin.session)
    assert [e.action for e in entries].count("enrolment_repeated") == 1
    with pytest.raises(TokenUsed, match="by another key"):
        authority.enrol(token.secret, csr_pem("alice"))  # the token holder with another key: refused
    with pytest.raises(CsrSignatureInvalid):  # knowing the public key is not enough: the CSR must be signed by it
        authority.enrol(token.secret, _csr_with_bad_signature("alice", key))
    clock.advance(timedelta(minutes=1))
    with pytest.raises(TokenUsed, match=r"used already$"):
        authority.enrol(token.secret, csr_pem("alice", key))  # past the token's lifetime
    assert [c.name for c in authority.list(session=admin.session)].count("alice") == 1


def test_a_retry_after_revocation_is_refused(authority: CertificateAuthority, admin: Admin) -> None:
    key = Ed25519PrivateKey.generate()
    token = admin.token("alice")
    authority.enrol(token.secret, csr_pem("alice", key))
    authority.revoke("alice", session=admin.session)
    with pytest.raises(TokenUsed, match="revoked"):
        authority.enrol(token.secret, csr_pem("alice", key))


def test_an_expired_token_is_refused(authority: CertificateAuthority, clock: Clock, admin: Admin) -> None:
    token = admin.token("alice", timedelta(minutes=10))
    clock.advance(timedelta(minutes=10))
    with pytest.raises(TokenExpired):
        authority.enrol(token.secret, csr_pem("alice"))


@pytest.mark.parametrize("guess", ["A" * 22, "not a token", "", "A" * 10_000])
def test_an_unknown_token_is_refused(authority: CertificateAuthority, guess: str, admin: Admin) -> None:
    admin.token("alice")
    with pytest.raises(TokenUnknown):
        authority.enrol(guess, csr_pem("alice"))


def test_a_token_for_bob_refuses_a_csr_for_alice_and_still_enrols_bob(
    authority: CertificateAuthority, admin: Admin
) -> None:
    token = admin.token("bob")
    with pytest.raises(TokenNameMismatch):
        authority.enrol(token.secret, csr_pem("alice"))
    pem = authority.enrol(token.secret, csr_pem("bob"))
    assert certs.verify(certs.load_certificate(pem), authority.root, NOW).name == "bob"
    assert sorted(c.name for c in authority.list(session=admin.session)) == ["bob", "ca"]


def test_a_csr_with_a_bad_signature_is_refused_and_keeps_the_token(
    authority: CertificateAuthority, admin: Admin
) -> None:
    token = admin.token("alice")
    with pytest.raises(CsrSignatureInvalid) as refused:
        authority.enrol(token.secret, _csr_with_bad_signature("alice", Ed25519PrivateKey.generate()))
    assert isinstance(refused.value, TrustError)
    authority.enrol(token.secret, csr_pem("alice"))


def test_a_non_ed25519_csr_is_refused(authority: CertificateAuthority, admin: Admin) -> None:
    token = admin.token("alice")
    with pytest.raises(EnrolmentError, match="Ed25519") as refused:
        authority.enrol(token.secret, csr_pem("alice", ec.generate_private_key(ec.SECP256R1())))
    assert not isinstance(refused.value, EnrolmentRefused)
    authority.enrol(token.secret, csr_pem("alice"))


def test_malformed_csrs_are_refused(authority: CertificateAuthority, admin: Admin) -> None:
    token = admin.token("alice")
    two_attributes = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "alice"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lab"),
                ]
            )
        )
        .sign(Ed25519PrivateKey.generate(), None)
        .public_bytes(serialization.Encoding.PEM)
    )
    for bad in (
        b"not a csr",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        two_attributes,
    ):
        with pytest.raises(EnrolmentError):
            authority.enrol(token.secret, bad)
    authority.enrol(token.secret, csr_pem("alice"))


@pytest.mark.parametrize(
    ("name", "ttl"),
    [
        ("Alice", timedelta(hours=1)),
        ("-alice", timedelta(hours=1)),
        ("ca", timedelta(hours=1)),
        ("alice", timedelta(0)),
        ("alice", timedelta(days=8)),
    ],
)
def test_token_arguments_are_checked(authority: CertificateAuthority, name: str, ttl: timedelta, admin: Admin) -> None:
    with pytest.raises(InvalidRequest):
        admin.token(name, ttl)


def test_the_token_is_stored_only_as_a_hash_and_never_shown(
    authority: CertificateAuthority, home: Path, admin: Admin
) -> None:
    token = admin.token("alice")
    assert token.secret not in repr(token)
    assert len(token.secret) == 22  # 128 bits, URL-safe base64
    with Keystore.open(home / CA_DB, passphrase=PASS) as keystore:
        values = [keystore.get(ns, name) or b"" for ns in ("ca", "token", "issued") for name in keystore.names(ns)]
        names = keystore.names("token")
    assert all(token.secret.encode() not in value for value in values)
    assert names == [hashlib.sha256(token.secret.encode()).hexdigest()[:16]]


def test_old_token_records_are_purged(authority: CertificateAuthority, clock: Clock, home: Path, admin: Admin) -> None:
    old = admin.token("alice", timedelta(minutes=5))
    clock.advance(timedelta(days=8))
    admin.token("bob")
    with pytest.raises(TokenUnknown):
        authority.enrol(old.secret, csr_pem("alice"))


def test_serials_are_random_positive_64_bit_and_unique(authority: CertificateAuthority, admin: Admin) -> None:
    for index in range(20):
        name = f"node{index}"
        authority.enrol(admin.token(name).secret, csr_pem(name))
    serials = [c.serial for c in authority.list(session=admin.session)]
    assert len(set(serials)) == len(serials) == 21
    assert all(0 < s < 2**64 for s in serials)
    assert max(serials) > 2**32  # random, not a counter


def test_certificates_never_outlive_the_root(tmp_path: Path, clock: Clock) -> None:
    secret = init_ca(tmp_path, clock, policy=CaPolicy(root_validity=timedelta(days=2)))
    with CertificateAuthority.open(tmp_path, PASS, clock=clock) as ca:
        admin = Admin(ca, secret)
        pem = ca.enrol(admin.token("alice").secret, csr_pem("alice"))
        assert certs.load_certificate(pem).not_valid_after_utc == ca.root.not_valid_after_utc
        clock.advance(timedelta(days=2))
        with pytest.raises(CaError, match="expired"):
            ca.enrol(admin.token("bob").secret, csr_pem("bob"))


# --- the CA node, the relay's certificate --------------------------------------------------------------


def test_the_ca_node_certificate_is_renewed_before_it_expires(authority: CertificateAuthority, clock: Clock) -> None:
    identity, first = authority.node_credentials()
    assert certs.verify(first, authority.root, NOW, expected_name="ca").public_key == identity.public
    clock.advance(timedelta(days=4))
    assert authority.node_credentials()[1] == first
    clock.advance(timedelta(days=1))  # 5 days: past 2/3 of 7
    again, renewed = authority.node_credentials()
    assert renewed != first and again.public_bytes == identity.public_bytes
    assert certs.verify(renewed, authority.root, clock(), expected_name="ca").not_before == clock().replace(
        microsecond=0
    )


async def test_the_relay_certificate_serves_tls_to_a_node_pinning_the_root(tmp_path: Path) -> None:
    # On the real clock: TLS checks validity against it.
    secret = init_ca(tmp_path / "ca")
    with CertificateAuthority.open(tmp_path / "ca", PASS) as authority:
        await _serve_tls_with_relay_credentials(authority, Admin(authority, secret), tmp_path)


async def _serve_tls_with_relay_credentials(authority: CertificateAuthority, admin: Admin, tmp_path: Path) -> None:
    cert, key_pem = authority.issue_relay_credentials(["127.0.0.1", "relay.lab"], session=admin.session)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v) for v in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["relay.lab"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    with pytest.raises(CertificateConstraintError):
        certs.verify(cert, authority.root, datetime.now(NOW.tzinfo))  # never a node identity
    assert sorted(c.kind for c in authority.list(session=admin.session)) == ["node", "server"]

    (tmp_path / "relay.pem").write_bytes(certs.certificate_pem(cert))
    (tmp_path / "relay.key").write_bytes(key_pem)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tmp_path / "relay.pem", tmp_path / "relay.key")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_tls)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls_context(authority.root_pem), server_hostname="127.0.0.1"
        )
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        writer.close()


def test_bad_relay_hostnames_are_refused(authority: CertificateAuthority, admin: Admin) -> None:
    with pytest.raises(InvalidRequest):
        authority.issue_relay_credentials(["not a host!"], session=admin.session)
    with pytest.raises(InvalidRequest):
        authority.issue_relay_credentials([], session=admin.session)


# --- CRL -----------------------------------------------------------------------------------------------


def test_the_crl_is_issued_once_then_reissued_after_two_thirds_of_its_life(
    authority: CertificateAuthority, clock: Clock, home: Path
) -> None:
    first = authority.current_crl()
    crl = verify_crl(first, authority.root, NOW)
    assert (crl.number, crl.this_update, crl.next_update, crl.revoked) == (
        1,
        NOW,
        NOW + timedelta(hours=1),
        frozenset(),
    )
    clock.advance(timedelta(minutes=39))
    assert authority.current_crl() == first
    clock.advance(timedelta(minutes=1))  # 40 min = 2/3 of the default hour
    second = authority.current_crl()
    assert verify_crl(second, authority.root, clock()).number == 2
    authority.close()
    with CertificateAuthority.open(home, PASS, clock=clock) as reopened:
        assert reopened.current_crl() == second  # persisted
        clock.advance(timedelta(minutes=40))
        assert verify_crl(reopened.current_crl(), reopened.root, clock()).number == 3


def test_a_clock_set_back_gets_a_new_crl_with_a_higher_number(authority: CertificateAuthority, clock: Clock) -> None:
    authority.current_crl()
    clock.advance(-timedelta(hours=2))
    crl = verify_crl(authority.current_crl(), authority.root, clock())
    assert (crl.number, crl.this_update) == (2, clock())


def enrolment(token: str, name: str) -> bytes:
    return json.dumps({"token": token, "csr": csr_pem(name).decode()}).encode()


@pytest.fixture
async def server(authority: CertificateAuthority, ticks: Ticks) -> AsyncIterator[CaHttpServer]:
    async with CaHttpServer(authority, port=0, throttle=EnrolmentThrottle(monotonic=ticks)) as server:
        yield server


async def test_http_serves_the_root_the_crl_and_health(server: CaHttpServer, authority: CertificateAuthority) -> None:
    status, headers, body = await http(server.port, get("/ca.pem"))
    assert (status, headers["content-type"], body) == (200, "application/x-pem-file", authority.root_pem)
    status, headers, body = await http(server.port, get("/crl?fresh=1"))
    assert (status, headers["content-type"]) == (200, "application/pkix-crl")
    assert verify_crl(body, authority.root, NOW).number == 1
    status, headers, body = await http(server.port, get("/healthz"))
    assert (status, headers["content-type"], body) == (200, "text/plain; charset=utf-8", b"ok\n")


async def test_http_enrols_with_a_token(server: CaHttpServer, authority: CertificateAuthority, admin: Admin) -> None:
    token = admin.token("alice")
    status, headers, body = await http(server.port, post("/enrol", enrolment(token.secret, "alice")))
    assert (status, headers["content-type"]) == (200, "application/json")
    pem = json.loads(body)["certificate"].encode()
    assert certs.verify(certs.load_certificate(pem), authority.root, NOW, expected_name="alice")
    status, _, body = await http(server.port, post("/enrol", enrolment(token.secret, "alice")))
    assert status == 403
    assert "used" in json.loads(body)["error"]


async def test_http_still_enrols_at_the_old_spelling_enroll(server: CaHttpServer, admin: Admin) -> None:
    token = admin.token("bob")
    status, _, body = await http(server.port, post("/enroll", enrolment(token.secret, "bob")))
    assert status == 200 and "BEGIN CERTIFICATE" in json.loads(body)["certificate"]
    status, _, _ = await http(server.port, post("/enroll", enrolment(token.secret, "bob")))
    assert status == 403  # one handler behind both paths: the token is spent for /enrol too


async def test_http_refusals_are_precise_json_errors(
    server: CaHttpServer, authority: CertificateAuthority, admin: Admin
) -> None:
    token = admin.token("bob")
    cases = [
        (post("/enrol", enrolment(token.secret, "alice")), 403),  # a CSR for another name
        (post("/enrol", enrolment("A" * 22, "bob")), 403),  # unknown token
        (post("/enrol", b"{not json"), 400),
        (post("/enrol", b"\xff\xfe"), 400),
        (post("/enrol", b'["token", "csr"]'), 400),
        (post("/enrol", json.dumps({"token": token.secret, "csr": 5}).encode()), 400),
        (post("/enrol", json.dumps({"token": token.secret, "csr": "x", "extra": 1}).encode()), 400),
        (post("/enrol", json.dumps({"token": token.secret, "csr": "junk"}).encode()), 400),
        (post("/enrol", enrolment(token.secret, "bob"), "text/plain"), 415),
        (get("/nowhere"), 404),
        (get("/enrol"), 405),
        (post("/ca.pem", b""), 405),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET nowhere HTTP/1.1\r\n\r\n", 400),
        (b"GET /\x1b[31m HTTP/1.1\r\n\r\n", 400),
        (b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET /healthz HTTP/1.1\r\n folded: header\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n", 400),
        (b"POST /enrol HTTP/1.1\r\nContent-Type: application/json\r\n\r\n", 411),
        (b"POST /enrol HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", 400),
        (b"POST /enrol HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /enrol HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (b"POST /enrol HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort", 400),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (9 * 1024) + b"\r\n\r\n", 431),
    ]
    for request, expected in cases:
        status, headers, body = await http(server.port, request)
        assert status == expected, (request[:60], status, body)
        assert headers["content-type"] == "application/json"
        assert isinstance(json.loads(body)["error"], str)
        assert b"Traceback" not in body
    assert (await http(server.port, get("/enrol")))[1]["allow"] == "POST"
    # Refused CSRs left bob's token as it was.
    status, _, _ = await http(server.port, post("/enrol", enrolment(token.secret, "bob")))
    assert status == 200


async def test_http_oversized_body_is_413_even_while_it_is_being_sent(server: CaHttpServer) -> None:
    body = b"x" * (64 * 1024 + 1)
    status, _, answer = await http(server.port, post("/enrol", body))
    assert status == 413
    assert "body over" in json.loads(answer)["error"]
    headers_only = b"POST /enrol HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n"
    assert (await http(server.port, headers_only))[0] == 413


async def test_http_throttles_failed_enrolments_per_client(
    server: CaHttpServer, authority: CertificateAuthority, ticks: Ticks, admin: Admin
) -> None:
    token = admin.token("alice")
    for _ in range(10):
        assert (await http(server.port, post("/enrol", enrolment("A" * 22, "alice"))))[0] == 403
    status, headers, _ = await http(server.port, post("/enrol", enrolment(token.secret, "alice")))
    assert status == 429
    assert int(headers["retry-after"]) == 60
    assert (await http(server.port, get("/ca.pem")))[0] == 200  # only enrolment is throttled
    ticks.value += 60
    status, _, _ = await http(server.port, post("/enrol", enrolment(token.secret, "alice")))
    assert status == 200  # the window slid; the throttled attempt did not consume the token


def test_the_throttle_forgets_the_least_recent_clients() -> None:
    ticks = Ticks()
    throttle = EnrolmentThrottle(limit=1, window=60, max_clients=2, monotonic=ticks)
    for client in ("a", "b", "c"):
        throttle.failed(client)
    assert throttle.retry_after("a") is None
    assert throttle.retry_after("b") == throttle.retry_after("c") == 60
    ticks.value += 30
    assert throttle.retry_after("c") == 30


async def test_http_answers_a_stalled_request_with_408(server: CaHttpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ca_http, "READ_TIMEOUT", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # and then nothing
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


async def test_a_handler_bug_is_a_500_without_a_traceback(server: CaHttpServer) -> None:
    async def broken(request: ca_http.Request) -> ca_http.Response:
        raise RuntimeError("secret internals")

    server.add_route("GET", "/broken", broken)
    status, _, body = await http(server.port, get("/broken"))
    assert (status, json.loads(body)) == (500, {"error": "internal error"})
    assert (await http(server.port, get("/healthz")))[0] == 200


async def test_close_waits_for_a_request_in_flight_then_stops_listening(
    authority: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ca_http, "SHUTDOWN_GRACE", 0.3)
    server = CaHttpServer(authority, port=0)
    await server.start()
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # never finished
    await writer.drain()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # dropped without an answer
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


# --- the CRL feed through a relay ----------------------------------------------------------------------


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_ca_serve_publishes_the_crl_to_the_relay_and_nodes_receive_it(
    authority: CertificateAuthority, clock: Clock, admin: Admin
) -> None:
    relay = Relay(RelayConfig(ca_root=authority.root, port=0, clock=clock))
    await relay.start()
    try:
        async with CaService(authority, port=0, relay_url=relay.url, crl_check_interval=0.05) as service:
            await wait_for(lambda: relay._crl is not None)
            assert relay._crl == authority.current_crl()
            assert verify_crl(relay._crl, authority.root, clock()).number == 1
            assert "ca" in relay.connected()

            # A node connecting now gets the feed.
            identity = IdentityKey.generate()
            pem = authority.enrol(admin.token("alice").secret, csr_pem("alice", identity.private_key))
            feed: list[bytes] = []

            async def on_frame(frame: LinkFrame) -> None:
                if isinstance(frame, CrlFeed):
                    feed.append(frame.crl)

            async def on_connected(welcome: Welcome) -> None:
                return None

            link = RelayLink(
                relay.url,
                identity=identity,
                certificate=certs.load_certificate(pem).public_bytes(serialization.Encoding.DER),
                root_pem=authority.root_pem,
                on_frame=on_frame,
                on_connected=on_connected,
                reconnect=False,
            )
            task = asyncio.create_task(link.run())
            await wait_for(lambda: len(feed) == 1)
            assert feed[0] == relay._crl

            # The CA re-issues after 16 h; the publisher notices within its check interval.
            clock.advance(timedelta(hours=16, minutes=1))
            await wait_for(lambda: len(feed) == 2)
            assert verify_crl(feed[1], authority.root, clock()).number == 2
            assert service.publisher is not None and service.publisher.published == feed[1]
            await link.close()
            await asyncio.wait_for(task, 5)
    finally:
        await relay.close()


async def test_the_publisher_reconnects_with_a_renewed_ca_certificate(
    authority: CertificateAuthority, clock: Clock
) -> None:
    relay = Relay(RelayConfig(ca_root=authority.root, port=0, clock=clock))
    await relay.start()
    try:
        async with CaService(authority, port=0, relay_url=relay.url, crl_check_interval=0.05):
            await wait_for(lambda: relay._crl is not None)
            first = authority.node_credentials()[1]
            clock.advance(timedelta(days=5))  # past 2/3 of the CA node certificate's week
            await wait_for(lambda: authority.node_credentials()[1] != first)
            # The new CRL (the old one is past 2/3 of its life too) arrives over the new connection.
            await wait_for(lambda: verify_crl(relay._crl or b"", authority.root, clock()).number == 2)
            await wait_for(lambda: "ca" in relay.connected())  # the old link may have carried CRL 2
    finally:
        await relay.close()


def test_no_secret_in_the_ca_files_outside_the_sealed_store(
    home: Path, authority: CertificateAuthority, admin: Admin
) -> None:
    token = admin.token("alice")
    session = admin.session
    blob = b"".join(p.read_bytes() for p in home.iterdir() if p.is_file())
    assert token.secret.encode() not in blob
    assert hashlib.sha256(token.secret.encode()).digest() not in blob  # sealed, like every record
    assert admin.secret not in blob and admin.secret.hex().encode() not in blob  # the TOTP secret too
    assert session.secret.encode() not in blob and session.secret not in repr(session)
