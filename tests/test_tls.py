"""wss://: the relay serves a certificate the kmsnet CA issued; `openssl s_client` accepts it with the
CA root, and a node refuses a relay certificate from another CA (and never falls back to ws://)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import ALICE, BOB, CA, NOW, ROGUE_CA, Ca
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from lab import make_node, next_message, publish_crl, relay_config, running

from node.errors import RelayUnreachable
from protocol import certs
from relay.server import Relay


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


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_openssl_accepts_the_relay_certificate_with_the_ca_root(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(certs.certificate_pem(CA.root))
    async with Relay(relay_config(CA, tls=relay_tls(CA, tmp_path))) as relay:
        assert relay.url.startswith("wss://")

        def s_client(cafile: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{relay.port}", "-CAfile", str(cafile),
                 "-verify_return_error", "-verify_ip", "127.0.0.1", "-brief"],
                input="", capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip

        good = await asyncio.to_thread(s_client, tmp_path / "ca.pem")
        assert "Verification: OK" in good.stderr + good.stdout, good.stderr
        (tmp_path / "rogue.pem").write_bytes(certs.certificate_pem(ROGUE_CA.root))
        bad = await asyncio.to_thread(s_client, tmp_path / "rogue.pem")
        assert bad.returncode != 0 and "verify error" in (bad.stderr + bad.stdout).lower()


async def test_a_node_chats_over_wss_and_refuses_a_relay_certificate_from_another_ca(tmp_path: Path) -> None:
    async with Relay(relay_config(CA, tls=relay_tls(CA, tmp_path))) as relay:
        await publish_crl(relay, CA, CA.crl())
        alice = make_node(CA, ALICE, relay.url)
        bob = make_node(CA, BOB, relay.url)
        async with running(alice, bob):
            await alice.send("bob", "over TLS")
            assert (await next_message(bob)).text == "over TLS"
    rogue_dir = tmp_path / "rogue"
    rogue_dir.mkdir()
    async with Relay(relay_config(CA, tls=relay_tls(ROGUE_CA, rogue_dir))) as relay:
        alice = make_node(CA, ALICE, relay.url)
        with pytest.raises(RelayUnreachable, match="certificate"):
            await alice.start(reconnect=False)
        # The same relay over plain ws:// is not tried: the URL says wss://, and that is final.
        assert relay.connected() == []
