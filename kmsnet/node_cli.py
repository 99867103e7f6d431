"""`kmsnet node ...`: set up this node, renew its certificate, give it a new key.

Parsing and printing only: every decision is node.enrol's.
"""

from __future__ import annotations

import asyncio
import contextlib

import click

from kmsnet.exits import EPILOG
from kmsnet.options import ENVIRONMENT_HELP, Output, StoreOptions, json_option, node_failures, store_options
from kmsnet.pkcs11_options import PinSource, token_options
from kmsnet.writer import exclusive, require_node
from node.enrol import Renewal, enrol_node, rekey_node, relays_of, renew_certificate, set_relays
from node.errors import NodeError
from node.home import KEYSTORE_FILE
from node.keystore import Keystore
from node.node import Node, NodeOptions
from node.pkcs11 import TokenSlot


@click.group(epilog=f"{ENVIRONMENT_HELP}\n\n{EPILOG}")
def node() -> None:
    """This node: enrol it with the CA, renew its certificate, re-key it after a compromise.

    A node lives in HOME (--home or KMSNET_HOME): keystore.db holds its identity key (or,
    made with `init --pkcs11`, where that key is in a PKCS#11 token), its certificate, the CA
    root it pins and its relay, sealed under a passphrase (KMSNET_PASSPHRASE, --passphrase-file
    or a prompt).
    """


@node.command(
    epilog="\b\nExamples:\n"
    "  kmsnet node init alice --home alice --ca http://127.0.0.1:8766 --token TOKEN \\\n"
    "      --relay ws://127.0.0.1:8765 --ca-fingerprint 3f0c...e1\n"
    "  kmsnet node init bob --home bob --ca http://127.0.0.1:8766 --relay ws://127.0.0.1:8765 \\\n"
    '      --token "$(kmsnet ca token --home ca bob)"\n'
    "  kmsnet node init carol --home carol --ca http://127.0.0.1:8766 --relay ws://127.0.0.1:8765 \\\n"
    "      --token TOKEN --pkcs11 /usr/lib/softhsm/libsofthsm2.so --pkcs11-token kmsnet --pin-file carol.pin\n"
    "  kmsnet node init dave --home dave --ca http://127.0.0.1:8766 --token TOKEN \\\n"
    "      --relay ws://10.0.0.1:8765 --relay ws://10.0.0.2:8765     # a cluster: fails over in this order\n\n" + EPILOG
)
@click.argument("name")
@click.option("--ca", "ca_url", required=True, metavar="URL", help="The CA's HTTP API (http://HOST:PORT).")
@click.option(
    "--token",
    required=True,
    help="The one-time enrolment token from `kmsnet ca token NAME` (short-lived and single-use).",
)
@click.option(
    "--relay",
    "relay_urls",
    required=True,
    multiple=True,
    metavar="URL",
    help="The relay this node uses (ws:// or wss://); repeat it for the relays of a cluster, tried in order.",
)
@click.option(
    "--ca-fingerprint",
    metavar="HEX",
    help="SHA-256 fingerprint of the CA root, as `kmsnet ca init` printed it: any other root is refused (exit 4).",
)
@token_options("--pkcs11-token")
@store_options
@json_option
def init(
    name: str,
    ca_url: str,
    token: str,
    relay_urls: tuple[str, ...],
    ca_fingerprint: str | None,
    key_token: TokenSlot | None,
    pin: PinSource,
    store: StoreOptions,
    out: Output,
) -> None:
    """Enrol node NAME with the CA and create its keystore in HOME.

    Fetches the CA root (and refuses it unless its fingerprint is --ca-fingerprint, when
    given), makes a new Ed25519 identity key and prepares the keystore with it in HOME under a
    new passphrase (so a home that cannot be written fails before the token is spent), has the
    CA certify the key with the token, verifies the certificate, and only then puts
    HOME/keystore.db in place. Nothing is left behind if a step fails, except when the CA may
    have certified the key but its answer was lost or could not be stored (exit 3): then run
    the same command again, with the same token and passphrase, and the CA answers with the
    same certificate. A node identity is never overwritten (a keystore that `kmsnet kms` made
    is joined, with its passphrase). Without --ca-fingerprint, compare the printed fingerprint
    with the CA's before trusting this node.

    With --pkcs11 and --pkcs11-token the identity key is generated in that PKCS#11 token and
    never leaves it (its X25519, ML-KEM and ratchet keys stay in the keystore); every later
    command on this node needs the token's PIN (KMSNET_PKCS11_PIN_FILE, KMSNET_PKCS11_PIN or a prompt).

    Once enrolled, the node goes online once to publish its prekeys, so that others can write to
    it at once; if the relay cannot be reached it says so, and the node publishes them the first
    time it connects.
    """
    with exclusive(store):
        passphrase = store.passphrase(confirm=True)
        with node_failures():
            enrolment = enrol_node(
                store.home,
                name,
                ca_url,
                token,
                list(relay_urls),
                passphrase,
                ca_fingerprint=ca_fingerprint,
                argon2=store.argon2,
                key_token=key_token,
                pin=pin if key_token else None,
            )
        introduced = _introduce(store, passphrase, pin)
    if introduced is not None:
        out.warn(
            f"{name} is enrolled, but {introduced}: nobody can write to {name} until it first goes online "
            "(any `kmsnet receive`, `send` or `chat` for this home)"
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
        "pkcs11_token": None if key_token is None else key_token.token,
    }
    out.emit(
        record, f"enrolled {enrolment.name}: certificate valid until {record['not_after']}, in {enrolment.keystore}"
    )


