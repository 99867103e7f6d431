"""`kmsnet ca ...`: create and run the certificate authority.

Parsing and printing only: every decision is node.ca's.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import click

from kmsnet import logs
from kmsnet.exits import BAD_INPUT, EPILOG, CliFailure
from kmsnet.options import ENVIRONMENT_HELP, Output, StoreOptions, duration, json_option, node_failures, store_options
from node.ca import DEFAULT_PORT, CertificateAuthority
from node.ca import serve as serve_ca
from node.ca.authority import CA_PEM, DEFAULT_TOKEN_TTL, require_ca, require_no_ca, write_new_files
from protocol import certs

_TTL_TEXT = f"{int(DEFAULT_TOKEN_TTL.total_seconds() // 3600)}h"


def _host_port(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    """Click callback: HOST:PORT (an IPv6 host in brackets) -> (host, port)."""
    host, colon, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (port 0..65535; 0 picks a free one)", ctx, param)
    return host, int(port)


def _open(store: StoreOptions) -> CertificateAuthority:
    with node_failures():
        # Before the passphrase prompt: no passphrase can help a home without a CA.
        require_ca(store.home)
        return CertificateAuthority.open(store.home, store.passphrase())


@click.group(epilog=f"{ENVIRONMENT_HELP}\n\n{EPILOG}")
def ca() -> None:
    """The certificate authority: root key, enrolment tokens, node certificates, the CRL feed.

    A CA lives in HOME (--home or KMSNET_HOME): ca.db holds the root key and the CA's state,
    sealed under the CA passphrase (KMSNET_PASSPHRASE, --passphrase-file or a prompt); ca.pem
    is the root certificate, public, which the relay is given and every node pins.
    """


@ca.command(
    epilog="\b\nExamples:\n"
    "  kmsnet ca init --home ~/kmsnet/ca\n"
    "  KMSNET_PASSPHRASE_FILE=ca.pass kmsnet ca init --home ca --json\n\n" + EPILOG
)
@click.option("--name", default="kmsnet-ca", show_default=True, help="Common name of the root certificate.")
@store_options
@json_option
def init(name: str, store: StoreOptions, out: Output) -> None:
    """Create a new CA in HOME.

    Makes an Ed25519 root key and a self-signed root certificate (valid ten years), the CA's
    own node identity for the relay, and an empty CRL state. Refuses a HOME that holds a CA
    already: key files are never overwritten. Prints the root's SHA-256 fingerprint, which
    nodes check with `kmsnet node init --ca-fingerprint`.
    """
    with node_failures():
        require_no_ca(store.home)
        fingerprint = CertificateAuthority.init(
            store.home, store.passphrase(confirm=True), name=name, argon2=store.argon2
        )
    if not out.as_json:
        click.echo(f"CA created in {store.home}; its root is {store.home / CA_PEM}. Root fingerprint:", err=True)
    out.emit({"home": str(store.home), "root": str(store.home / CA_PEM), "fingerprint": fingerprint}, fingerprint)


@ca.command(
    epilog="\b\nExamples:\n"
    "  kmsnet ca serve --home ca\n"
    "  kmsnet ca serve --home ca --http 127.0.0.1:0 --relay ws://127.0.0.1:8765\n\n" + EPILOG
)
@click.option(
    "--http",
    "listen",
    default=f"127.0.0.1:{DEFAULT_PORT}",
    show_default=True,
    callback=_host_port,
    metavar="HOST:PORT",
    help="Where the HTTP API listens (port 0: any free port).",
)
@click.option(
    "--relay",
    "relay_url",
    metavar="URL",
    help="Relay (ws:// or wss://) to publish the CRL to, connecting as node 'ca'.",
)
@store_options
def serve(listen: tuple[str, int], relay_url: str | None, store: StoreOptions) -> None:
    """Run the CA until SIGINT or SIGTERM.

    Serves GET /ca.pem, GET /crl, POST /enroll and GET /healthz over HTTP, and with --relay
    publishes the CRL to the relay's feed on connect and whenever it is re-issued (a new CRL
    every 16 hours, each valid 24 hours). Prints the API's URL on stdout once it listens;
    logs go to stderr.
    """
    with node_failures():
        require_ca(store.home)
        passphrase = store.passphrase()
    logs.configure()
    with node_failures():
        asyncio.run(serve_ca(store.home, passphrase, http=listen, relay_url=relay_url, on_ready=click.echo))


@ca.command(
    epilog="\b\nExamples:\n"
    "  kmsnet ca token --home ca alice\n"
    '  kmsnet node init bob --home bob --token "$(kmsnet ca token --home ca bob --ttl 10m)" ...\n\n' + EPILOG
)
@click.argument("name")
@click.option(
    "--ttl",
    default=_TTL_TEXT,
    show_default=True,
    callback=duration,
    metavar="DURATION",
    help="How long the token stays valid (90s, 30m, 12h, up to 7d).",
)
@store_options
@json_option
def token(name: str, ttl: timedelta, store: StoreOptions, out: Output) -> None:
    """Make a one-time enrolment token for node NAME.

    Prints the token alone on stdout. It enrols NAME once (`kmsnet node init NAME --token ...`)
    before it expires; the CA keeps only its hash. Hand it to the node's operator over a
    channel you trust.
    """
    with _open(store) as authority, node_failures():
        issued = authority.token(name, ttl)
    record: dict[str, object] = {
        "name": issued.name,
        "token": issued.secret,
        "expires_at": issued.expires_at.isoformat(),
    }
    out.emit(record, issued.secret)


@ca.command(
    "relay-cert",
    epilog="\b\nExamples:\n"
    "  kmsnet ca relay-cert --home ca --out-cert relay.pem --out-key relay.key\n"
    "  kmsnet ca relay-cert --home ca --out-cert relay.pem --out-key relay.key --host relay.lab --host 10.0.0.5\n"
    "  kmsnet relay --ca-cert ca/ca.pem --tls-cert relay.pem --tls-key relay.key\n\n" + EPILOG,
)
@click.option("--out-cert", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Certificate file.")
@click.option("--out-key", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Key file (0600).")
@click.option(
    "--host",
    "hosts",
    multiple=True,
    default=("127.0.0.1",),
    show_default=True,
    help="DNS name or IP address the relay is reached at (repeat for several).",
)
@store_options
@json_option
def relay_cert(out_cert: Path, out_key: Path, hosts: tuple[str, ...], store: StoreOptions, out: Output) -> None:
    """Issue the relay's TLS certificate and a new key for it.

    Writes a fresh ECDSA P-256 key to --out-key (mode 0600) and its certificate, signed by
    the CA for the --host names, to --out-cert; the relay serves wss:// with them and nodes
    check them against the root they pin. Existing files are never overwritten.
    """
    if out_cert.resolve() == out_key.resolve():
        raise click.UsageError("--out-cert and --out-key must be different files")
    for path in (out_cert, out_key):
        if path.exists():
            raise CliFailure(f"{path} exists: key and certificate files are never overwritten", BAD_INPUT)
    with _open(store) as authority, node_failures():
        cert, key_pem = authority.issue_relay_credentials(hosts)
        write_new_files([(out_key, key_pem, 0o600), (out_cert, certs.certificate_pem(cert), 0o644)])
    record: dict[str, object] = {
        "certificate": str(out_cert),
        "key": str(out_key),
        "hosts": list(hosts),
        "serial": f"{cert.serial_number:x}",
        "not_after": cert.not_valid_after_utc.isoformat(),
    }
    out.emit(record, f"relay certificate for {', '.join(hosts)} in {out_cert}, its key in {out_key}")
