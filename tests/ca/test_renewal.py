"""Renewal (same key, authenticated by it) and re-keying (new key, new token): the CA side, POST /renew,
and the node's client functions in node/enrol.py."""

# The fixtures shared with test_ca and test_enrol are imported, and pytest passes them back as parameters.

from __future__ import annotations

import asyncio
import functools
import json
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ca import CaService, CertificateAuthority
from ca.errors import CsrSignatureInvalid
from node.enrol import rekey_node, renew_certificate, renewal_time
from node.errors import (
    CaUnreachable,
    EnrolmentError,
    EnrolmentInputError,
    EnrolmentRefused,
    FingerprintMismatch,
    RenewalRefused,
    TrustError,
)
from node.keystore import Keystore
from node.node import Node
from protocol import certs
from protocol.identity import IdentityKey
from tests.support.ca_helpers import PASS as CA_PASS
from tests.support.ca_helpers import (  # noqa: F401 - shared fixtures
    Admin,
    Clock,
    admin,
    authority,
    clock,
    csr_pem,
    home,
    http,
    init_ca,
    otp_secret,
    post,
    root_in,
)
from tests.support.enrol import PASS, RunningCa, enrol
from tests.support.enrol import ca as running_ca  # noqa: F401 - shared fixture


def enrol_key(authority: CertificateAuthority, admin: Admin, name: str) -> tuple[Ed25519PrivateKey, bytes]:
    key = Ed25519PrivateKey.generate()
    return key, authority.enrol(admin.token(name).secret, csr_pem(name, key))


# --- the CA ------------------------------------------------------------------------------------------


def test_a_renewal_keeps_name_and_key_and_is_audited(
    authority: CertificateAuthority, admin: Admin, clock: Clock
) -> None:
    key, pem = enrol_key(authority, admin, "alice")
    clock.advance(timedelta(days=5))
    renewed = certs.verify(certs.load_certificate(authority.renew(pem, csr_pem("alice", key))), authority.root, clock())
    old = certs.load_certificate(pem)
    assert renewed.name == "alice" and renewed.serial != old.serial_number
    assert renewed.public_key.public_bytes_raw() == key.public_key().public_bytes_raw()
    assert renewed.not_before == clock().replace(microsecond=0)
    assert renewed.not_after - renewed.not_before == timedelta(days=7)
    issued = [e for e in authority.audit_entries(session=admin.session) if e.action == "certificate_issued"]
    assert issued[-1].fields["via"] == f"renewal of {old.serial_number:016x}" and issued[-1].actor == "alice"


def test_renewal_refusals(authority: CertificateAuthority, admin: Admin, clock: Clock, tmp_path: Path) -> None:
    key, pem = enrol_key(authority, admin, "alice")
    with pytest.raises(RenewalRefused, match="keeps the name and the key") as refused:
        authority.renew(pem, csr_pem("alice"))  # a new key needs a token
    assert isinstance(refused.value, TrustError)
    with pytest.raises(RenewalRefused, match="keeps the name"):
        authority.renew(pem, csr_pem("bob", key))
    with pytest.raises(EnrolmentError):
        authority.renew(b"not a certificate", csr_pem("alice", key))
    good = x509.load_pem_x509_csr(csr_pem("alice", key)).public_bytes(serialization.Encoding.DER)
    forged = x509.load_der_x509_csr(good[:-1] + bytes([good[-1] ^ 1])).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrSignatureInvalid):
        authority.renew(pem, forged)  # whoever asks must hold the key
    ca_der = authority.node_credentials()[1]
    with pytest.raises(RenewalRefused, match="CA node"):
        authority.renew(certs.certificate_pem(certs.load_certificate(ca_der)), csr_pem("ca"))

    # Another CA's certificate with the same serial space: not ours.
    other_secret = init_ca(tmp_path / "other", clock)
    with CertificateAuthority.open(tmp_path / "other", CA_PASS, clock=clock) as other:
        other_admin = Admin(other, other_secret)
        foreign = other.enrol(other_admin.token("alice").secret, csr_pem("alice", key))
    with pytest.raises(RenewalRefused, match="did not issue"):
        authority.renew(foreign, csr_pem("alice", key))

    clock.advance(timedelta(days=7))
    with pytest.raises(RenewalRefused, match="not valid now"):
        authority.renew(pem, csr_pem("alice", key))


def test_a_revoked_key_is_never_renewed(authority: CertificateAuthority, admin: Admin, clock: Clock) -> None:
    key, first = enrol_key(authority, admin, "alice")
    clock.advance(timedelta(days=5))
    second = authority.renew(first, csr_pem("alice", key))
    authority.revoke(serial=certs.load_certificate(first).serial_number, reason="key-compromise", session=admin.session)
    with pytest.raises(RenewalRefused, match="revoked"):
        authority.renew(first, csr_pem("alice", key))
    with pytest.raises(RenewalRefused, match="the key of 'alice' was revoked"):
        authority.renew(second, csr_pem("alice", key))  # its sibling, with the same key, is not enough


async def test_post_renew(authority: CertificateAuthority, admin: Admin, clock: Clock) -> None:
    key, pem = enrol_key(authority, admin, "alice")
    async with CaService(authority, port=0) as service:
        body = json.dumps({"certificate": pem.decode(), "csr": csr_pem("alice", key).decode()}).encode()
        status, _, answer = await http(service.http.port, post("/renew", body))
        assert status == 200
        assert certs.verify(certs.load_certificate(json.loads(answer)["certificate"].encode()), authority.root, clock())
        wrong_key = json.dumps({"certificate": pem.decode(), "csr": csr_pem("alice").decode()}).encode()
        assert (await http(service.http.port, post("/renew", wrong_key)))[0] == 403
        assert (await http(service.http.port, post("/renew", b'{"csr": "x"}')))[0] == 400
        assert (await http(service.http.port, post("/renew", body, "text/plain")))[0] == 415


