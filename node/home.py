"""A home's files and what a node keeps in them: the one owner of those names and of provisioning.

- the node's keystore is `HOME/KEYSTORE_FILE`;
- its records are grouped in namespaces (`NS_*`; the peer engine's own come from protocol/peer.py;
  node/node.py's docstring says what each holds), records named by sequence numbers use `seq_name`;
- `provision_node` writes the records of an enrolled node (`node/identity` or `node/identity_token`,
  `node/certificate`, `node/root`, `node/relay`, `node/ca_url`): enrolment, the attack lab and the
  tests all provision through it, so the three agree on what a node reads at start;
- files are made all at once or not at all, never overwritten (`create_keystore`, `write_new_files`).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509

from node.keystore import Argon2Params, Keystore
from node.pkcs11 import TokenIdentityKey
from protocol import certs
from protocol.identity import IdentityKey

# A peer engine's own records (protocol/peer.py names them).
from protocol.peer import NS_ARCHIVE as NS_ARCHIVE
from protocol.peer import NS_PEER as NS_PEER
from protocol.peer import NS_SEEN as NS_SEEN
from protocol.peer import NS_SESSION as NS_SESSION

__all__ = [
    "KEYSTORE_FILE",
    "NS_ARCHIVE",
    "NS_AUDIT",
    "NS_BUNDLE",
    "NS_INBOX",
    "NS_KMS",
    "NS_NODE",
    "NS_OUTBOX",
    "NS_PEER",
    "NS_SEEN",
    "NS_SESSION",
    "create_keystore",
    "identity_records",
    "last_seq",
    "node_records",
    "provision_node",
    "relay_record",
    "remove_database",
    "write_new_files",
]

#: The keystore of a home (a node's, and the keys `kmsnet kms` manages): HOME/keystore.db.
KEYSTORE_FILE = "keystore.db"

NS_NODE = "node"
NS_BUNDLE = "bundle"
NS_OUTBOX = "outbox"
NS_INBOX = "inbox"
#: The KMS's keys, versions and audit key (node/kms.py).
NS_KMS = "kms"
#: The head (last sequence number and hash) of each audit log kept in a keystore (node/audit.py).
NS_AUDIT = "audit"


def last_seq(names: list[str]) -> int:
    """The highest sequence number among records named by 20-digit sequence numbers (0 if none)."""
    return int(names[-1]) if names else 0


def identity_records(identity: IdentityKey) -> dict[str, bytes]:
    """The NS_NODE record that holds `identity`, or, for a key in a PKCS#11 token, says where it is."""
    if isinstance(identity, TokenIdentityKey):
        return {"identity_token": identity.delegated.ref.to_record()}
    return {"identity": identity.private_bytes()}


def relay_record(relays: Sequence[str]) -> bytes:
    """The NS_NODE `relay` record: the relay URLs in fail-over order, one per line (UTF-8)."""
    return "\n".join(relays).encode("utf-8")


def node_records(
    *, root: x509.Certificate, relays: Sequence[str], certificate: bytes | None = None, ca_url: str | None = None
) -> dict[str, bytes]:
    """The NS_NODE records, besides the identity's, of a node under CA `root`: its relays, and its
    certificate (DER) and the CA's URL for renewals when known (enrolment adds the certificate last)."""
    records = {"root": certs.certificate_pem(root), "relay": relay_record(relays)}
    if certificate is not None:
        records["certificate"] = certificate
    if ca_url is not None:
        records["ca_url"] = ca_url.encode("utf-8")
    return records


def provision_node(
    keystore: Keystore,
    identity: IdentityKey,
    *,
    certificate: bytes,
    root: x509.Certificate,
    relays: Sequence[str],
    ca_url: str | None = None,
) -> None:
    """Write what `kmsnet node init` leaves in a keystore for an enrolled node, in one transaction."""
    records = {
        **identity_records(identity),
        **node_records(root=root, relays=relays, certificate=certificate, ca_url=ca_url),
    }
    with keystore.transaction():
        for record, value in records.items():
            keystore.put(NS_NODE, record, value)


def create_keystore(path: Path, *, passphrase: str, argon2: Argon2Params, fill: Callable[[Keystore], None]) -> None:
    """Create a keystore at `path` and `fill` it, all at once or not at all.

    It is built under a temporary name and hard-linked into place, so a failure or a crash
    leaves nothing at `path`, and a file that appeared there meanwhile is kept as it is
    (`FileExistsError`), never opened or overwritten.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.new")
    try:
        with Keystore.open(tmp, passphrase=passphrase, create=True, argon2=argon2) as keystore:
            fill(keystore)
            keystore.scrub()  # everything into the main file: the link below must carry it all
        os.link(tmp, path)
    finally:
        remove_database(tmp)


def remove_database(path: Path) -> None:
    """Delete an SQLite file and its -wal and -shm side files (missing ones are fine)."""
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)


def write_new_files(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write `(path, data, mode)` files that must not exist yet, all or none.

    Each is created with O_EXCL, so an existing file is never overwritten (`FileExistsError`);
    if one write fails, the files written before it are removed.
    """
    written: list[Path] = []
    try:
        for path, data, mode in files:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            written.append(path)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
