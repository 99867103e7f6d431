"""node.pkcs11 against a SoftHSM token, and node.signed_der (X.509 signed outside `cryptography`)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from kmsnet.exits import CliFailure
from kmsnet.pkcs11_options import PinSource
from node.errors import KeystoreCorrupt
from node.pkcs11 import TokenError, TokenKeyMissing, TokenKeyRef, TokenSession, TokenSlot, TokenUnavailable, WrongPin
from node.signed_der import DelegatedEd25519, SigningFailed
from protocol import certs
from protocol.revocation import (
    OcspAnswer,
    RevokedEntry,
    build_ocsp_request,
    build_ocsp_response,
    issue_crl,
    verify_crl,
    verify_ocsp_response,
)
from tests.support.pki import NOW, seeded
from tests.support.softhsm import SoftHsm


class SoftwareDelegated(DelegatedEd25519):
    """A `DelegatedEd25519` whose "device" is an ordinary key: the assembly, tested without a token."""

    def __init__(self, key: Ed25519PrivateKey, *, liar: Ed25519PrivateKey | None = None) -> None:
        self._key = key
        self._signer = liar or key

    def sign(self, data: bytes) -> bytes:
        return self._signer.sign(data)

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()


def _root(key: DelegatedEd25519) -> x509.Certificate:
    return certs.make_root(key=key, name="hsm-ca", serial=1, not_before=NOW, not_after=NOW + timedelta(days=30))


def _artefacts(ca: DelegatedEd25519) -> None:
    """Root, leaf, CRL and OCSP made by `ca` verify exactly as the software-key ones do."""
    root = _root(ca)
    certs.check_root(root)
    leaf_key = Ed25519PrivateKey.from_private_bytes(seeded("leaf"))
    leaf = certs.issue(
        ca_key=ca,
        ca_cert=root,
        subject_name="alice",
        public_key=leaf_key.public_key(),
        serial=7,
        not_before=NOW,
        not_after=NOW + timedelta(days=1),
    )
    verified = certs.verify(leaf, root, NOW)
    assert verified.name == "alice"
    crl = issue_crl(
        ca_key=ca,
        ca_cert=root,
        number=3,
        this_update=NOW,
        next_update=NOW + timedelta(hours=1),
        revoked=[RevokedEntry(7, NOW, "key-compromise")],
    )
    assert verify_crl(crl, root, NOW).revoked == frozenset({7})
    nonce = seeded("nonce", 16)
    response = build_ocsp_response(
        build_ocsp_request(leaf, root, nonce),
        ca_key=ca,
        ca_cert=root,
        lookup=lambda serial: OcspAnswer("revoked", NOW, "key-compromise") if serial == 7 else OcspAnswer("unknown"),
        now=NOW,
        validity=timedelta(hours=1),
    )
    answer = verify_ocsp_response(response, cert=leaf, root=root, nonce=nonce, now=NOW)
    assert (answer.status, answer.reason) == ("revoked", "key-compromise")


def test_delegated_signing_makes_artefacts_that_verify() -> None:
    _artefacts(SoftwareDelegated(Ed25519PrivateKey.from_private_bytes(seeded("ca"))))


def test_a_device_signing_with_another_key_is_caught_before_anything_leaves() -> None:
    liar = SoftwareDelegated(
        Ed25519PrivateKey.from_private_bytes(seeded("ca")), liar=Ed25519PrivateKey.from_private_bytes(seeded("x"))
    )
    with pytest.raises(SigningFailed, match="does not verify"):
        _root(liar)


def test_delegated_csr_carries_the_delegated_key() -> None:
    key = Ed25519PrivateKey.from_private_bytes(seeded("node"))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")])
    csr = SoftwareDelegated(key).sign_csr(x509.CertificateSigningRequestBuilder().subject_name(subject))
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    assert csr.subject == subject


def test_token_ed25519_key_signs_in_the_token_and_x509_verifies(softhsm_token: SoftHsm) -> None:
    with TokenSession.open(softhsm_token.slot, softhsm_token.pin) as session:
        key = session.generate_ed25519("test-ca-root")
        assert len(key.ref.public) == 32
        signature = key.sign(b"data")
        key.public_key().verify(signature, b"data")  # cryptography verifies the token's EdDSA
        _artefacts(key)
        again = session.ed25519(TokenKeyRef.from_record(key.ref.to_record()))
        again.public_key().verify(again.sign(b"more"), b"more")
        assert "test-ca-root" in repr(again) and softhsm_token.pin not in repr(session)


def test_token_refuses_wrong_pin_and_unknown_tokens(softhsm_token: SoftHsm) -> None:
    with pytest.raises(WrongPin):
        TokenSession.open(softhsm_token.slot, "not-the-pin")
    with TokenSession.open(softhsm_token.slot, softhsm_token.pin), pytest.raises(WrongPin):
        TokenSession.open(softhsm_token.slot, "not-the-pin")  # while another session is logged in too
    with pytest.raises(TokenUnavailable, match="no PKCS#11 token"):
        TokenSession.open(TokenSlot(softhsm_token.module, "no-such-token"), softhsm_token.pin)
    with pytest.raises(TokenUnavailable, match="cannot load"):
        TokenSession.open(TokenSlot("/nonexistent/libpkcs11.so", "x"), softhsm_token.pin)


def test_destroyed_or_substituted_keys_are_refused(softhsm_token: SoftHsm) -> None:
    with TokenSession.open(softhsm_token.slot, softhsm_token.pin) as session:
        key = session.generate_ed25519("doomed")
        other = session.generate_ed25519("other")
        # A home whose reference names one key but whose token answers with another: refused.
        swapped = TokenKeyRef(key.ref.slot, other.ref.key_id, "ed25519", "doomed", key.ref.public)
        with pytest.raises(TokenKeyMissing, match="not the one"):
            session.ed25519(swapped)
        assert session.holds(key.ref)
        assert session.destroy(key.ref) == 2  # private and public object
        assert not session.holds(key.ref)
        with pytest.raises(TokenKeyMissing, match="holds no key"):
            session.ed25519(key.ref)


def test_token_aes_gcm_round_trip_and_tamper(softhsm_token: SoftHsm) -> None:
    with TokenSession.open(softhsm_token.slot, softhsm_token.pin) as session:
        key = session.generate_aes256("kms-aes")
        nonce = seeded("nonce", 12)
        sealed = key.encrypt(nonce, b"plaintext", b"aad")
        assert len(sealed) == len(b"plaintext") + 16
        assert key.decrypt(nonce, sealed, b"aad") == b"plaintext"
        assert key.decrypt(nonce, sealed, b"other aad") is None
        assert key.decrypt(nonce, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"aad") is None
        same = session.aes256(key.ref)
        assert same.decrypt(nonce, sealed, b"aad") == b"plaintext"


def test_key_reference_round_trips_and_refuses_garbage() -> None:
    ref = TokenKeyRef(TokenSlot("/lib/x.so", "t"), b"\x01" * 16, "ed25519", "label", b"\x02" * 32)
    assert TokenKeyRef.from_record(ref.to_record()) == ref
    with pytest.raises(KeystoreCorrupt):
        TokenKeyRef.from_record(b"{}")


def test_the_command_line_reads_the_pin_once_and_never_takes_an_empty_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KMSNET_PKCS11_PIN", raising=False)
    monkeypatch.delenv("KMSNET_PKCS11_PIN_FILE", raising=False)
    pin_file = tmp_path / "pin"
    pin_file.write_text("1234\n")
    source = PinSource(pin_file)
    assert source() == "1234"
    pin_file.unlink()
    assert source() == "1234"  # asked once per command, even if the token is opened twice
    with pytest.raises(CliFailure, match="cannot read the PIN file") as unreadable:
        PinSource(pin_file)()
    assert unreadable.value.exit_code == 3
    pin_file.write_text("\n")
    with pytest.raises(CliFailure, match="empty"):
        PinSource(pin_file)()
    monkeypatch.setenv("KMSNET_PKCS11_PIN_FILE", str(tmp_path / "missing"))
    with pytest.raises(TokenError, match="cannot read the PIN file"):
        PinSource()()
    monkeypatch.setenv("KMSNET_PKCS11_PIN_FILE", str(tmp_path / "pin"))
    pin_file.write_text("from-env-file\n")
    assert PinSource()() == "from-env-file"
    assert "from-env-file" not in repr(PinSource())
