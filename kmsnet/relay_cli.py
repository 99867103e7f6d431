"""`kmsnet relay`: run the relay until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import click
from cryptography import x509

from kmsnet import logs
from kmsnet.exits import BAD_INPUT, EPILOG, UNREACHABLE, USAGE, CliFailure
from protocol import certs
from protocol.errors import ProtocolError
from relay.backends import is_redis
from relay.errors import RelayError
from relay.router import RESEND_AFTER
from relay.server import Relay, RelayConfig, check_name

#: Listen addresses that name no host a node could dial.
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - recognised, not bound

EXAMPLES = """
Examples:

\b
  kmsnet relay --ca-cert ca/ca.pem                      # ws://127.0.0.1:8765, store relay.db
  kmsnet relay --ca-cert ca/ca.pem --port 0             # any free port (printed on stdout)
  kmsnet relay --ca-cert ca/ca.pem --tls-cert relay.pem --tls-key relay.key   # wss://
  kmsnet relay --ca-cert ca/ca.pem --store redis://127.0.0.1:6379/0   # one of a cluster
"""


@click.command(epilog=EXAMPLES + "\n" + EPILOG)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option(
    "--store",
    default="relay.db",
    show_default=True,
    help="Where envelopes, bundles and the CRL feed are kept: a SQLite file (':memory:' keeps nothing), "
    "or redis://HOST:PORT/DB (rediss:// over TLS) shared by several relays, a Redis Cluster node included "
    "(see docs/CLUSTER.md).",
)
@click.option(
    "--ca-cert",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The kmsnet CA root (ca.pem): nodes must present a certificate it issued.",
)
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Serve wss://.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Key of --tls-cert.")
@click.option(
    "--name",
    help="This relay's name, HOST:PORT as nodes dial it; nodes refuse a relay that gives another name "
    "than the one they dialled. Default: the host (or, with --tls-cert, the certificate's first DNS or IP "
    "name) and the port it listens on. Each relay of a cluster has its own.",
)
@click.option(
    "--rate",
    default=1000.0,
    show_default=True,
    type=click.FloatRange(min=1, min_open=False),
    help="Frames per second each connection may send; more are refused with RATE_LIMITED "
    "(acknowledgements have a budget of their own).",
)
@click.option(
    "--burst",
    default=2000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Frames a connection may send at once above --rate.",
)
@click.option(
    "--resend-after",
    default=RESEND_AFTER,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a delivered envelope waits for the node's acknowledgement before it is sent again on "
    "the same connection (sooner when later ones are acknowledged: it was lost on the way).",
)
def relay(
    host: str,
    port: int,
    store: str,
    ca_cert: Path,
    tls_cert: Path | None,
    tls_key: Path | None,
    name: str | None,
    rate: float,
    burst: int,
    resend_after: float,
) -> None:
    """Run the relay: authenticate nodes, route and store envelopes, relay the CRL feed.

    The relay is untrusted by design: it never sees a key or a plaintext. It prints its URL on
    stdout once it listens, logs to stderr, and stops cleanly on SIGINT or SIGTERM.
    """
    if is_redis(store):
        parts = urlsplit(store)
        if not parts.hostname:
            raise CliFailure(f"--store {store}: a Redis URL needs a host (redis://HOST:PORT/DB)", BAD_INPUT)
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    try:
        root = certs.load_certificate(ca_cert.read_bytes())
        certs.check_root(root)
    except (OSError, ProtocolError) as exc:
        raise CliFailure(f"--ca-cert {ca_cert}: {exc}", BAD_INPUT) from exc
    tls = None
    if tls_cert is not None and tls_key is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            tls.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise CliFailure(f"cannot load the TLS certificate or key: {exc}", BAD_INPUT) from exc
    if name is not None:
        try:
            check_name(name)
        except ValueError as exc:
            raise CliFailure(f"--name: {exc}", BAD_INPUT) from exc
    public_host = _certificate_host(tls_cert) if tls_cert is not None else None
    if name is None and public_host is None and host in _WILDCARDS:
        raise CliFailure(f"--host {host or '(all)'} listens everywhere: give --name HOST:PORT as nodes dial it", USAGE)
    logs.configure()
    config = RelayConfig(
        ca_root=root,
        host=host,
        port=port,
        store_path=store,
        tls=tls,
        name=name,
        public_host=public_host,
        rate=rate,
        burst=burst,
        resend_after=resend_after,
    )
    try:
        asyncio.run(_serve(config))
    except (OSError, RelayError) as exc:
        raise CliFailure(f"relay: {exc}", UNREACHABLE) from exc


def _certificate_host(path: Path) -> str | None:
    """The first DNS (else IP) name of the relay's TLS certificate: the host nodes verify it for."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None
    dns = names.get_values_for_type(x509.DNSName)
    ips = names.get_values_for_type(x509.IPAddress)
    return dns[0].lower() if dns else (str(ips[0]) if ips else None)


async def _serve(config: RelayConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Relay(config) as server:
        click.echo(server.url)
        await stop.wait()
