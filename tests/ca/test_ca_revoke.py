"""ca/ revocation: `revoke`, the CRL it issues at once, OCSP over HTTP (RFC 6960), and a revocation made
by `kmsnet ca revoke` in one process reaching the nodes through `kmsnet ca serve` in another."""

# The fixtures shared with test_ca are imported, and pytest passes them back as same-named parameters.

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509 import ocsp

from ca import CaService, CertificateAuthority
from ca.authority import CRL_RETENTION, CaPolicy
from ca.errors import CertificateNotFound, InvalidRequest
from node.link import RelayLink
from protocol import certs
from protocol.certs import CLOCK_SKEW
from protocol.identity import IdentityKey
from protocol.link import CrlFeed, LinkFrame, PublishCrl, Welcome
from protocol.revocation import OcspAnswer, build_ocsp_request, verify_crl, verify_ocsp_response
from relay.server import Relay, RelayConfig
from tests.support.ca_helpers import (  # noqa: F401 - shared fixtures
    PASS,
    Admin,
    Clock,
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
)
from tests.support.pki import NOW

ROOT = Path(__file__).resolve().parent.parent.parent


def enrol(authority: CertificateAuthority, admin: Admin, name: str) -> x509.Certificate:
    return certs.load_certificate(authority.enrol(admin.token(name).secret, csr_pem(name)))


# --- revoke and the CRL -------------------------------------------------------------------------------


def test_revoking_a_node_lists_all_its_valid_certificates_on_a_new_crl_at_once(
    authority: CertificateAuthority, admin: Admin, clock: Clock
) -> None:
    first = verify_crl(authority.current_crl(), authority.root, NOW)
    mallory = enrol(authority, admin, "mallory")
    clock.advance(timedelta(days=1))
    again = enrol(authority, admin, "mallory")  # a node holds several certificates while they overlap
    alice = enrol(authority, admin, "alice")
    revocation = authority.revoke("mallory", reason="key-compromise", session=admin.session)
    assert {c.serial for c in revocation.certificates} == {mallory.serial_number, again.serial_number}
    crl = verify_crl(authority.current_crl(), authority.root, clock())
    assert crl.number == revocation.crl_number == first.number + 1
    assert crl.this_update == clock() and crl.next_update == clock() + timedelta(hours=1)
    assert crl.revoked == {mallory.serial_number, again.serial_number}
    assert crl.entries[mallory.serial_number].reason == "key-compromise"
    assert crl.entries[mallory.serial_number].revoked_at == clock()
    status = {r.serial: r.status(clock()) for r in authority.list(session=admin.session)}
    assert status[mallory.serial_number] == "revoked" and status[alice.serial_number] == "valid"


def test_revoke_by_serial_and_the_refusals(authority: CertificateAuthority, admin: Admin, clock: Clock) -> None:
    alice = enrol(authority, admin, "alice")
    with pytest.raises(InvalidRequest, match="reason"):
        authority.revoke("alice", reason="bored", session=admin.session)
    with pytest.raises(InvalidRequest):
        authority.revoke(session=admin.session)
    with pytest.raises(CertificateNotFound):
        authority.revoke("bob", session=admin.session)
    with pytest.raises(CertificateNotFound):
        authority.revoke("bob", serial=alice.serial_number, session=admin.session)  # not bob's
    with pytest.raises(CertificateNotFound):
        authority.revoke(serial=12345, session=admin.session)
    ca_serial = certs.load_certificate(authority.node_credentials()[1]).serial_number
    with pytest.raises(InvalidRequest, match="CA's own node"):
        authority.revoke(serial=ca_serial, session=admin.session)
    with pytest.raises(InvalidRequest, match="CA's own node"):
        authority.revoke("ca", session=admin.session)
    authority.revoke(serial=alice.serial_number, reason="superseded", session=admin.session)
    with pytest.raises(CertificateNotFound, match="revoked already"):
        authority.revoke(serial=alice.serial_number, session=admin.session)
    with pytest.raises(CertificateNotFound):
        authority.revoke("alice", session=admin.session)  # nothing valid is left
    assert verify_crl(authority.current_crl(), authority.root, clock()).entries[alice.serial_number].reason == (
        "superseded"
    )


