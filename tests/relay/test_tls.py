"""wss://: the relay serves a certificate the kmsnet CA issued; `openssl s_client` accepts it with the
CA root, and a node refuses a relay certificate from another CA (and never falls back to ws://)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from node.errors import RelayUnreachable
from protocol import certs
from relay.server import Relay
from tests.support.lab import make_node, next_message, publish_crl, relay_config, running
from tests.support.pki import ALICE, BOB, CA, ROGUE_CA
from tests.support.tls import relay_tls


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
