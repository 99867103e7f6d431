"""`kmsnet node ...`: set up this node.

Parsing and printing only: every decision is node.enrol's.
"""

from __future__ import annotations

import click

from kmsnet.exits import EPILOG
from kmsnet.options import ENVIRONMENT_HELP, Output, StoreOptions, json_option, node_failures, store_options
from node.enrol import enrol_node


@click.group(epilog=f"{ENVIRONMENT_HELP}\n\n{EPILOG}")
def node() -> None:
    """This node: enrol it with the CA.

    A node lives in HOME (--home or KMSNET_HOME): keystore.db holds its identity key, its
    certificate, the CA root it pins and its relay, sealed under a passphrase
    (KMSNET_PASSPHRASE, --passphrase-file or a prompt).
    """


@node.command(
    epilog="\b\nExamples:\n"
    "  kmsnet node init alice --home alice --ca http://127.0.0.1:8766 --token TOKEN \\\n"
    "      --relay ws://127.0.0.1:8765 --ca-fingerprint 3f0c...e1\n"
    "  kmsnet node init bob --home bob --ca http://127.0.0.1:8766 --relay ws://127.0.0.1:8765 \\\n"
    '      --token "$(kmsnet ca token --home ca bob)"\n\n' + EPILOG
)
@click.argument("name")
@click.option("--ca", "ca_url", required=True, metavar="URL", help="The CA's HTTP API (http://HOST:PORT).")
@click.option(
    "--token",
    required=True,
    help="The one-time enrolment token from `kmsnet ca token NAME` (short-lived and single-use).",
)
@click.option("--relay", "relay_url", required=True, metavar="URL", help="The relay this node uses (ws:// or wss://).")
@click.option(
    "--ca-fingerprint",
    metavar="HEX",
    help="SHA-256 fingerprint of the CA root, as `kmsnet ca init` printed it: any other root is refused (exit 4).",
)
@store_options
@json_option
def init(
    name: str, ca_url: str, token: str, relay_url: str, ca_fingerprint: str | None, store: StoreOptions, out: Output
) -> None:
    """Enrol node NAME with the CA and create its keystore in HOME.

    Fetches the CA root (and refuses it unless its fingerprint is --ca-fingerprint, when
    given), makes a new Ed25519 identity key, has the CA certify it with the token, verifies
    the certificate, and only then writes HOME/keystore.db under a new passphrase. Nothing is
    written if any step fails; a node identity is never overwritten (a keystore that
    `kmsnet kms` made is joined, with its passphrase). Without
    --ca-fingerprint, compare the printed fingerprint with the CA's before trusting this node.
    """
    with node_failures():
        enrolment = enrol_node(
            store.home,
            name,
            ca_url,
            token,
            relay_url,
            store.passphrase(confirm=True),
            ca_fingerprint=ca_fingerprint,
            argon2=store.argon2,
        )
    if not enrolment.fingerprint_checked:
        out.warn(
            f"the CA root was not checked against a fingerprint: make sure it is {enrolment.ca_fingerprint} "
            "(as `kmsnet ca init` printed it)"
        )
    record = {
        "name": enrolment.name,
        "keystore": str(enrolment.keystore),
        "serial": f"{enrolment.serial:x}",
        "not_after": enrolment.not_after.isoformat(),
        "ca_fingerprint": enrolment.ca_fingerprint,
        "fingerprint_checked": enrolment.fingerprint_checked,
    }
    out.emit(
        record, f"enrolled {enrolment.name}: certificate valid until {record['not_after']}, in {enrolment.keystore}"
    )