def test_crl_numbers_only_rise_and_expired_entries_leave_the_crl(
    authority: CertificateAuthority, admin: Admin, clock: Clock, home: Path, otp_secret: bytes
) -> None:
    numbers = [verify_crl(authority.current_crl(), authority.root, clock()).number]
    bob = enrol(authority, admin, "bob")
    for name in ("alice", "carol"):
        enrol(authority, admin, name)
        numbers.append(authority.revoke(name, session=admin.session).crl_number)
    authority.revoke("bob", session=admin.session)
    authority.close()
    with CertificateAuthority.open(home, PASS, clock=clock) as reopened:  # persisted across processes
        clock.advance(timedelta(days=7, hours=23))  # bob expired, and less than a day ago
        crl = verify_crl(reopened.current_crl(), reopened.root, clock())
        assert bob.serial_number in crl.revoked and len(crl.revoked) == 3
        clock.advance(timedelta(hours=17))  # more than a day past bob's notAfter, and past 2/3 of the CRL's life
        later = verify_crl(reopened.current_crl(), reopened.root, clock())
        assert later.revoked == frozenset() and later.number > crl.number > numbers[-1]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


def renew(authority: CertificateAuthority, cert: x509.Certificate, key: Ed25519PrivateKey) -> x509.Certificate:
    return certs.load_certificate(authority.renew(certs.certificate_pem(cert), csr_pem("alice", key)))


def test_revoke_after_a_renewal_lists_the_replaced_certificate_while_sessions_under_it_can_live(
    authority: CertificateAuthority, admin: Admin, clock: Clock
) -> None:
    """A peer's session made under alice's first certificate lives until its notAfter + CLOCK_SKEW
    (PROTOCOL.md §10.5): revoking alice just after that notAfter must still list it."""
    key = Ed25519PrivateKey.generate()
    first = certs.load_certificate(authority.enrol(admin.token("alice").secret, csr_pem("alice", key)))
    clock.advance(timedelta(days=5))  # past 2/3 of the 7-day validity: the node renews
    renewed = renew(authority, first, key)
    clock.now = first.not_valid_after_utc + CLOCK_SKEW / 2  # the first expired, a session under it may not have
    revocation = authority.revoke("alice", reason="key-compromise", session=admin.session)
    assert {c.serial for c in revocation.certificates} == {first.serial_number, renewed.serial_number}
    crl = verify_crl(authority.current_crl(), authority.root, clock())
    assert crl.revoked == {first.serial_number, renewed.serial_number}
    assert authority.ocsp_status(first.serial_number).status == "revoked"


def test_revoke_covers_every_key_the_name_held_and_another_name_certified_with_one_of_them(
    authority: CertificateAuthority, admin: Admin, clock: Clock
) -> None:
    key = Ed25519PrivateKey.generate()
    old_key = certs.load_certificate(authority.enrol(admin.token("alice").secret, csr_pem("alice", key)))
    new_key = enrol(authority, admin, "alice")  # a rekey: another key, another enrolment
    alias = certs.load_certificate(authority.enrol(admin.token("alias").secret, csr_pem("alias", key)))
    bob = enrol(authority, admin, "bob")
    revoked = {c.serial for c in authority.revoke("alice", session=admin.session).certificates}
    assert revoked == {old_key.serial_number, new_key.serial_number, alias.serial_number}
    assert bob.serial_number not in verify_crl(authority.current_crl(), authority.root, clock()).revoked


def test_an_expired_certificate_is_revoked_and_kept_on_the_crl_until_crl_retention_past_its_notafter(
    authority: CertificateAuthority, admin: Admin, clock: Clock
) -> None:
    assert CRL_RETENTION >= CLOCK_SKEW  # the documented bound: no shorter than a session outlives its certificate
    alice = enrol(authority, admin, "alice")
    end = alice.not_valid_after_utc
    clock.now = end + CRL_RETENTION - timedelta(hours=1)  # expired, yet a slow-clocked peer may hold a session
    authority.revoke("alice", session=admin.session)
    assert alice.serial_number in verify_crl(authority.current_crl(), authority.root, clock()).revoked
    clock.now = end + CRL_RETENTION - timedelta(seconds=1)
    assert alice.serial_number in verify_crl(_fresh_crl(authority, admin), authority.root, clock()).revoked
    clock.now = end + CRL_RETENTION
    assert alice.serial_number not in verify_crl(_fresh_crl(authority, admin), authority.root, clock()).revoked
    with pytest.raises(CertificateNotFound, match="could still back a session"):
        authority.revoke("alice", session=admin.session)  # nothing of alice's can back a session any more


def test_revoke_skips_certificates_past_the_retention(
    authority: CertificateAuthority, admin: Admin, clock: Clock
) -> None:
    old = enrol(authority, admin, "alice")
    clock.now = old.not_valid_after_utc + CRL_RETENTION  # no session under it can exist: listing it is noise
    current = enrol(authority, admin, "alice")
    revoked = {c.serial for c in authority.revoke("alice", session=admin.session).certificates}
    assert revoked == {current.serial_number}


