"""The seed's `KeyManagementSystem`, on sound primitives, with a key lifecycle and an audit log.

The seed's calls keep working (`generate_symmetric_key`, `encrypt_data_symmetric`, ...), now on
AES-256-GCM, RSA-3072 with OAEP-SHA256 and X25519 with HKDF-SHA256. Around them: versioned keys
with rotation and rewrap (as in Vault's transit engine), key states with a deletion waiting
period (as in AWS KMS), compromised versions, Ed25519 signatures, persistence in the node's
encrypted keystore and a hash-chained audit log of every operation.

Key types
    `aes256-gcm`  AES-256-GCM, 96-bit random nonce per message (bound: 2**32 messages per version)
    `rsa-3072`    RSA-3072 with OAEP (SHA-256, MGF1-SHA-256); at most 318 bytes of plaintext: a longer
                  message raises `MessageTooLong` (encrypt it under an aes256-gcm key instead)
    `ed25519`     Ed25519 signatures over the raw data

Keys in a PKCS#11 token (`create_key(..., token=TokenSlot(module, label))`, `kmsnet kms create
--pkcs11 MODULE --token LABEL`): an aes256-gcm or ed25519 key's versions are then generated in the
token, non-extractable, and used there: AES-256-GCM encryption and decryption run inside the token
(CKM_AES_GCM; the nonce is drawn here, as for keystore keys, and the token format is the same),
Ed25519 signs there (CKM_EDDSA) and verifies here under the public key. The keystore records only
where each version is (`token/<key id>/<version>`). Rotation makes the new version in the same
token; rewrap works unchanged; destroying the key deletes its objects from the token. rsa-3072 keys
stay in the keystore. Using such a key needs the token's PIN (`pin`, default KMSNET_PKCS11_PIN_FILE
or KMSNET_PKCS11_PIN).

Ciphertexts and signatures are ASCII tokens, like Vault's `vault:v2:...`:

    kmsnet:v1:<key id>:<version>:<base64 (standard alphabet, padded) of the body>

with body = nonce || ciphertext || tag (aes256-gcm), the OAEP ciphertext (rsa-3072) or the
64-byte signature (ed25519). Everything before the body (`kmsnet:v1:<key id>:<version>:`) is the
associated data (AES-GCM) or the OAEP label (RSA), so the key id and version cannot be altered.
Key ids match `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`; versions count from 1 and the newest is primary.

Key states and transitions (one table, `TRANSITIONS`; anything not listed raises `KeyStateError`):

    state \\ event     enable    disable   schedule_deletion  cancel_deletion  destroy
    enabled           enabled   disabled  pending_deletion   -                destroyed
    disabled          enabled   disabled  pending_deletion   -                destroyed
    pending_deletion  -         -         -                  disabled         destroyed
    destroyed         -         -         -                  -                -

`schedule_deletion` sets a deletion date 7 to 30 days ahead (default 30); once it has passed, the
key is destroyed the next time it is touched (any operation, `describe` or `list_keys`).
Destroying deletes every version's material from the keystore (overwritten on disk); the key's
metadata stays as a tombstone, so its id is never reused.

Operations allowed per state (`ALLOWED`; anything else raises `KeyStateError`):

    operation                                         enabled  disabled  pending_deletion  destroyed
    encrypt decrypt rewrap sign verify rotate
      public_key                                      yes      -         -                 -
    set_min_decryption_version set_rotation_period    yes      yes       -                 -
    mark_compromised                                  yes      yes       yes               -

Per version, `compromised` is a one-way flag: a compromised primary refuses to encrypt or sign
(`CompromisedVersion`) until the key is rotated; decrypting or verifying under a compromised
version raises `CompromisedVersion` unless the caller passes `allow_compromised=True`, and then
the result and the audit entry say `compromised`. `rewrap` always reads a compromised version,
because moving data off it is what rewrap is for. `min_decryption_version` (1..primary) refuses
older ciphertexts and signatures with `VersionTooOld`. With a `rotation_period`, a key whose
primary is older than the period is rotated before it encrypts, rewraps or signs.

Every operation, allowed or refused, appends an entry to the keystore's audit log `kms` (actor,
action, key id, version, outcome; never material or plaintext), signed by a per-keystore
Ed25519 key kept in the keystore.

`generate_diffie_hellman_keys` and `derive_shared_secret` hold no state: the shared secret is
HKDF-SHA256 (no salt, info `DH_INFO`, 32 bytes) over the X25519 output; an all-zero output (a
low-order public key) raises `WeakPeerKey`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import re
import secrets
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import overload

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from node.audit import AuditLog, AuditValue, Clock
from node.clock import utcnow
from node.errors import (
    CompromisedVersion,
    InvalidCiphertext,
    InvalidRequest,
    InvalidSignature,
    KeyExists,
    KeyMismatch,
    KeyNotFound,
    KeyStateError,
    KeystoreCorrupt,
    KeyTypeError,
    KmsError,
    MessageTooLong,
    VersionNotFound,
    VersionTooOld,
    WeakPeerKey,
    code_of,
)
from node.home import KEYSTORE_FILE, NS_KMS
from node.keystore import ARGON2_INTERACTIVE, NONCE_SIZE, Argon2Params, Keystore, aes_gcm_open, aes_gcm_seal
from node.pkcs11 import Pin, TokenKeyRef, TokenSession, TokenSlot, environment_pin

FORMAT_PREFIX = "kmsnet:v1:"
RSA_KEY_SIZE = 3072
DH_INFO = b"kmsnet/kms/1 x25519-hkdf-sha256 shared secret"
MIN_WAITING_DAYS, MAX_WAITING_DAYS, DEFAULT_WAITING_DAYS = 7, 30, 30

KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TOKEN = re.compile(
    r"kmsnet:v1:(?P<key_id>[A-Za-z0-9][A-Za-z0-9_.-]{0,63}):(?P<version>[1-9][0-9]{0,8}):(?P<body>[A-Za-z0-9+/]*={0,2})"
)
_SHA256_SIZE = 32
#: The key types a PKCS#11 token holds for the KMS (SoftHSM 2.6: AES-GCM and EdDSA inside the token).
TOKEN_KEY_TYPES = frozenset({"aes256-gcm", "ed25519"})
_AUDIT_KEY = "audit-signing-key"


class KeyType(StrEnum):
    """What a key is for; the value is the name used on the command line and in the keystore."""

    AES256_GCM = "aes256-gcm"
    RSA_3072 = "rsa-3072"
    ED25519 = "ed25519"


class KeyState(StrEnum):
    """A key's lifecycle state (module docstring)."""

    ENABLED = "enabled"
    DISABLED = "disabled"
    PENDING_DELETION = "pending_deletion"
    DESTROYED = "destroyed"


