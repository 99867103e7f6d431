"""A CA's home directory: its two files, the names of what ca.db holds, and the keys read from it.

    HOME/ca.pem   the root certificate (public: what nodes pin, what the relay is given)
    HOME/ca.db    a `node.keystore.Keystore` sealed under the CA passphrase (Argon2id):
        ca/root_key          the Ed25519 root private key (32 raw bytes), or, for a CA made with
        ca/root_token        `--pkcs11`, instead: where the root key is in the PKCS#11 token
                             (`node.pkcs11.TokenKeyRef`: module, token label, key id, public key;
                             never key bytes): the key is generated there and never leaves it
        ca/root              the root certificate (PEM; the copy the CA trusts and serves)
        ca/policy            the lifetimes chosen at `init` (`ca.policy.CaPolicy`), so that every
                             process opening the CA (`serve`, `revoke`) issues alike
        ca/node_identity     the CA *node*'s Ed25519 identity key (32 raw bytes), or, with a token,
        ca/node_token        where that key is in the token
        ca/node_certificate  its certificate for the name "ca" (DER): the CA connects to the
                             relay as this node, the only one the relay takes CRLs from
        ca/crl_number        the number of the newest CRL (decimal ASCII; only ever rises)
        ca/crl               the newest CRL (DER)
        ca/cli_session       the secret of the session `kmsnet ca login` opened (UTF-8)
        admin/<name>         one administrator: role, TOTP secret, replay and throttle state
                             (`ca.admin.AdminRecord`)
        session/<index>      one admin session (`ca.admin.SessionRecord`): SHA-256 of its secret,
                             administrator, role, creation and expiry
        token/<index>        one enrolment token (`ca.issuance.TokenRecord`): its SHA-256 digest,
                             node name, creation, expiry and use times. The token itself is never stored
        issued/<serial>      one issued certificate (16 hex digits; `ca.registry.IssuedCertificate`):
                             kind, name, validity, fingerprint, issue time, the PEM, and revocation
    and, in the same file, the audit log "ca" (`node.audit.AuditLog`): hash-chained and signed
    by the root key, one entry per issuance, revocation, token, CRL, login, admin change and
    refused admin attempt.

The records are JSON (`ca.records`). A token's or session's <index> is the first 16 hex digits of
its secret's SHA-256 (`secret_index`): a lookup key only, the full digest decides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ca.errors import CaExists, CaNotFound
from node.errors import KeystoreCorrupt
from node.home import create_keystore, remove_database, write_new_files
from node.keystore import Argon2Params, Keystore
from node.pkcs11 import Pin, TokenIdentityKey, TokenKeyRef, TokenSession, environment_pin
from protocol.certs import CaKey
from protocol.identity import IdentityKey

__all__ = [
    "AUDIT_LOG",
    "CA_DB",
    "CA_PEM",
    "NS_ADMIN",
    "NS_CA",
    "NS_ISSUED",
    "NS_SESSION",
    "NS_TOKEN",
    "create_home",
    "load_node_identity",
    "load_root_key",
    "require_ca",
    "require_no_ca",
    "secret_index",
]

CA_DB = "ca.db"
CA_PEM = "ca.pem"
#: The audit log's name in ca.db, and the actor of what the CA does by itself (CRLs, its own certificate).
AUDIT_LOG = "ca"

NS_CA = "ca"
NS_TOKEN = "token"  # noqa: S105 - a keystore namespace, not a secret
NS_ISSUED = "issued"
NS_ADMIN = "admin"
NS_SESSION = "session"

#: Hex digits of a secret's digest used as its record name (tokens, sessions).
_INDEX_LEN = 16


def require_no_ca(home: Path | str) -> None:
    """Raise `CaExists` if `home` holds ca.db or ca.pem."""
    for path in (Path(home) / CA_DB, Path(home) / CA_PEM):
        if path.exists():
            raise CaExists(f"{path} exists: a CA lives here already (key files are never overwritten)")


def require_ca(home: Path | str) -> None:
    """Raise `CaNotFound` unless `home` holds a CA's ca.db."""
    if not (Path(home) / CA_DB).exists():
        raise CaNotFound(f"no CA in {home} (run `kmsnet ca init --home {home}` first)")


def create_home(
    home: Path, passphrase: str, *, argon2: Argon2Params, fill: Callable[[Keystore], None], root_pem: bytes
) -> None:
    """Write ca.db (filled by `fill`), then ca.pem; if either fails, whatever was created is removed.

    Raises `CaExists` if ca.db appears meanwhile (it is left as it is).
    """
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    db_path, pem_path = home / CA_DB, home / CA_PEM
    try:
        create_keystore(db_path, passphrase=passphrase, argon2=argon2, fill=fill)
    except FileExistsError as exc:
        raise CaExists(f"{db_path} appeared meanwhile; it was left as it is") from exc
    try:
        write_new_files([(pem_path, root_pem, 0o644)])
    except BaseException:
        remove_database(db_path)  # ours (created just now): a CA without its ca.pem is half made
        raise


def load_root_key(keystore: Keystore, pin: Pin | None) -> tuple[CaKey, TokenSession | None]:
    """The root key: from ca.db, or, for a token-backed CA, a handle on it in the token (logging in
    with `pin`, default KMSNET_PKCS11_PIN_FILE or KMSNET_PKCS11_PIN) and the open token session."""
    ref = keystore.get(NS_CA, "root_token")
    if ref is not None:
        root_ref = TokenKeyRef.from_record(ref)
        token = TokenSession.open(root_ref.slot, pin if pin is not None else environment_pin)
        try:
            return token.ed25519(root_ref), token
        except BaseException:
            token.close()
            raise
    raw = keystore.get(NS_CA, "root_key")
    if raw is None:
        raise KeystoreCorrupt(f"{keystore.path} holds no CA root key")
    try:
        return Ed25519PrivateKey.from_private_bytes(raw), None
    except ValueError as exc:
        raise KeystoreCorrupt(f"{keystore.path} holds an unreadable CA root key") from exc


def load_node_identity(keystore: Keystore, token: TokenSession | None) -> IdentityKey:
    """The CA node's identity key: from ca.db, or in the root's token."""
    if token is not None:
        ref = keystore.get(NS_CA, "node_token")
        if ref is None:
            raise KeystoreCorrupt(f"{keystore.path} holds no CA node identity")
        return TokenIdentityKey(token.ed25519(TokenKeyRef.from_record(ref)))
    raw = keystore.get(NS_CA, "node_identity")
    if raw is None:
        raise KeystoreCorrupt(f"{keystore.path} holds no CA node identity")
    return IdentityKey.from_private_bytes(raw)


def secret_index(secret: str) -> tuple[str, bytes]:
    """(record name, SHA-256) of a token or session secret: the name finds the record, the digest decides."""
    digest = hashlib.sha256(secret.encode("ascii")).digest()
    return digest.hex()[:_INDEX_LEN], digest
