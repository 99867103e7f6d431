"""KMS keys in a PKCS#11 token (SoftHSM): AES-256-GCM inside the token, Ed25519 signing there, rotation,
rewrap and destroy; the keystore holds where the keys are, never their bytes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from node.errors import InvalidCiphertext, InvalidRequest, InvalidSignature, KeystoreError
from node.home import NS_KMS
from node.keystore import ARGON2_TEST, Keystore
from node.kms import KeyManagementSystem, KeyState
from node.pkcs11 import PinRequired, TokenKeyRef, TokenSession, WrongPin
from tests.support.kms_cli import fails, ok, run
from tests.support.softhsm import SoftHsm

PASS = "kms pkcs11 passphrase"


def open_kms(home: Path, pin: str | None) -> KeyManagementSystem:
    return KeyManagementSystem(home, PASS, argon2=ARGON2_TEST, pin=pin)


def refs(home: Path, key_id: str) -> list[TokenKeyRef]:
    with Keystore.open(home / "keystore.db", passphrase=PASS) as keystore:
        assert keystore.names(NS_KMS, f"material/{key_id}/") == []  # never any key bytes
        names = keystore.names(NS_KMS, f"token/{key_id}/")
        return [TokenKeyRef.from_record(keystore.get(NS_KMS, name) or b"") for name in names]


def test_token_keys_encrypt_sign_rotate_rewrap_and_destroy(tmp_path: Path, softhsm_token: SoftHsm) -> None:
    home = tmp_path / "kms"
    with open_kms(home, softhsm_token.pin) as kms:
        kms.create_key("vault", "aes256-gcm", token=softhsm_token.slot)
        kms.create_key("signer", "ed25519", token=softhsm_token.slot)
        kms.create_key("local", "aes256-gcm")  # the same keystore keeps file keys too
        with pytest.raises(InvalidRequest, match="stay in the keystore"):
            kms.create_key("rsa", "rsa-3072", token=softhsm_token.slot)
        old = kms.encrypt("vault", b"secret data")
        assert kms.decrypt("vault", old).plaintext == b"secret data"
        body = bytearray(base64.b64decode(old.rsplit(":", 1)[1]))
        body[-1] ^= 1
        with pytest.raises(InvalidCiphertext):
            kms.decrypt("vault", old.rsplit(":", 1)[0] + ":" + base64.b64encode(bytes(body)).decode())
        signature = kms.sign("signer", b"release")
        assert kms.verify("signer", b"release", signature).version == 1
        with pytest.raises(InvalidSignature):
            kms.verify("signer", b"other", signature)
        assert kms.public_key_pem("signer").startswith(b"-----BEGIN PUBLIC KEY-----")
        kms.rotate("vault")
        rewrapped = kms.rewrap("vault", old)
        assert rewrapped.startswith("kmsnet:v1:vault:2:")
        assert kms.decrypt("vault", rewrapped).plaintext == b"secret data"
        assert kms.decrypt("vault", old).plaintext == b"secret data"  # version 1 still opens
    vault = refs(home, "vault")
    assert [r.kind for r in vault] == ["aes256", "aes256"] and len(refs(home, "signer")) == 1

    # Reopened: the same keys, the PIN needed only to use one of them.
    with open_kms(home, "") as kms:
        assert kms.decrypt("local", kms.encrypt("local", b"file key")).plaintext == b"file key"
        with pytest.raises(PinRequired):
            kms.decrypt("vault", rewrapped)
    with open_kms(home, softhsm_token.pin) as kms:
        assert kms.decrypt("vault", rewrapped).plaintext == b"secret data"
        assert kms.destroy("vault").state is KeyState.DESTROYED
    with TokenSession.open(softhsm_token.slot, softhsm_token.pin) as session:
        assert not any(session.holds(ref) for ref in vault)  # destroy deleted the token objects
    assert refs(home, "vault") == []


def test_token_keys_from_the_command_line(tmp_path: Path, softhsm_token: SoftHsm) -> None:
    home = tmp_path / "kms"
    pin = {"KMSNET_PKCS11_PIN": softhsm_token.pin}
    hsm = ["--pkcs11", softhsm_token.module, "--token", softhsm_token.token]
    info = json.loads(ok(run(home, "create", "vault", *hsm, "--json", **pin)))
    assert info["type"] == "aes256-gcm"
    token = ok(run(home, "encrypt", "vault", "hello token", **pin)).strip()
    assert ok(run(home, "decrypt", "vault", token, **pin)) == "hello token"
    fails(run(home, "decrypt", "vault", token), 2, "no token PIN")
    fails(run(home, "decrypt", "vault", token, KMSNET_PKCS11_PIN="wrong"), 1, "refused the PIN")


def test_a_token_key_can_wrap_the_keystore_itself(tmp_path: Path, softhsm_token: SoftHsm) -> None:
    home = tmp_path / "kms"
    with KeyManagementSystem(home, pin=softhsm_token.pin, keystore_token=softhsm_token.slot) as kms:
        kms.create_key("local", "aes256-gcm")  # a keystore key, sealed under a data key only the token unwraps
        sealed = kms.encrypt("local", b"no passphrase anywhere")
    assert Keystore.unlocked_by(home / "keystore.db") == "pkcs11"
    with KeyManagementSystem(home, pin=softhsm_token.pin) as kms:
        assert kms.decrypt("local", sealed).plaintext == b"no passphrase anywhere"
    with pytest.raises(WrongPin):
        KeyManagementSystem(home, pin="wrong")
    with pytest.raises(KeystoreError, match="PKCS#11 token"):
        Keystore.open(home / "keystore.db", passphrase=PASS)


def test_a_keystore_in_a_token_from_the_command_line(tmp_path: Path, softhsm_token: SoftHsm) -> None:
    home = tmp_path / "kms"
    pin = {"KMSNET_PKCS11_PIN": softhsm_token.pin}
    hsm = ["--pkcs11", softhsm_token.module, "--token", softhsm_token.token]
    fails(run(home, "create", "k", "--keystore-in-token", passphrase=None), 2, "needs --pkcs11")
    ok(run(home, "create", "k", *hsm, "--keystore-in-token", passphrase=None, **pin))  # never asks for a passphrase
    sealed = ok(run(home, "encrypt", "k", "hello", passphrase=None, **pin)).strip()
    assert ok(run(home, "decrypt", "k", sealed, passphrase=None, **pin)) == "hello"
    fails(run(home, "create", "k2", *hsm, "--keystore-in-token", passphrase=None, **pin), 1, "exists already")