class Transition(StrEnum):
    """An event that changes a key's state; the value is also its audit action."""

    ENABLE = "enable"
    DISABLE = "disable"
    SCHEDULE_DELETION = "schedule_deletion"
    CANCEL_DELETION = "cancel_deletion"
    DESTROY = "destroy"


class Operation(StrEnum):
    """An operation that leaves the state as it is; the value is also its audit action."""

    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    REWRAP = "rewrap"
    SIGN = "sign"
    VERIFY = "verify"
    ROTATE = "rotate"
    PUBLIC_KEY = "public_key"
    SET_MIN_DECRYPTION_VERSION = "set_min_decryption_version"
    SET_ROTATION_PERIOD = "set_rotation_period"
    MARK_COMPROMISED = "mark_compromised"


_E, _D, _P, _X = KeyState.ENABLED, KeyState.DISABLED, KeyState.PENDING_DELETION, KeyState.DESTROYED

TRANSITIONS: Mapping[tuple[KeyState, Transition], KeyState] = {
    (_E, Transition.ENABLE): _E,
    (_D, Transition.ENABLE): _E,
    (_E, Transition.DISABLE): _D,
    (_D, Transition.DISABLE): _D,
    (_E, Transition.SCHEDULE_DELETION): _P,
    (_D, Transition.SCHEDULE_DELETION): _P,
    (_P, Transition.CANCEL_DELETION): _D,
    (_E, Transition.DESTROY): _X,
    (_D, Transition.DESTROY): _X,
    (_P, Transition.DESTROY): _X,
}

_USABLE = frozenset({_E})
_NOT_DELETING = frozenset({_E, _D})
_NOT_DESTROYED = frozenset({_E, _D, _P})
ALLOWED: Mapping[Operation, frozenset[KeyState]] = {
    Operation.ENCRYPT: _USABLE,
    Operation.DECRYPT: _USABLE,
    Operation.REWRAP: _USABLE,
    Operation.SIGN: _USABLE,
    Operation.VERIFY: _USABLE,
    Operation.ROTATE: _USABLE,
    Operation.PUBLIC_KEY: _USABLE,
    Operation.SET_MIN_DECRYPTION_VERSION: _NOT_DELETING,
    Operation.SET_ROTATION_PERIOD: _NOT_DELETING,
    Operation.MARK_COMPROMISED: _NOT_DESTROYED,
}

_ENCRYPTING = frozenset({KeyType.AES256_GCM, KeyType.RSA_3072})
_ANY_TYPE = frozenset(KeyType)
KEY_TYPES_FOR: Mapping[Operation, frozenset[KeyType]] = {
    Operation.ENCRYPT: _ENCRYPTING,
    Operation.DECRYPT: _ENCRYPTING,
    Operation.REWRAP: _ENCRYPTING,
    Operation.SIGN: frozenset({KeyType.ED25519}),
    Operation.VERIFY: frozenset({KeyType.ED25519}),
    Operation.PUBLIC_KEY: frozenset({KeyType.RSA_3072, KeyType.ED25519}),
    Operation.ROTATE: _ANY_TYPE,
    Operation.SET_MIN_DECRYPTION_VERSION: _ANY_TYPE,
    Operation.SET_ROTATION_PERIOD: _ANY_TYPE,
    Operation.MARK_COMPROMISED: _ANY_TYPE,
}


class CompromisedVersionWarning(UserWarning):
    """Issued by the seed's decrypt calls when they read data under a compromised version."""


# --- values ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyVersion:
    """One version of a key (its material stays in the keystore)."""

    version: int
    created_at: datetime
    compromised: bool = False


