"""Helpers and fixtures of tests/relay/test_tls.py that other test modules use too."""

from __future__ import annotations

import ssl
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol import certs
from tests.support.pki import NOW, Ca


def relay_tls(ca: Ca, tmp_path: Path) -> ssl.SSLContext:
    """A TLS server context with a certificate for 127.0.0.1 issued by `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certs.issue_server(
        ca_key=ca.key, ca_cert=ca.root, hostnames=["127.0.0.1", "localhost"], public_key=key.public_key(),
        serial=0x7E1A, not_before=NOW - timedelta(days=1), not_after=NOW + timedelta(days=365),
    )  # fmt: skip
    (tmp_path / "relay.pem").write_bytes(certs.certificate_pem(cert))
    (tmp_path / "relay.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "relay.pem", tmp_path / "relay.key")
    return context