def _fresh_crl(authority: CertificateAuthority, admin: Admin) -> bytes:
    """A CRL issued at the clock's now (a revocation issues one; here a throwaway node's)."""
    enrol(authority, admin, "zed")
    authority.revoke("zed", session=admin.session)
    return authority.current_crl()


def test_the_crl_lifetime_is_the_policy_chosen_at_init(tmp_path: Path, clock: Clock) -> None:
    secret = init_ca(tmp_path / "ca", clock, CaPolicy(crl_lifetime=timedelta(hours=6)))
    with CertificateAuthority.open(tmp_path / "ca", PASS, clock=clock) as authority:  # no policy given: the stored one
        crl = verify_crl(authority.current_crl(), authority.root, clock())
        assert crl.next_update - crl.this_update == timedelta(hours=6)
        clock.advance(timedelta(hours=4))  # 2/3 of 6 h
        assert verify_crl(authority.current_crl(), authority.root, clock()).number == crl.number + 1
        assert Admin(authority, secret).session.role == "admin"


# --- OCSP over HTTP -----------------------------------------------------------------------------------


@pytest.fixture
async def service(authority: CertificateAuthority) -> AsyncIterator[CaService]:
    async with CaService(authority, port=0) as service:
        yield service


def ocsp_post(path: str, der: bytes, content_type: str = "application/ocsp-request") -> bytes:
    return post(path, der, content_type)


async def test_ocsp_answers_good_revoked_and_unknown_signed_with_the_nonce(
    service: CaService, authority: CertificateAuthority, admin: Admin, clock: Clock
) -> None:
    alice, mallory = enrol(authority, admin, "alice"), enrol(authority, admin, "mallory")
    authority.revoke("mallory", reason="key-compromise", session=admin.session)
    for cert, expected in ((alice, OcspAnswer("good")), (mallory, OcspAnswer("revoked", clock(), "key-compromise"))):
        nonce = secrets.token_bytes(16)
        request = build_ocsp_request(cert, authority.root, nonce)
        for raw in (
            ocsp_post("/ocsp", request),
            ocsp_post("/", request),
            get("/ocsp/" + quote(base64.b64encode(request).decode(), safe="")),
        ):
            status, headers, body = await http(service.http.port, raw)
            assert (status, headers["content-type"]) == (200, "application/ocsp-response")
            answer = verify_ocsp_response(body, cert=cert, root=authority.root, nonce=nonce, now=clock())
            assert answer == expected

    # A serial this CA never issued, under its own name and key: "unknown", still signed.
    status, _, body = await http(service.http.port, ocsp_post("/ocsp", request_by_hash(authority, 12345)))
    response = ocsp.load_der_ocsp_response(body)
    assert (status, response.response_status) == (200, ocsp.OCSPResponseStatus.SUCCESSFUL)
    assert response.certificate_status == ocsp.OCSPCertStatus.UNKNOWN
    root_key = authority.root.public_key()
    assert isinstance(root_key, Ed25519PublicKey)
    root_key.verify(response.signature, response.tbs_response_bytes)


def request_by_hash(authority: CertificateAuthority | None, serial: int) -> bytes:
    """An OCSP request (SHA-1 CertID, as openssl sends) for any serial, naming this CA as the issuer
    (or, without one, an issuer that does not exist)."""
    name, key = b"nobody", b"no key"
    if authority is not None:
        root_key = authority.root.public_key()
        assert isinstance(root_key, Ed25519PublicKey)
        name, key = authority.root.subject.public_bytes(), root_key.public_bytes_raw()
    name_hash, key_hash = hashes.Hash(hashes.SHA1()), hashes.Hash(hashes.SHA1())
    name_hash.update(name)
    key_hash.update(key)
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        name_hash.finalize(), key_hash.finalize(), serial, hashes.SHA1()
    )
    return builder.build().public_bytes(serialization.Encoding.DER)


async def test_ocsp_refuses_what_it_cannot_answer_as_rfc_6960_says(service: CaService) -> None:
    for raw in (
        ocsp_post("/ocsp", b"not an ocsp request"),
        get("/ocsp/%%%not-base64"),
        get("/ocsp/" + base64.b64encode(b"junk").decode()),
    ):
        status, headers, body = await http(service.http.port, raw)
        assert (status, headers["content-type"]) == (200, "application/ocsp-response")
        assert ocsp.load_der_ocsp_response(body).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    status, _, body = await http(service.http.port, ocsp_post("/ocsp", request_by_hash(None, 1)))
    assert ocsp.load_der_ocsp_response(body).response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    status, _, body = await http(service.http.port, ocsp_post("/", b"x", "application/json"))
    assert status == 415 and "ocsp-request" in json.loads(body)["error"]