@dataclass(frozen=True)
class KeyInfo:
    """A key's metadata: never its material."""

    key_id: str
    key_type: KeyType
    state: KeyState
    created_at: datetime
    versions: tuple[KeyVersion, ...]
    min_decryption_version: int = 1
    rotation_period: timedelta | None = None
    deletion_date: datetime | None = None

    @property
    def primary_version(self) -> int:
        """The version new ciphertexts and signatures use: the newest."""
        return self.versions[-1].version

    def version(self, number: int) -> KeyVersion:
        """The given version, or `VersionNotFound`."""
        if not 1 <= number <= len(self.versions):
            raise VersionNotFound(f"key {self.key_id!r} has no version {number} (versions 1..{len(self.versions)})")
        return self.versions[number - 1]

    def to_json(self) -> dict[str, object]:
        """A JSON-ready summary (the command line's `--json`)."""
        return {
            "key": self.key_id,
            "type": self.key_type.value,
            "state": self.state.value,
            "primary_version": self.primary_version,
            "versions": len(self.versions),
            "min_decryption_version": self.min_decryption_version,
            "compromised_versions": [v.version for v in self.versions if v.compromised],
            "created_at": self.created_at.isoformat(),
            "rotation_period_seconds": _seconds(self.rotation_period),
            "deletion_date": self.deletion_date.isoformat() if self.deletion_date else None,
        }


@dataclass(frozen=True)
class Decrypted:
    """What `decrypt` returns: the plaintext and which version opened it."""

    plaintext: bytes = field(repr=False)
    key_id: str
    version: int
    compromised: bool


@dataclass(frozen=True)
class Verified:
    """What `verify` returns when the signature is good."""

    key_id: str
    version: int
    compromised: bool


# --- primitives -----------------------------------------------------------------------------------


def rsa_oaep_max_message(key_size: int) -> int:
    """The longest plaintext RSA-OAEP with SHA-256 carries: k - 2*32 - 2 bytes (318 for RSA-3072)."""
    return key_size // 8 - 2 * _SHA256_SIZE - 2


def _oaep(label: bytes) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=label or None)


def rsa_oaep_encrypt(public_key: rsa.RSAPublicKey, plaintext: bytes, label: bytes) -> bytes:
    """RSA-OAEP (SHA-256, MGF1-SHA-256) with `label`, for any key size; `MessageTooLong` past the limit."""
    limit = rsa_oaep_max_message(public_key.key_size)
    if len(plaintext) > limit:
        raise MessageTooLong(
            f"RSA-{public_key.key_size} OAEP-SHA256 carries at most {limit} bytes, got {len(plaintext)}; "
            "encrypt longer data under an aes256-gcm key"
        )
    return public_key.encrypt(plaintext, _oaep(label))


def rsa_oaep_decrypt(private_key: rsa.RSAPrivateKey, ciphertext: bytes, label: bytes) -> bytes:
    """Undo `rsa_oaep_encrypt`; any malformed or unauthentic input raises `InvalidCiphertext`."""
    if len(ciphertext) != (private_key.key_size + 7) // 8:
        raise InvalidCiphertext("RSA ciphertext has the wrong length")
    try:
        return private_key.decrypt(ciphertext, _oaep(label))
    except ValueError:
        raise InvalidCiphertext("RSA-OAEP decryption failed") from None


def x25519_shared_secret(private_key: X25519PrivateKey | bytes, public_key: X25519PublicKey | bytes) -> bytes:
    """HKDF-SHA256(X25519(private, public), salt none, info `DH_INFO`) -> 32 bytes; `WeakPeerKey` on all zeros."""
    try:
        if not isinstance(private_key, X25519PrivateKey):
            private_key = X25519PrivateKey.from_private_bytes(private_key)
        if not isinstance(public_key, X25519PublicKey):
            public_key = X25519PublicKey.from_public_bytes(public_key)
    except ValueError as exc:
        raise InvalidRequest("X25519 keys are 32 bytes") from exc
    try:
        shared = private_key.exchange(public_key)
    except ValueError:
        # OpenSSL refuses the all-zero result itself; the check below holds if it ever stops.
        raise WeakPeerKey("X25519 with this public key gives the all-zero secret (low-order point)") from None
    if hmac.compare_digest(shared, bytes(len(shared))):
        raise WeakPeerKey("X25519 with this public key gives the all-zero secret (low-order point)")
    return HKDF(hashes.SHA256(), 32, salt=None, info=DH_INFO).derive(shared)


def _new_material(key_type: KeyType) -> bytes:
    if key_type is KeyType.AES256_GCM:
        return secrets.token_bytes(32)
    if key_type is KeyType.RSA_3072:
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)
        return private.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    return Ed25519PrivateKey.generate().private_bytes_raw()


def _rsa_private(material: bytes) -> rsa.RSAPrivateKey:
    # The material comes from an authenticated keystore record that we wrote: re-validating the
    # RSA key on every load would only cost time (about 0.1 s per operation).
    key = serialization.load_der_private_key(material, password=None, unsafe_skip_rsa_key_validation=True)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeystoreCorrupt("an rsa-3072 key's material is not an RSA key")
    return key


def _token_header(key_id: str, version: int) -> str:
    return f"{FORMAT_PREFIX}{key_id}:{version}:"


def _parse_token(token: str | bytes, error: type[KmsError]) -> tuple[str, int, str, bytes]:
    """Split a ciphertext or signature token into (key id, version, header, body); `error` if malformed."""
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise error("not a kmsnet token (non-ASCII bytes)") from None
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise error("not a kmsnet token (expected kmsnet:v1:<key id>:<version>:<base64>)")
    try:
        body = base64.b64decode(match["body"], validate=True)
    except binascii.Error:
        raise error("token body is not valid base64") from None
    return match["key_id"], int(match["version"]), token[: match.start("body")], body


def _seconds(period: timedelta | None) -> int | None:
    return None if period is None else int(period.total_seconds())


def _check_key_id(key_id: str) -> None:
    if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
        raise InvalidRequest(f"bad key id {key_id!r}: use 1-64 of A-Z a-z 0-9 _ . - (starting with a letter or digit)")