# --- the node's client --------------------------------------------------------------------------------


async def enrolled(ca: RunningCa, tmp_path: Path, name: str = "alice") -> Path:
    home = tmp_path / name
    await enrol(home, name, ca.url, ca.admin.token(name).secret)
    return home


async def test_renew_certificate_stores_a_new_certificate_for_the_same_key(
    running_ca: RunningCa, tmp_path: Path
) -> None:
    home = await enrolled(running_ca, tmp_path)
    with Keystore.open(home / "keystore.db", passphrase=PASS) as keystore:
        keystore.put("node", "next_prekey_rotation", b"9999999999")
        before = keystore.get("node", "certificate")
        identity = keystore.get("node", "identity")
        assert before is not None
        renewal = await asyncio.to_thread(renew_certificate, keystore)
        after = keystore.get("node", "certificate")
        assert after is not None and after != before and keystore.get("node", "identity") == identity
        assert keystore.get("node", "next_prekey_rotation") is None  # the bundle is re-signed over the new certificate
        verified = certs.verify(after, running_ca.authority.root, running_ca.authority.clock(), expected_name="alice")
        assert (renewal.serial, renewal.not_after) == (verified.serial, verified.not_after)
        assert renewal.previous_serial == x509.load_der_x509_certificate(before).serial_number
        assert (
            renewal.renew_at
            == renewal_time(after)
            == verified.not_before + (verified.not_after - verified.not_before) * 2 / 3
        )
        assert Node(keystore).certificate == after


async def test_renew_certificate_refused_for_a_revoked_node_changes_nothing(
    running_ca: RunningCa, tmp_path: Path
) -> None:
    home = await enrolled(running_ca, tmp_path)
    running_ca.authority.revoke("alice", reason="key-compromise", session=running_ca.admin.session)
    with Keystore.open(home / "keystore.db", passphrase=PASS) as keystore:
        before = keystore.get("node", "certificate")
        with pytest.raises(RenewalRefused, match="revoked") as refused:
            await asyncio.to_thread(renew_certificate, keystore)
        assert isinstance(refused.value, TrustError)
        assert keystore.get("node", "certificate") == before
        with pytest.raises(CaUnreachable):
            await asyncio.to_thread(functools.partial(renew_certificate, keystore, ca_url="http://127.0.0.1:9"))
        keystore.delete("node", "ca_url")
        with pytest.raises(EnrolmentInputError, match="CA's URL"):
            await asyncio.to_thread(renew_certificate, keystore)


async def test_rekey_replaces_the_identity_and_drops_the_sessions(running_ca: RunningCa, tmp_path: Path) -> None:
    home = await enrolled(running_ca, tmp_path)
    with Keystore.open(home / "keystore.db", passphrase=PASS) as keystore:
        keystore.put("session", "bob", b"a ratchet state")
        old_identity = keystore.get("node", "identity")
        old_certificate = keystore.get("node", "certificate")
    token = running_ca.admin.token("alice").secret
    rekey = functools.partial(rekey_node, home, "alice", running_ca.url, token, PASS)
    renewal = await asyncio.to_thread(rekey)
    with Keystore.open(home / "keystore.db", passphrase=PASS) as keystore:
        identity = keystore.get("node", "identity")
        certificate = keystore.get("node", "certificate")
        assert identity is not None and certificate is not None
        assert identity != old_identity and certificate != old_certificate
        assert keystore.get("session", "bob") is None  # made under the old, compromised identity
        verified = certs.verify(
            certificate, running_ca.authority.root, running_ca.authority.clock(), expected_name="alice"
        )
        assert verified.public_key.public_bytes_raw() == IdentityKey.from_private_bytes(identity).public_bytes
        assert verified.serial == renewal.serial
        assert keystore.get("node", "next_prekey_rotation") is None
    with pytest.raises(EnrolmentRefused, match="used already"):  # the token was spent
        await asyncio.to_thread(rekey)


async def test_rekey_refusals_change_nothing(running_ca: RunningCa, tmp_path: Path) -> None:
    home = await enrolled(running_ca, tmp_path)
    with Keystore.open(home / "keystore.db", passphrase=PASS) as keystore:
        before = keystore.get("node", "identity"), keystore.get("node", "certificate")
    token = running_ca.admin.token("alice").secret
    with pytest.raises(EnrolmentInputError, match="holds node 'alice', not 'bob'"):
        await asyncio.to_thread(rekey_node, home, "bob", running_ca.url, token, PASS)
    bob_token = running_ca.admin.token("bob").secret
    with pytest.raises(EnrolmentRefused, match="the token is for 'bob'"):
        await asyncio.to_thread(rekey_node, home, "alice", running_ca.url, bob_token, PASS)
    other_secret = init_ca(tmp_path / "other")
    with CertificateAuthority.open(tmp_path / "other", CA_PASS) as other:
        other_token = Admin(other, other_secret).token("alice").secret
        async with CaService(other, port=0) as impostor:
            with pytest.raises(FingerprintMismatch):
                await asyncio.to_thread(rekey_node, home, "alice", impostor.url, other_token, PASS)
    with Keystore.open(home / "keystore.db", passphrase=PASS) as keystore:
        assert (keystore.get("node", "identity"), keystore.get("node", "certificate")) == before
    await asyncio.to_thread(rekey_node, home, "alice", running_ca.url, token, PASS)  # the first token still works