def _introduce(store: StoreOptions, passphrase: str, pin: PinSource) -> str | None:
    """Go online once, so that the relay has this node's prekey bundle and one-time prekeys: others
    can start a session with it before it ever runs another command. None, or why it could not."""
    with node_failures(), Keystore.open(store.home / KEYSTORE_FILE, passphrase=passphrase) as keystore:
        node = Node(keystore, options=NodeOptions(pin=pin))

        async def online_once() -> None:
            await node.start(reconnect=False)  # publishes the bundle before it returns
            await node.stop()

        try:
            asyncio.run(online_once())
        except NodeError as exc:  # enrolled all the same: the first connection publishes them
            return str(exc)
    return None


def _renewal_record(renewal: Renewal) -> dict[str, object]:
    return {
        "name": renewal.name,
        "serial": f"{renewal.serial:x}",
        "previous_serial": f"{renewal.previous_serial:x}",
        "not_after": renewal.not_after.isoformat(),
        "renew_at": renewal.renew_at.isoformat(),
    }


@node.command(
    epilog="\b\nExamples:\n"
    "  kmsnet node renew --home alice\n"
    "  kmsnet node renew --home alice --ca http://127.0.0.1:8766 --json\n\n" + EPILOG
)
@click.option("--ca", "ca_url", metavar="URL", help="The CA's HTTP API (default: the one the node enrolled with).")
@store_options
@json_option
def renew(ca_url: str | None, store: StoreOptions, out: Output) -> None:
    """Renew this node's certificate now (same name, same key).

    Nodes renew by themselves at 2/3 of their certificate's validity; this does it by hand.
    The request is signed by the node's current key; the CA refuses it (exit 4) for a revoked
    or expired certificate: then the node needs a new token (`kmsnet node rekey`).
    """
    require_node(store)
    path = store.home / KEYSTORE_FILE
    with (
        exclusive(store),
        node_failures(),
        store.open_with(lambda p: Keystore.open(path, passphrase=p)) as keystore,
    ):
        renewal = renew_certificate(keystore, ca_url=ca_url)
    record = _renewal_record(renewal)
    out.emit(record, f"renewed {renewal.name}: certificate {record['serial']} valid until {record['not_after']}")


@node.command(
    epilog="\b\nExamples:\n"
    "  kmsnet ca revoke --home ca alice --reason key-compromise     # on the CA, first\n"
    "  kmsnet node rekey alice --home alice --ca http://127.0.0.1:8766 \\\n"
    '      --token "$(kmsnet ca token --home ca alice)"\n\n' + EPILOG
)
@click.argument("name")
@click.option("--ca", "ca_url", required=True, metavar="URL", help="The CA's HTTP API (http://HOST:PORT).")
@click.option("--token", required=True, help="A new one-time enrolment token for NAME (`kmsnet ca token NAME`).")
@store_options
@json_option
def rekey(name: str, ca_url: str, token: str, store: StoreOptions, out: Output) -> None:
    """Give node NAME a new identity key, after a compromise.

    Makes a new Ed25519 identity key, has the CA certify it with a new one-time token (the
    old key proves nothing any more), and replaces the identity and certificate in HOME's
    keystore; sessions are dropped, prekeys are re-signed on the next connection. Peers see an
    "identity changed" event with the new safety number, never a silent switch. Revoke the old
    certificate first (`kmsnet ca revoke NAME --reason key-compromise`). The CA must present the
    root this node pins (exit 4 otherwise).
    """
    require_node(store)
    with exclusive(store), node_failures():
        renewal = rekey_node(store.home, name, ca_url, token, store.passphrase())
    record = _renewal_record(renewal)
    out.emit(record, f"re-keyed {renewal.name}: new key, certificate {record['serial']} until {record['not_after']}")


@node.command(
    epilog="\b\nExamples:\n"
    "  kmsnet node relays --home alice                                  # the relays it uses, in order\n"
    "  kmsnet node relays --home alice --relay ws://10.0.0.1:8765 --relay ws://10.0.0.2:8765\n\n" + EPILOG
)
@click.option(
    "--relay",
    "relay_urls",
    multiple=True,
    metavar="URL",
    help="Use these relays from now on (ws:// or wss://), in this order; without it, print them.",
)
@store_options
@json_option
def relays(relay_urls: tuple[str, ...], store: StoreOptions, out: Output) -> None:
    """Print or change the relays this node uses.

    Several relays sharing one store (docs/CLUSTER.md) serve a node alike: it connects to the
    first, and when it loses a relay it reconnects to the next one, with backoff and jitter, and
    picks up its mailbox there. The change applies from the node's next start.
    """
    require_node(store)
    # Changing them writes the home: only while no other process holds it. Reading needs no lock.
    with (
        exclusive(store) if relay_urls else contextlib.nullcontext(),
        node_failures(),
        Keystore.open(store.home / KEYSTORE_FILE, passphrase=store.passphrase()) as keystore,
    ):
        urls = set_relays(keystore, relay_urls) if relay_urls else relays_of(keystore)
    out.emit({"relays": urls}, "\n".join(urls))