def _check_period(period: timedelta | None) -> None:
    if period is not None and period.total_seconds() < 1:
        raise InvalidRequest("a rotation period must be at least one second")


def _dump_info(info: KeyInfo) -> bytes:
    return json.dumps(
        {
            "key_id": info.key_id,
            "key_type": info.key_type.value,
            "state": info.state.value,
            "created_at": info.created_at.isoformat(),
            "versions": [[v.version, v.created_at.isoformat(), v.compromised] for v in info.versions],
            "min_decryption_version": info.min_decryption_version,
            "rotation_period": _seconds(info.rotation_period),
            "deletion_date": info.deletion_date.isoformat() if info.deletion_date else None,
        },
        sort_keys=True,
    ).encode()


def _load_info(raw: bytes) -> KeyInfo:
    try:
        data = json.loads(raw)
        return KeyInfo(
            key_id=data["key_id"],
            key_type=KeyType(data["key_type"]),
            state=KeyState(data["state"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            versions=tuple(KeyVersion(n, datetime.fromisoformat(at), bool(c)) for n, at, c in data["versions"]),
            min_decryption_version=int(data["min_decryption_version"]),
            rotation_period=None if data["rotation_period"] is None else timedelta(seconds=data["rotation_period"]),
            deletion_date=datetime.fromisoformat(data["deletion_date"]) if data["deletion_date"] else None,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise KeystoreCorrupt("a KMS key record is unreadable") from exc


def _to_bytes(data: str | bytes) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, bytes):
        return data
    raise TypeError("the data must be text or bytes")  # a programming error: the CLI always passes one


def _like(result: bytes, template: str | bytes) -> str | bytes:
    """Return `result` as str when the caller passed a str (the seed passes and prints strings)."""
    if isinstance(template, bytes):
        return result
    try:
        return result.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the plaintext is binary: pass the ciphertext as bytes to get bytes back") from None


# --- the KMS --------------------------------------------------------------------------------------


class KeyManagementSystem:
    """Named, versioned keys with a lifecycle; the seed's calls plus rotation, rewrap, states and signing.

    `KeyManagementSystem()` keeps everything in memory (the seed's behaviour). With `home`, keys
    persist in `<home>/keystore.db`, sealed under `passphrase` (Argon2id, cost `argon2` when the
    file is created) or a 32-byte `key_file`; `create=False` refuses to create a missing
    keystore. `clock` is read for key dates, deletion dates, rotation periods and audit times;
    `actor` names who acts in the audit log. `pin` unlocks the PKCS#11 token of keys kept in one
    (asked for only when such a key is used; default: from the environment). Without passphrase
    and key file, the keystore is one whose data key a token key wraps: `keystore_token` says in
    which token to make that key when the keystore is created, and `pin` unlocks it.
    """

    def __init__(
        self,
        home: Path | str | None = None,
        passphrase: str | None = None,
        *,
        key_file: Path | None = None,
        create: bool = True,
        clock: Clock = utcnow,
        actor: str = "local",
        argon2: Argon2Params = ARGON2_INTERACTIVE,
        pin: Pin | None = None,
        keystore_token: TokenSlot | None = None,
    ) -> None:
        self._pin: Pin = pin if pin is not None else environment_pin
        self._tokens: dict[TokenSlot, TokenSession] = {}
        if home is None:
            if passphrase is not None or key_file is not None or keystore_token is not None:
                raise InvalidRequest("a passphrase, key file or token needs a home to persist to")
            self._store = Keystore.memory()
        else:
            home = Path(home).expanduser()
            if create:
                home.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Neither passphrase nor key file: the keystore's data key is wrapped by a token key.
            by_token = passphrase is None and key_file is None
            self._store = Keystore.open(
                home / KEYSTORE_FILE,
                passphrase=passphrase,
                key_file=key_file,
                create=create,
                argon2=argon2,
                pin=self._pin if by_token else None,
                token=keystore_token,
            )
        self._clock = clock
        self._actor = actor
        try:
            self._audit = AuditLog(self._store, name="kms", signer=self._audit_signer(), clock=clock)
        except BaseException:
            self._store.close()
            raise

    def _audit_signer(self) -> Ed25519PrivateKey:
        raw = self._store.get(NS_KMS, _AUDIT_KEY)
        if raw is None:
            signer = Ed25519PrivateKey.generate()
            self._store.put(NS_KMS, _AUDIT_KEY, signer.private_bytes_raw())
            return signer
        return Ed25519PrivateKey.from_private_bytes(raw)

    @property
    def audit(self) -> AuditLog:
        """The audit log of this keystore's key operations."""
        return self._audit

    def close(self) -> None:
        """Close the keystore (and the token sessions)."""
        for session in self._tokens.values():
            session.close()
        self._tokens.clear()
        self._store.close()

    def __enter__(self) -> KeyManagementSystem:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<KeyManagementSystem {self._store.path or ':memory:'}>"

    # -- lifecycle -------------------------------------------------------------------------------

    def create_key(
        self,
        key_id: str,
        key_type: KeyType | str = KeyType.AES256_GCM,
        *,
        rotation_period: timedelta | None = None,
        token: TokenSlot | None = None,
    ) -> KeyInfo:
        """Create key `key_id` with version 1, enabled; `KeyExists` if the id was ever used.

        With `token`, its versions are generated and used in that PKCS#11 token (module docstring).
        """
        _check_key_id(key_id)
        _check_period(rotation_period)
        try:
            kind = KeyType(key_type)
        except ValueError:
            raise InvalidRequest(f"unknown key type {key_type!r} (one of {', '.join(KeyType)})") from None
        if token is not None and kind not in TOKEN_KEY_TYPES:
            held = ", ".join(sorted(TOKEN_KEY_TYPES))
            raise InvalidRequest(f"{kind} keys stay in the keystore: a PKCS#11 token holds {held} keys")
        with self._operation("create", key_id) as audit:
            if self._find(key_id) is not None:
                raise KeyExists(f"key {key_id!r} exists")
            now = self._now()
            info = KeyInfo(key_id, kind, KeyState.ENABLED, now, (KeyVersion(1, now),), rotation_period=rotation_period)
            self._new_version(key_id, 1, kind, token)
            self._save(info)
            audit.update(version=1, key_type=kind.value, token=None if token is None else token.token)
        return info

    def describe(self, key_id: str) -> KeyInfo:
        """The key's metadata (after destroying it if its deletion date has passed)."""
        _check_key_id(key_id)
        self._destroy_if_due(key_id)
        return self._load(key_id)

    def list_keys(self) -> list[KeyInfo]:
        """Every key's metadata, destroyed ones included, sorted by id."""
        ids = [name.removeprefix("key/") for name in self._store.names(NS_KMS, "key/")]
        for key_id in ids:
            self._destroy_if_due(key_id)
        return [self._load(key_id) for key_id in ids]

    def rotate(self, key_id: str) -> KeyInfo:
        """Add a version and make it primary; older versions still decrypt and verify."""
        with self._operation(Operation.ROTATE, key_id) as audit:
            info = self._add_version(self._usable(key_id, Operation.ROTATE))
            audit["version"] = info.primary_version
        return info

    def set_min_decryption_version(self, key_id: str, version: int) -> KeyInfo:
        """Refuse ciphertexts and signatures older than `version` (1..primary) from now on."""
        with self._operation(Operation.SET_MIN_DECRYPTION_VERSION, key_id) as audit:
            audit["version"] = version
            info = self._usable(key_id, Operation.SET_MIN_DECRYPTION_VERSION)
            info.version(version)
            info = replace(info, min_decryption_version=version)
            self._save(info)
        return info

    def set_rotation_period(self, key_id: str, period: timedelta | None) -> KeyInfo:
        """Rotate automatically once the primary is older than `period` (None turns it off)."""
        _check_period(period)
        with self._operation(Operation.SET_ROTATION_PERIOD, key_id) as audit:
            audit["rotation_period_seconds"] = _seconds(period)
            info = replace(self._usable(key_id, Operation.SET_ROTATION_PERIOD), rotation_period=period)
            self._save(info)
        return info

    def mark_compromised(self, key_id: str, version: int) -> KeyInfo:
        """Flag a version compromised, for good (module docstring); rotate if it is the primary."""
        with self._operation(Operation.MARK_COMPROMISED, key_id) as audit:
            audit["version"] = version
            info = self._usable(key_id, Operation.MARK_COMPROMISED)
            flagged = replace(info.version(version), compromised=True)
            info = replace(info, versions=tuple(flagged if v.version == version else v for v in info.versions))
            self._save(info)
        return info

    def enable(self, key_id: str) -> KeyInfo:
        """disabled -> enabled (enabled stays enabled)."""
        return self._transition(key_id, Transition.ENABLE)

    def disable(self, key_id: str) -> KeyInfo:
        """enabled -> disabled: no cryptographic use until enabled again."""
        return self._transition(key_id, Transition.DISABLE)

    def schedule_deletion(self, key_id: str, waiting_days: int = DEFAULT_WAITING_DAYS) -> KeyInfo:
        """enabled or disabled -> pending_deletion; destroyed `waiting_days` (7..30) from now unless cancelled."""
        if not MIN_WAITING_DAYS <= waiting_days <= MAX_WAITING_DAYS:
            raise InvalidRequest(f"the waiting period is {MIN_WAITING_DAYS} to {MAX_WAITING_DAYS} days")
        return self._transition(
            key_id, Transition.SCHEDULE_DELETION, deletion_date=self._now() + timedelta(days=waiting_days)
        )

    def cancel_deletion(self, key_id: str) -> KeyInfo:
        """pending_deletion -> disabled (as in AWS KMS: enable it explicitly afterwards)."""
        return self._transition(key_id, Transition.CANCEL_DELETION)

    def destroy(self, key_id: str) -> KeyInfo:
        """Destroy now: every version's material is deleted and overwritten; only the tombstone stays."""
        return self._transition(key_id, Transition.DESTROY)

    # -- cryptographic operations ----------------------------------------------------------------

    def encrypt(self, key_id: str, plaintext: bytes) -> str:
        """Encrypt under the primary version (aes256-gcm or rsa-3072); return a `kmsnet:v1:...` token."""
        return self._encrypt(key_id, _to_bytes(plaintext), KEY_TYPES_FOR[Operation.ENCRYPT])

    def decrypt(self, key_id: str, ciphertext: str | bytes, *, allow_compromised: bool = False) -> Decrypted:
        """Decrypt a token made by `encrypt` or `rewrap` under any version from `min_decryption_version` on."""
        return self._decrypt(key_id, ciphertext, KEY_TYPES_FOR[Operation.DECRYPT], allow_compromised)

    def rewrap(self, key_id: str, ciphertext: str | bytes) -> str:
        """Re-encrypt a token under the primary version; the plaintext never reaches the caller."""
        with self._operation(Operation.REWRAP, key_id) as audit:
            info = self._usable(key_id, Operation.REWRAP)
            version, header, body = self._resolve(info, ciphertext, InvalidCiphertext, audit, allow_compromised=True)
            plaintext = self._open(info, version, header, body)
            audit["from_version"] = audit.pop("version")
            return self._seal(self._rotate_if_due(info), plaintext, audit)

    def sign(self, key_id: str, data: bytes) -> str:
        """Sign `data` (Ed25519) with the primary version; return a `kmsnet:v1:...` signature token."""
        with self._operation(Operation.SIGN, key_id) as audit:
            info = self._rotate_if_due(self._usable(key_id, Operation.SIGN))
            version = self._primary_for_use(info, audit)
            ref = self._token_ref(key_id, version)
            if ref is not None:
                signature = self._token(ref.slot).ed25519(ref).sign(_to_bytes(data))
            else:
                signature = Ed25519PrivateKey.from_private_bytes(self._material(key_id, version)).sign(_to_bytes(data))
            return _token_header(key_id, version) + base64.b64encode(signature).decode("ascii")

    def verify(self, key_id: str, data: bytes, signature: str | bytes, *, allow_compromised: bool = False) -> Verified:
        """Check a signature token over `data`; `InvalidSignature` unless it verifies."""
        with self._operation(Operation.VERIFY, key_id) as audit:
            info = self._usable(key_id, Operation.VERIFY)
            version, _, body = self._resolve(info, signature, InvalidSignature, audit, allow_compromised)
            try:
                self._ed25519_public(key_id, version).verify(body, _to_bytes(data))
            except _CryptoInvalidSignature:
                raise InvalidSignature(f"signature does not verify under version {version} of {key_id!r}") from None
            return Verified(key_id, version, info.version(version).compromised)

    def public_key_pem(self, key_id: str, version: int | None = None) -> bytes:
        """The public key of an rsa-3072 or ed25519 key's version (default primary), as PEM."""
        with self._operation(Operation.PUBLIC_KEY, key_id) as audit:
            info = self._usable(key_id, Operation.PUBLIC_KEY)
            number = audit["version"] = version or info.primary_version
            public: rsa.RSAPublicKey | Ed25519PublicKey
            if info.key_type is KeyType.RSA_3072:
                public = _rsa_private(self._material(key_id, info.version(number).version)).public_key()
            else:
                public = self._ed25519_public(key_id, info.version(number).version)
            return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    # -- the seed's calls ------------------------------------------------------------------------

    def generate_symmetric_key(self, name: str) -> KeyInfo:
        """Seed call: create an aes256-gcm key."""
        return self.create_key(name, KeyType.AES256_GCM)

    def generate_asymmetric_key_pair(self, name: str) -> KeyInfo:
        """Seed call: create an rsa-3072 (OAEP-SHA256) key pair."""
        return self.create_key(name, KeyType.RSA_3072)

    @overload
    def encrypt_data_symmetric(self, name: str, data: str) -> str: ...
    @overload
    def encrypt_data_symmetric(self, name: str, data: bytes) -> bytes: ...
    def encrypt_data_symmetric(self, name: str, data: str | bytes) -> str | bytes:
        """Seed call: AES-256-GCM under an aes256-gcm key; the token comes back as str or bytes, like `data`."""
        token = self._encrypt(name, _to_bytes(data), frozenset({KeyType.AES256_GCM}))
        return token if isinstance(data, str) else token.encode("ascii")

    @overload
    def decrypt_data_symmetric(self, name: str, encrypted: str) -> str: ...
    @overload
    def decrypt_data_symmetric(self, name: str, encrypted: bytes) -> bytes: ...
    def decrypt_data_symmetric(self, name: str, encrypted: str | bytes) -> str | bytes:
        """Seed call: the plaintext, as str for a str token and bytes for a bytes token."""
        return self._seed_decrypt(name, encrypted, KeyType.AES256_GCM)

    @overload
    def encrypt_asymmetric(self, name: str, message: str) -> str: ...
    @overload
    def encrypt_asymmetric(self, name: str, message: bytes) -> bytes: ...
    def encrypt_asymmetric(self, name: str, message: str | bytes) -> str | bytes:
        """Seed call: RSA-OAEP-SHA256 under an rsa-3072 key (at most 318 bytes, else `MessageTooLong`)."""
        token = self._encrypt(name, _to_bytes(message), frozenset({KeyType.RSA_3072}))
        return token if isinstance(message, str) else token.encode("ascii")

    @overload
    def decrypt_asymmetric(self, name: str, encrypted: str) -> str: ...
    @overload
    def decrypt_asymmetric(self, name: str, encrypted: bytes) -> bytes: ...
    def decrypt_asymmetric(self, name: str, encrypted: str | bytes) -> str | bytes:
        """Seed call: the plaintext, as str for a str token and bytes for a bytes token."""
        return self._seed_decrypt(name, encrypted, KeyType.RSA_3072)

    def generate_diffie_hellman_keys(self) -> tuple[X25519PrivateKey, X25519PublicKey]:
        """Seed call: a fresh X25519 key pair (private, public); nothing is stored."""
        with self._operation("dh_generate", None):
            private = X25519PrivateKey.generate()
        return private, private.public_key()

    def derive_shared_secret(self, private_key: X25519PrivateKey | bytes, public_key: X25519PublicKey | bytes) -> bytes:
        """Seed call: the 32-byte shared secret (`x25519_shared_secret`); both sides derive the same."""
        with self._operation("dh_derive", None):
            return x25519_shared_secret(private_key, public_key)

    # -- internals -------------------------------------------------------------------------------

    def _now(self) -> datetime:
        return self._clock()

    @contextlib.contextmanager
    def _operation(
        self, action: str, key_id: str | None, *, actor: str | None = None, check_due: bool = True
    ) -> Iterator[dict[str, AuditValue]]:
        """Run one operation in a transaction and audit it: ok with its writes, or refused without them.

        The body fills the yielded dict with audit fields (version, ...). A refused operation's
        writes are rolled back and its audit entry is written on its own. A key whose deletion
        date has passed is destroyed first (`check_due`), so the operation sees it destroyed.
        """
        actor = actor or self._actor
        fields: dict[str, AuditValue] = {}
        if key_id is not None:
            _check_key_id(key_id)
            fields["key_id"] = key_id
            if check_due:
                self._destroy_if_due(key_id)
        try:
            with self._store.transaction():
                yield fields
                self._audit.append(actor, str(action), {**fields, "outcome": "ok"})
        except KmsError as exc:
            self._audit.append(actor, str(action), {**fields, "outcome": "refused", "error": code_of(exc)})
            raise
        if action == Transition.DESTROY:
            self._store.scrub()

    def _find(self, key_id: str) -> KeyInfo | None:
        raw = self._store.get(NS_KMS, f"key/{key_id}")
        return None if raw is None else _load_info(raw)

    def _load(self, key_id: str) -> KeyInfo:
        info = self._find(key_id)
        if info is None:
            raise KeyNotFound(f"no key {key_id!r}")
        return info

    def _save(self, info: KeyInfo) -> None:
        self._store.put(NS_KMS, f"key/{info.key_id}", _dump_info(info))

    def _material(self, key_id: str, version: int) -> bytes:
        material = self._store.get(NS_KMS, f"material/{key_id}/{version}")
        if material is None:
            raise KeystoreCorrupt(f"material of version {version} of key {key_id!r} is missing")
        return material

    def _new_version(self, key_id: str, version: int, kind: KeyType, token: TokenSlot | None) -> None:
        """Make a version's key: in `token` if given (recording where), else as material in the keystore."""
        if token is None:
            self._store.put(NS_KMS, f"material/{key_id}/{version}", _new_material(kind))
            return
        session = self._token(token)
        label = f"kmsnet-kms-{key_id}-v{version}"
        made = session.generate_aes256(label) if kind is KeyType.AES256_GCM else session.generate_ed25519(label)
        self._store.put(NS_KMS, f"token/{key_id}/{version}", made.ref.to_record())

    def _token_ref(self, key_id: str, version: int) -> TokenKeyRef | None:
        """Where a version's key is in a token, or None when the keystore holds its material."""
        raw = self._store.get(NS_KMS, f"token/{key_id}/{version}")
        return None if raw is None else TokenKeyRef.from_record(raw)

    def _token(self, slot: TokenSlot) -> TokenSession:
        """The session with `slot`'s token, opened (asking for the PIN) on first use."""
        session = self._tokens.get(slot)
        if session is None:
            session = self._tokens[slot] = TokenSession.open(slot, self._pin)
        return session

    def _ed25519_public(self, key_id: str, version: int) -> Ed25519PublicKey:
        ref = self._token_ref(key_id, version)
        if ref is not None:
            return Ed25519PublicKey.from_public_bytes(ref.public)
        return Ed25519PrivateKey.from_private_bytes(self._material(key_id, version)).public_key()

    def _usable(self, key_id: str, op: Operation, key_types: frozenset[KeyType] | None = None) -> KeyInfo:
        """Load the key and check that its state and type allow `op` (`ALLOWED`, `KEY_TYPES_FOR`)."""
        info = self._load(key_id)
        if info.state not in ALLOWED[op]:
            raise KeyStateError(f"cannot {op.replace('_', ' ')} with key {key_id!r}: it is {info.state}")
        if info.key_type not in (key_types or KEY_TYPES_FOR[op]):
            raise KeyTypeError(f"key {key_id!r} is {info.key_type}: it cannot {op.replace('_', ' ')} here")
        return info

    def _transition(
        self, key_id: str, event: Transition, *, deletion_date: datetime | None = None, scheduled: bool = False
    ) -> KeyInfo:
        """Apply `event` by `TRANSITIONS`; `deletion_date` is kept only by a move into pending_deletion."""
        # A scheduled destruction is the deletion date acting, not the caller: it has its own actor.
        with self._operation(event, key_id, actor="scheduler" if scheduled else None, check_due=not scheduled) as audit:
            info = self._load(key_id)
            target = TRANSITIONS.get((info.state, event))
            if target is None:
                raise KeyStateError(f"cannot {event.replace('_', ' ')} key {key_id!r}: it is {info.state}")
            audit.update(from_state=info.state.value, state=target.value)
            if target is KeyState.DESTROYED:
                for version in info.versions:
                    ref = self._token_ref(key_id, version.version)
                    if ref is not None:
                        self._token(ref.slot).destroy(ref)
                        self._store.delete(NS_KMS, f"token/{key_id}/{version.version}")
                    self._store.delete(NS_KMS, f"material/{key_id}/{version.version}")
            info = replace(info, state=target, deletion_date=deletion_date if target is _P else None)
            if info.deletion_date is not None:
                audit["deletion_date"] = info.deletion_date.isoformat()
            self._save(info)
        return info

    def _destroy_if_due(self, key_id: str) -> None:
        info = self._find(key_id)
        if info is None or info.state is not KeyState.PENDING_DELETION or info.deletion_date is None:
            return
        if self._now() >= info.deletion_date:
            self._transition(key_id, Transition.DESTROY, scheduled=True)

    def _add_version(self, info: KeyInfo) -> KeyInfo:
        number = info.primary_version + 1
        primary = self._token_ref(info.key_id, info.primary_version)  # a new version lives where the last one does
        self._new_version(info.key_id, number, info.key_type, None if primary is None else primary.slot)
        info = replace(info, versions=(*info.versions, KeyVersion(number, self._now())))
        self._save(info)
        return info

    def _rotate_if_due(self, info: KeyInfo) -> KeyInfo:
        """Rotate first when the primary is older than the rotation period (audited as its own entry)."""
        if info.rotation_period is None or self._now() - info.versions[-1].created_at < info.rotation_period:
            return info
        info = self._add_version(info)
        self._audit.append(
            self._actor,
            Operation.ROTATE.value,
            {"key_id": info.key_id, "version": info.primary_version, "trigger": "rotation_period", "outcome": "ok"},
        )
        return info

    def _primary_for_use(self, info: KeyInfo, audit: dict[str, AuditValue]) -> int:
        primary = info.versions[-1]
        audit["version"] = primary.version
        if primary.compromised:
            raise CompromisedVersion(
                f"primary version {primary.version} of key {info.key_id!r} is compromised: rotate the key"
            )
        return primary.version

    def _resolve(
        self,
        info: KeyInfo,
        token: str | bytes,
        error: type[KmsError],
        audit: dict[str, AuditValue],
        allow_compromised: bool,
    ) -> tuple[int, str, bytes]:
        """Parse a token for `info` and check its version may be read; return (version, header, body)."""
        token_key, number, header, body = _parse_token(token, error)
        if token_key != info.key_id:
            raise KeyMismatch(f"this token is for key {token_key!r}, not {info.key_id!r}")
        audit["version"] = number
        version = info.version(number)
        if number < info.min_decryption_version:
            raise VersionTooOld(
                f"version {number} of key {info.key_id!r} is below its minimum decryption version "
                f"{info.min_decryption_version}"
            )
        if version.compromised:
            audit["compromised"] = True
            if not allow_compromised:
                raise CompromisedVersion(f"version {number} of key {info.key_id!r} is compromised")
        return number, header, body

    def _seal(self, info: KeyInfo, plaintext: bytes, audit: dict[str, AuditValue]) -> str:
        version = self._primary_for_use(info, audit)
        header = _token_header(info.key_id, version)
        ref = self._token_ref(info.key_id, version)
        if ref is not None:
            nonce = secrets.token_bytes(NONCE_SIZE)
            body = nonce + self._token(ref.slot).aes256(ref).encrypt(nonce, plaintext, header.encode("ascii"))
        elif info.key_type is KeyType.AES256_GCM:
            body = aes_gcm_seal(self._material(info.key_id, version), plaintext, header.encode("ascii"))
        else:
            public = _rsa_private(self._material(info.key_id, version)).public_key()
            body = rsa_oaep_encrypt(public, plaintext, header.encode("ascii"))
        return header + base64.b64encode(body).decode("ascii")

    def _open(self, info: KeyInfo, version: int, header: str, body: bytes) -> bytes:
        ref = self._token_ref(info.key_id, version)
        if ref is not None:
            key = self._token(ref.slot).aes256(ref)
            opened = None
            if len(body) > NONCE_SIZE:
                opened = key.decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], header.encode("ascii"))
            if opened is None:
                raise InvalidCiphertext(f"ciphertext does not authenticate under key {info.key_id!r}")
            return opened
        material = self._material(info.key_id, version)
        if info.key_type is KeyType.AES256_GCM:
            try:
                return aes_gcm_open(material, body, header.encode("ascii"))
            except InvalidTag:
                raise InvalidCiphertext(f"ciphertext does not authenticate under key {info.key_id!r}") from None
        return rsa_oaep_decrypt(_rsa_private(material), body, header.encode("ascii"))

    def _encrypt(self, key_id: str, plaintext: bytes, key_types: frozenset[KeyType]) -> str:
        with self._operation(Operation.ENCRYPT, key_id) as audit:
            info = self._rotate_if_due(self._usable(key_id, Operation.ENCRYPT, key_types))
            return self._seal(info, plaintext, audit)

    def _decrypt(
        self, key_id: str, ciphertext: str | bytes, key_types: frozenset[KeyType], allow_compromised: bool
    ) -> Decrypted:
        with self._operation(Operation.DECRYPT, key_id) as audit:
            info = self._usable(key_id, Operation.DECRYPT, key_types)
            version, header, body = self._resolve(info, ciphertext, InvalidCiphertext, audit, allow_compromised)
            plaintext = self._open(info, version, header, body)
            return Decrypted(plaintext, key_id, version, info.version(version).compromised)

    def _seed_decrypt(self, name: str, encrypted: str | bytes, key_type: KeyType) -> str | bytes:
        # The seed's callers cannot pass allow_compromised: they get their data, with a warning.
        result = self._decrypt(name, encrypted, frozenset({key_type}), allow_compromised=True)
        if result.compromised:
            warnings.warn(
                f"decrypted under compromised version {result.version} of key {name!r}",
                CompromisedVersionWarning,
                stacklevel=3,
            )
        return _like(result.plaintext, encrypted)
