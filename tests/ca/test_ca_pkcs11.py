"""A CA whose root key is in a PKCS#11 token (SoftHSM): what changes, and what must not.

The openssl interop suite runs on both backends (tests/ca/test_openssl_interop.py); here: the home
holds no private key, the token refuses to hand the key out, PIN handling, clean-up, and the CLI.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ca import CertificateAuthority
from ca.admin import secret_from_uri
from ca.authority import NS_CA
from ca.errors import InvalidRequest
from node.keystore import ARGON2_TEST, Keystore
from node.pkcs11 import PinRequired, TokenKeyRef, TokenSession, WrongPin
from protocol import certs
from tests.support.ca_cli import ROOT, Authenticator, env, fails, ok
from tests.support.ca_helpers import PASS, Admin, csr_pem, init_ca
from tests.support.ca_pkcs11 import run
from tests.support.softhsm import SoftHsm


def private_keys_in(home: Path, passphrase: str, keys: dict[str, Ed25519PublicKey]) -> dict[str, list[str]]:
    """Where in `home` an Ed25519 private key for each of `keys` can be found: every 32-byte window of
    every file, and of every record of ca.db once unsealed (what a thief who also has the passphrase
    reads). Maps each key's name to the places found; [] means the home does not hold it."""
    wanted = {key.public_bytes_raw(): name for name, key in keys.items()}
    found: dict[str, list[str]] = {name: [] for name in keys}

    def scan(blob: bytes, place: str) -> None:
        for i in range(len(blob) - 31):
            public = Ed25519PrivateKey.from_private_bytes(blob[i : i + 32]).public_key().public_bytes_raw()
            if public in wanted:
                found[wanted[public]].append(place)

    for path in sorted(home.iterdir()):
        if path.is_file():
            scan(path.read_bytes(), path.name)
    with Keystore.open(home / "ca.db", passphrase=passphrase) as keystore:
        for name in keystore.names(NS_CA):
            scan(keystore.get(NS_CA, name) or b"", f"ca.db:{NS_CA}/{name}")
    return found


def test_the_home_of_a_token_ca_holds_no_private_key_and_a_file_ca_does(tmp_path: Path, softhsm_token: SoftHsm) -> None:
    init_ca(tmp_path / "file")
    init_ca(tmp_path / "hsm", token=softhsm_token)
    with CertificateAuthority.open(tmp_path / "file", PASS) as file_ca:
        file_keys = {"root": file_ca.root.public_key(), "node": file_ca.node_credentials()[0].public}
    with CertificateAuthority.open(tmp_path / "hsm", PASS, pin=softhsm_token.pin) as hsm_ca:
        hsm_keys = {"root": hsm_ca.root.public_key(), "node": hsm_ca.node_credentials()[0].public}
        assert hsm_ca.key_token == softhsm_token.slot
    # The search finds the file CA's keys in its unsealed ca.db: the comparison is real.
    assert private_keys_in(tmp_path / "file", PASS, file_keys) == {
        "root": ["ca.db:ca/root_key"],
        "node": ["ca.db:ca/node_identity"],
    }
    assert private_keys_in(tmp_path / "hsm", PASS, hsm_keys) == {"root": [], "node": []}


def test_the_token_refuses_to_reveal_the_root_key(tmp_path: Path, softhsm_token: SoftHsm) -> None:
    init_ca(tmp_path / "ca", token=softhsm_token)
    with Keystore.open(tmp_path / "ca" / "ca.db", passphrase=PASS) as keystore:
        ref = TokenKeyRef.from_record(keystore.get(NS_CA, "root_token") or b"")
    with TokenSession.open(softhsm_token.slot, softhsm_token.pin) as session:
        key = session.ed25519(ref)
        private = key._private
        # Sensitive and never extractable: its value cannot be read, nor wrapped out of the token.
        assert private[pkcs11.Attribute.SENSITIVE] and not private[pkcs11.Attribute.EXTRACTABLE]
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            private[pkcs11.Attribute.VALUE]


