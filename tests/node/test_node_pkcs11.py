"""A node whose identity key is in a PKCS#11 token (SoftHSM) enrols with a token-backed CA, chats
with a file-backed node, renews and re-keys; its home never holds the identity key."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ca import CertificateAuthority
from ca.http import CaHttpServer
from node.enrol import enrol_node, rekey_node
from node.keystore import ARGON2_TEST, Keystore
from node.node import Node, NodeOptions
from node.pkcs11 import NotExtractable, PinRequired, TokenIdentityKey, TokenKeyRef, TokenSession
from protocol import wire
from protocol.link import PublishCrl
from relay.server import Relay, RelayConfig
from tests.support.ca_cli import PASS as CLI_PASS
from tests.support.ca_cli import fails, ok
from tests.support.ca_helpers import PASS as CA_PASS
from tests.support.ca_helpers import Admin, init_ca
from tests.support.ca_pkcs11 import run
from tests.support.lab import next_event, next_message, raw_client, running
from tests.support.softhsm import SoftHsm

PASS = "pkcs11 node passphrase"


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def keys_in_keystore(path: Path, wanted: bytes) -> list[str]:
    """The records of the unsealed keystore holding an Ed25519 private key whose public key is `wanted`."""
    found = []
    with Keystore.open(path, passphrase=PASS) as keystore:
        for name in keystore.names("node"):
            blob = keystore.get("node", name) or b""
            for i in range(len(blob) - 31):
                if Ed25519PrivateKey.from_private_bytes(blob[i : i + 32]).public_key().public_bytes_raw() == wanted:
                    found.append(name)
                    break
    return found


@pytest.fixture
async def pki(
    tmp_path: Path, softhsm_token: SoftHsm
) -> AsyncIterator[tuple[CertificateAuthority, CaHttpServer, Admin]]:
    """A CA with its root in the token, serving HTTP."""
    secret = init_ca(tmp_path / "ca", token=softhsm_token)
    with CertificateAuthority.open(tmp_path / "ca", CA_PASS, pin=softhsm_token.pin) as authority:
        async with CaHttpServer(authority, port=0) as server:
            yield authority, server, Admin(authority, secret)


async def test_a_token_node_chats_with_a_file_node_renews_and_rekeys(
    pki: tuple[CertificateAuthority, CaHttpServer, Admin], tmp_path: Path, softhsm_token: SoftHsm
) -> None:
    authority, server, admin = pki
    async with Relay(RelayConfig(ca_root=authority.root, port=0, store_path=str(tmp_path / "relay.db"))) as relay:

        class CaNode:  # the CA's own node, its key in the token too
            identity, cert = authority.node_credentials()

        assert isinstance(CaNode.identity, TokenIdentityKey)
        ws, _ = await raw_client(relay, CaNode)  # type: ignore[arg-type]
        await ws.send(wire.encode_link(PublishCrl(authority.current_crl())))

        def enrol(name: str, secret: str, **token: object) -> None:
            enrol_node(tmp_path / name, name, server.url, secret, relay.url, PASS, argon2=ARGON2_TEST, **token)  # type: ignore[arg-type]

        alice_token, bob_token = admin.token("alice").secret, admin.token("bob").secret
        await asyncio.to_thread(enrol, "alice", alice_token, key_token=softhsm_token.slot, pin=softhsm_token.pin)
        await asyncio.to_thread(enrol, "bob", bob_token)
        options = NodeOptions(pin=softhsm_token.pin)
        clock = Clock()
        alice_store = tmp_path / "alice" / "keystore.db"
        alice = Node(Keystore.open(alice_store, passphrase=PASS), options=options, clock=clock)
        bob = Node(Keystore.open(tmp_path / "bob" / "keystore.db", passphrase=PASS))
        assert isinstance(alice.identity, TokenIdentityKey)
        with pytest.raises(NotExtractable):
            alice.identity.private_bytes()
        first_key = alice.identity.public_bytes
        async with running(alice, bob):
            await bob.send("alice", "hello token alice")
            assert (await next_message(alice)).text == "hello token alice"
            await alice.send("bob", "hello file bob")
            assert (await next_message(bob)).text == "hello file bob"
            # Renewal: the CSR is signed in the token.
            clock.offset = timedelta(days=5)
            assert await alice.renew_if_due() is True
            clock.offset = timedelta()
            await alice.wait_connected(10)
            await bob.send("alice", "after renewal")
            assert (await next_message(alice)).text == "after renewal"
            old_number = bob.status()["sessions"][0]["safety_number"]
        # The home holds where the key is, never the key; bob's keystore holds his (the search is real).
        assert keys_in_keystore(alice_store, first_key) == []
        assert keys_in_keystore(tmp_path / "bob" / "keystore.db", bob.identity.public_bytes) == ["identity"]
        alice.identity.close()
        with Keystore.open(alice_store, passphrase=PASS) as keystore:
            assert "identity" not in keystore.names("node")
            old_ref = TokenKeyRef.from_record(keystore.get("node", "identity_token") or b"")
        alice.keystore.close()

        # Without the PIN the node cannot even start.
        with Keystore.open(alice_store, passphrase=PASS) as keystore, pytest.raises(PinRequired):
            Node(keystore, options=NodeOptions(pin=""))

        # Re-key: a new key in the same token; the old one is deleted from it.
        token = admin.token("alice").secret
        pin = softhsm_token.pin
        rekey = functools.partial(rekey_node, tmp_path / "alice", "alice", server.url, token, PASS, pin=pin)
        await asyncio.to_thread(rekey)
        with TokenSession.open(softhsm_token.slot, softhsm_token.pin) as session:
            assert not session.holds(old_ref)
        alice = Node(Keystore.open(alice_store, passphrase=PASS), options=options)
        assert isinstance(alice.identity, TokenIdentityKey) and alice.identity.public_bytes != first_key
        async with running(alice, bob):
            await alice.send("bob", "new key, same token")
            changed = await next_event(bob, "identity_changed")
            assert changed.peer == "alice"
            assert bob.status()["sessions"][0]["safety_number"] != old_number
            assert (await next_message(bob)).text == "new key, same token"
        alice.identity.close()
        alice.keystore.close()
        bob.keystore.close()
        await ws.close()


async def test_node_init_with_a_token_from_the_command_line(
    pki: tuple[CertificateAuthority, CaHttpServer, Admin], tmp_path: Path, softhsm_token: SoftHsm
) -> None:
    _, server, admin = pki
    home = tmp_path / "carol"
    init = ["node", "init", "carol", "--home", str(home), "--ca", server.url, "--relay", "ws://127.0.0.1:8765"]
    hsm = ["--pkcs11", softhsm_token.module, "--pkcs11-token", softhsm_token.token]
    token = ["--token", admin.token("carol").secret]
    fails(await asyncio.to_thread(run, *init, *token, "--pkcs11", softhsm_token.module), 2, "go together")
    fails(await asyncio.to_thread(run, *init, *token, *hsm), 2, "no token PIN")
    enrolled = await asyncio.to_thread(functools.partial(run, *init, *token, *hsm, "--json", pin=softhsm_token.pin))
    record = json.loads(ok(enrolled))
    assert record["pkcs11_token"] == softhsm_token.token
    with Keystore.open(home / "keystore.db", passphrase=CLI_PASS) as keystore:
        identity = Node(keystore, options=NodeOptions(pin=softhsm_token.pin)).identity
        assert isinstance(identity, TokenIdentityKey)
        identity.close()
