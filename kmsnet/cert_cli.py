"""`kmsnet cert show`: this node's own certificate, readable (like `step certificate inspect`) or as
PEM for `openssl` and other tools. Read-only: it opens the keystore and takes no lock, so it works
while `kmsnet receive --follow` or the chat runs on the same home."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from kmsnet.exits import BAD_INPUT, EPILOG, CliFailure
from kmsnet.options import ENVIRONMENT_HELP, Output, StoreOptions, json_option, node_failures, store_options
from node.clock import utcnow
from node.enrol import renewal_time
from node.home import KEYSTORE_FILE, NS_NODE
from node.keystore import Keystore
from protocol import certs

EXAMPLES = """
Examples:

\b
  kmsnet cert show --home alice
  kmsnet cert show --home alice --pem > alice.pem && openssl x509 -in alice.pem -noout -text
  kmsnet cert show --home alice --json
"""


@click.group(epilog=f"{ENVIRONMENT_HELP}\n\n{EPILOG}")
def cert() -> None:
    """This node's certificate."""


@cert.command(epilog=EXAMPLES + "\n" + EPILOG)
@click.option("--pem", is_flag=True, help="Print the certificate as PEM (for openssl and other tools).")
@store_options
@json_option
def show(pem: bool, store: StoreOptions, out: Output) -> None:
    """Show this node's certificate: subject, issuer, serial, validity, key and fingerprints.

    The validity is judged by the local clock only; whether the CA revoked it is what
    `kmsnet status` shows (from the revocation feed).
    """
    path = store.home / KEYSTORE_FILE
    if not path.exists():
        raise CliFailure(f"no node in {store.home} (run `kmsnet node init` first)", BAD_INPUT)
    with node_failures(), store.open_with(lambda p: Keystore.open(path, passphrase=p)) as keystore:
        der, root_der = keystore.get(NS_NODE, "certificate"), keystore.get(NS_NODE, "root")
    if der is None or root_der is None:
        raise CliFailure(f"the keystore in {store.home} holds no node certificate (run `kmsnet node init`)")
    certificate = x509.load_der_x509_certificate(der)
    if pem:
        click.echo(certs.certificate_pem(certificate).decode("ascii"), nl=False)
        return
    record = describe(certificate, certs.load_certificate(root_der), utcnow())
    out.emit(record, _text(record))


def describe(certificate: x509.Certificate, root: x509.Certificate, now: datetime) -> dict[str, object]:
    """The certificate's fields for people and scripts; times in ISO 8601, fingerprints in hex."""
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    status = "not yet valid" if now < start else "expired" if now > end else "valid"
    key = certificate.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)  # Ed25519: 32 bytes
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        usages = [name.replace("_", " ") for name in ("digital_signature", "key_cert_sign") if getattr(usage, name)]
    except x509.ExtensionNotFound:
        usages = []
    return {
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "serial": f"{certificate.serial_number:x}",
        "not_before": _iso(start),
        "not_after": _iso(end),
        "renew_at": _iso(renewal_time(certificate.public_bytes(Encoding.DER))),
        "status": status,
        "left": _span(end - now) if status == "valid" else None,
        "key": f"{certs.key_kind(certificate.public_key()).split(' ', 1)[1].removesuffix(' key')} {key.hex()}",
        "key_usage": usages,
        "fingerprint_sha256": certs.fingerprint(certificate).hex(),
        "ca_fingerprint_sha256": certs.fingerprint(root).hex(),
    }


def _text(record: dict[str, object]) -> str:
    left = f" ({record['left']} left)" if record["left"] else ""
    rows = [
        ("Subject", record["subject"]),
        ("Issuer", record["issuer"]),
        ("Serial", record["serial"]),
        ("Valid from", record["not_before"]),
        ("Valid until", f"{record['not_after']}: {record['status']}{left}"),
        ("Renews at", f"{record['renew_at']} (by itself, at 2/3 of its validity)"),
        ("Public key", record["key"]),
        ("Key usage", ", ".join(record["key_usage"]) or "none"),  # type: ignore[arg-type]
        ("Fingerprint", f"SHA-256 {record['fingerprint_sha256']}"),
        ("CA root", f"SHA-256 {record['ca_fingerprint_sha256']}"),
    ]
    return "\n".join(f"{name + ':':<13}{value}" for name, value in rows)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _span(delta: timedelta) -> str:
    """A duration in the two largest units that matter: `6 days 23 h`, `4 h 10 min`, `50 s`."""
    seconds = int(delta.total_seconds())
    days, hours, minutes = seconds // 86400, seconds % 86400 // 3600, seconds % 3600 // 60
    if days:
        return f"{days} day{'s' if days != 1 else ''} {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min" if minutes else f"{seconds} s"