# --- across processes: `ca revoke` while `ca serve` runs ---------------------------------------------


def _env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}
    return {**base, "KMSNET_ARGON2_PROFILE": "test", "KMSNET_PASSPHRASE": PASS}


async def _kmsnet(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kmsnet", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=_env(), start_new_session=True,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_revocation_from_another_process_reaches_connected_nodes(tmp_path: Path) -> None:
    # How fast is measured by bench/revocation_bench.py, not asserted here (wall-clock stays out of tests).
    home = tmp_path / "ca"
    secret = init_ca(home)  # on the real clock: three processes share it
    with CertificateAuthority.open(home, PASS) as authority:
        admin = Admin(authority, secret)
        identity = IdentityKey.generate()
        pem = authority.enrol(admin.token("alice").secret, csr_pem("alice", identity.private_key))
        mallory = enrol(authority, admin, "mallory")
        root = authority.root
        root_pem = authority.root_pem

    relay = Relay(RelayConfig(ca_root=root, port=0))
    await relay.start()
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kmsnet", "ca", "serve", "--home", str(home), "--http", "127.0.0.1:0",
        "--relay", relay.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=_env(), start_new_session=True,
    )  # fmt: skip
    feed: list[tuple[float, bytes]] = []

    async def on_frame(frame: LinkFrame) -> None:
        if isinstance(frame, CrlFeed):
            feed.append((time.monotonic(), frame.crl))

    async def on_connected(welcome: Welcome) -> None:
        return None

    link = RelayLink(
        relay.url,
        identity=identity,
        certificate=certs.load_certificate(pem).public_bytes(serialization.Encoding.DER),
        root_pem=root_pem,
        on_frame=on_frame,
        on_connected=on_connected,
    )
    task = asyncio.create_task(link.run())
    try:
        assert serve.stdout is not None
        url = (await asyncio.wait_for(serve.stdout.readline(), 30)).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        async with asyncio.timeout(20):
            while not feed:
                await asyncio.sleep(0.02)
        before = verify_crl(feed[-1][1], root, datetime.now(UTC))

        # The next code (the session above took the current one): the CA's clock is the real one.
        otp = admin.code()
        code, out, err = await _kmsnet(
            "ca", "revoke", "--home", str(home), "mallory", "--reason", "key-compromise", "--otp", otp, "--json"
        )
        assert code == 0, err
        number = json.loads(out)["crl_number"]
        assert number > before.number
        async with asyncio.timeout(10):
            while verify_crl(feed[-1][1], root, datetime.now(UTC)).number < number:
                await asyncio.sleep(0.01)
        crl = verify_crl(feed[-1][1], root, datetime.now(UTC))
        assert mallory.serial_number in crl.revoked and crl.entries[mallory.serial_number].reason == "key-compromise"
    finally:
        await link.close()
        task.cancel()
        serve.terminate()
        assert await asyncio.wait_for(serve.wait(), 15) == 0
        assert serve.stderr is not None
        assert b"Traceback" not in await serve.stderr.read()
        await relay.close()


async def test_the_ca_publishes_a_crl_again_until_the_relay_confirms_it_holds_it(
    authority: CertificateAuthority, clock: Clock, admin: Admin
) -> None:
    """A PUBLISH_CRL the relay lost (its store full, a connection dropped) is sent again each check
    until the relay's feed shows that number (issue #13 part 7)."""
    relay = Relay(RelayConfig(ca_root=authority.root, port=0, clock=clock))
    await relay.start()
    taken = relay._on_crl
    dropped: list[object] = []

    async def lossy(peer: object, publish: PublishCrl) -> None:
        if len(dropped) < 3:  # the first three never reach the feed
            dropped.append(publish)
            return
        await taken(peer, publish)  # type: ignore[arg-type]

    relay._on_crl = lossy  # type: ignore[method-assign]
    try:
        async with CaService(authority, port=0, relay_url=relay.url, crl_check_interval=0.05) as service:
            async with asyncio.timeout(10):
                while relay._crl is None:
                    await asyncio.sleep(0.02)
            assert len(dropped) == 3 and relay._crl == authority.current_crl()
            assert service.publisher is not None
            async with asyncio.timeout(10):  # the relay's feed shows it to the publisher at its next check
                while service.publisher.confirmed != 1:
                    await asyncio.sleep(0.02)
            sent = len(dropped)
            await asyncio.sleep(0.3)  # confirmed: not sent again
            assert len(dropped) == sent
    finally:
        await relay.close()
