"""Relays have names, and nodes check them (issue #13 part 1, PROTOCOL.md §16.3): a node answers only
a CHALLENGE naming the relay it dialled, and its answer signs that name and the URL dialled."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from websockets.asyncio.client import connect

from kmsnet import relay_cli
from kmsnet.cli import cli
from node.errors import RelayImpostor
from protocol import certs, wire
from protocol.link import Auth, Challenge, Error, ErrorCode, auth_signed_bytes, canonical_url, relay_name_of
from relay.server import Relay, RelayConfig, check_name
from scenarios.cases.relay_forwarding import ForwardingRelay
from tests.support.lab import make_node, publish_crl, raw_client, recv_frame, relay_config
from tests.support.pki import BOB, CA
from tests.support.tls import relay_tls


def test_a_relay_is_named_host_port_as_dialled() -> None:
    assert relay_name_of("ws://127.0.0.1:8765") == "127.0.0.1:8765"
    assert relay_name_of("wss://Relay.Example.org/") == "relay.example.org:443"
    assert relay_name_of("ws://[::1]:9000/x") == "[::1]:9000"
    assert canonical_url("wss://relay.example.org/path") == "wss://relay.example.org:443"
    with pytest.raises(ValueError):
        relay_name_of("http://127.0.0.1:1")
    # The signed bytes bind the name and the URL, length-prefixed: moving a byte from one to the other
    # changes them.
    assert auth_signed_bytes(bytes(32), "a:1", "ws://a:1") != auth_signed_bytes(bytes(32), "a:1", "wss://a:1")
    assert check_name("127.0.0.1:8765") == "127.0.0.1:8765"
    for bad in ("kmsnet-relay", "Relay:1", "relay.example.org", "a:b"):
        with pytest.raises(ValueError):
            check_name(bad)


async def test_each_relay_is_named_for_its_own_port_and_over_tls_for_its_host(tmp_path: Path) -> None:
    async with Relay(relay_config(CA)) as a, Relay(relay_config(CA)) as b:
        assert a.name == f"127.0.0.1:{a.port}" and b.name == f"127.0.0.1:{b.port}" and a.name != b.name
    tls = relay_tls(CA, tmp_path)
    async with Relay(relay_config(CA, tls=tls, public_host="localhost")) as relay:
        assert relay.name == f"localhost:{relay.port}"
    assert relay_cli._certificate_host(tmp_path / "relay.pem") == "localhost"  # the first DNS name


async def test_a_node_refuses_a_challenge_passed_on_by_the_relay_it_dialled() -> None:
    async with Relay(relay_config(CA)) as honest, ForwardingRelay(honest.url) as forwarder:
        bob = make_node(CA, BOB, forwarder.url, send_timeout=1.0)
        with pytest.raises(RelayImpostor, match="answered as"):
            await bob.start()
        assert forwarder.welcomed == []
        assert not await honest.store.known("bob")  # never logged in there, never published


async def test_an_answer_signed_for_another_relay_is_refused() -> None:
    """Even a node that signs whatever name it is given (an old or careless one) cannot be logged in
    by a forwarder: the answer names the relay it dialled, and the honest relay checks its own."""
    async with Relay(relay_config(CA)) as honest, Relay(relay_config(CA)) as other:
        async with connect(honest.url, compression=None) as ws:
            challenge = wire.decode_link(await ws.recv())  # type: ignore[arg-type]
            assert isinstance(challenge, Challenge) and challenge.relay == honest.name
            signed = auth_signed_bytes(challenge.nonce, other.name, other.url)
            await ws.send(wire.encode_link(Auth(BOB.cert, BOB.identity.sign(signed))))
            error = await recv_frame(ws)
            assert isinstance(error, Error) and error.code == ErrorCode.AUTH_FAILED
        # Its own name over the wrong scheme (wss:// signed, ws:// served) is refused too.
        async with connect(honest.url, compression=None) as ws:
            challenge = wire.decode_link(await ws.recv())  # type: ignore[arg-type]
            assert isinstance(challenge, Challenge)
            signed = auth_signed_bytes(challenge.nonce, honest.name, f"wss://{honest.name}")
            await ws.send(wire.encode_link(Auth(BOB.cert, BOB.identity.sign(signed))))
            error = await recv_frame(ws)
            assert isinstance(error, Error) and error.code == ErrorCode.AUTH_FAILED
        ws, welcome = await raw_client(honest, BOB)  # the right name and URL get in
        assert welcome.name == "bob"
        await ws.close()


async def test_a_node_reaches_a_relay_named_by_its_operator() -> None:
    """A relay named for the address nodes dial (here the same host:port, given explicitly)."""
    async with Relay(relay_config(CA)) as probe:
        port = probe.port
    async with Relay(relay_config(CA, port=port, name=f"127.0.0.1:{port}")) as relay:
        await publish_crl(relay, CA, CA.crl())
        node = make_node(CA, BOB, relay.url)
        await node.start()
        assert node.connected
        await node.stop()


@pytest.fixture
def ca_pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(certs.certificate_pem(CA.root))
    return path


def test_the_relay_command_checks_its_name(ca_pem: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[RelayConfig] = []

    async def serve(config: RelayConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(relay_cli, "_serve", serve)
    result = CliRunner().invoke(cli, ["relay", "--ca-cert", str(ca_pem), "--name", "kmsnet-relay"])
    assert result.exit_code == 1 and "HOST:PORT" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["relay", "--ca-cert", str(ca_pem), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--name" in result.output
    result = CliRunner().invoke(cli, ["relay", "--ca-cert", str(ca_pem), "--host", "0.0.0.0", "--name", "r.example:80"])
    assert result.exit_code == 0, result.output
    assert seen[-1].name == "r.example:80"
    relay_tls(CA, tmp_path)
    tls = ["--tls-cert", str(tmp_path / "relay.pem"), "--tls-key", str(tmp_path / "relay.key")]
    result = CliRunner().invoke(cli, ["relay", "--ca-cert", str(ca_pem), *tls])
    assert result.exit_code == 0, result.output
    assert (seen[-1].name, seen[-1].public_host) == (None, "localhost")