def test_a_token_ca_needs_its_pin(tmp_path: Path, softhsm_token: SoftHsm) -> None:
    secret = init_ca(tmp_path / "ca", token=softhsm_token)
    with pytest.raises(PinRequired):
        CertificateAuthority.open(tmp_path / "ca", PASS)
    with pytest.raises(WrongPin):
        CertificateAuthority.open(tmp_path / "ca", PASS, pin="wrong pin")
    asked: list[bool] = []

    def pin() -> str:
        asked.append(True)
        return softhsm_token.pin

    with CertificateAuthority.open(tmp_path / "ca", PASS, pin=pin) as authority:
        assert asked == [True]
        admin = Admin(authority, secret)
        cert = certs.load_certificate(authority.enrol(admin.token("alice").secret, csr_pem("alice")))
        assert certs.verify(cert, authority.root, authority.clock()).name == "alice"
        authority.revoke("alice", reason="key-compromise", session=admin.session)
        assert authority.verify_audit(session=admin.session) > 0  # the audit chain is signed in the token too
    # A file CA never asks.
    init_ca(tmp_path / "file")
    with CertificateAuthority.open(tmp_path / "file", PASS, pin=pin):
        assert asked == [True]


def test_a_failed_init_leaves_no_key_in_the_token(tmp_path: Path, softhsm_token: SoftHsm) -> None:
    def root_keys() -> int:
        with TokenSession.open(softhsm_token.slot, softhsm_token.pin) as session:
            found = session._session.get_objects({pkcs11.Attribute.LABEL: "kmsnet-ca-root"})
            return sum(1 for _ in found)

    before = root_keys()
    with pytest.raises(InvalidRequest):
        CertificateAuthority.init(
            tmp_path / "ca", PASS, name="x" * 65, argon2=ARGON2_TEST, token=softhsm_token.slot, pin=softhsm_token.pin
        )
    assert root_keys() == before
    assert not (tmp_path / "ca" / "ca.db").exists()


def test_token_ca_from_the_command_line(tmp_path: Path, softhsm_token: SoftHsm) -> None:
    home = str(tmp_path / "ca")
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm_token.pin + "\n")
    hsm = ["--pkcs11", softhsm_token.module]
    label = ["--token", softhsm_token.token]
    fails(run("ca", "init", "--home", home, *hsm), 2, "go together")
    record = json.loads(ok(run("ca", "init", "--home", home, *hsm, *label, "--pin-file", str(pin_file), "--json")))
    assert record["pkcs11_token"] == softhsm_token.token
    admin = Authenticator(secret_from_uri(record["admin"]["otpauth"]))
    # Every later command needs the PIN: none (no terminal) is a usage error, a wrong one is refused.
    fails(run("ca", "login", "--home", home, "--otp", admin.code()), 2, "no token PIN")
    fails(run("ca", "login", "--home", home, "--otp", admin.code(), pin="wrong"), 1, "refused the PIN")
    ok(run("ca", "login", "--home", home, "--otp", admin.code(), pin=softhsm_token.pin))
    token = ok(run("ca", "token", "--home", home, "alice", pin=softhsm_token.pin)).strip()
    assert len(token) == 22
    # `ca serve` reads the PIN from a file named in the environment; a token node enrols with it,
    # is revoked, and its renewal (a CSR signed in the token) is then refused.
    environment = {**env(), "KMSNET_PKCS11_PIN_FILE": str(pin_file)}
    command = [sys.executable, "-m", "kmsnet", "ca", "serve", "--home", home, "--http", "127.0.0.1:0"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=environment,
        start_new_session=True,
    ) as serve:  # fmt: skip
        try:
            assert serve.stdout is not None
            ready, _, _ = select.select([serve.stdout], [], [], 30)
            assert ready, "ca serve printed no URL"
            url = serve.stdout.readline().strip()
            node = ["--home", str(tmp_path / "alice")]
            enrol = ["node", "init", "alice", *node, "--ca", url, "--relay", "ws://127.0.0.1:8765", "--token", token]
            ok(run(*enrol, *hsm, "--pkcs11-token", softhsm_token.token, pin=softhsm_token.pin))
            ok(run("node", "renew", *node, pin=softhsm_token.pin))
            ok(run("ca", "revoke", "--home", home, "alice", "--reason", "key-compromise", pin=softhsm_token.pin))
            fails(run("node", "renew", *node, pin=softhsm_token.pin), 4, "revoked")
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(timeout=15) == 0
        finally:
            if serve.poll() is None:
                serve.kill()
