"""Keys in a PKCS#11 token (a hardware security module; SoftHSM in the tests), via python-pkcs11.

A key made here is generated *in* the token, private and non-extractable: no process, kmsnet's
included, ever sees its bytes. What a home stores about it is a `TokenKeyRef`: the module, the
token's label, the key's CKA_ID and its public key. The token's user PIN opens a session; kmsnet
never takes it from the command line (`kmsnet/pkcs11_options.py`: a prompt, KMSNET_PKCS11_PIN or
a file), never stores it and never logs it.

What SoftHSM 2.6 offers, and so what kmsnet uses:
  - Ed25519 (CKK_EC_EDWARDS, CKM_EDDSA): the CA root, node identities, KMS signing keys;
  - AES-256 (CKK_AES, CKM_AES_GCM with a caller-given 96-bit IV): KMS symmetric keys;
  - no X25519: key agreement and the ratchet stay in the sealed keystore.

One `TokenSession` is one logged-in PKCS#11 session; use it from one thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ

from node.errors import KeystoreCorrupt, NodeError, TrustError, Unavailable
from node.signed_der import DelegatedEd25519
from protocol.identity import IdentityKey

__all__ = [
    "PIN_ENV",
    "PIN_FILE_ENV",
    "Pin",
    "PinRequired",
    "TokenAesKey",
    "TokenEd25519Key",
    "TokenError",
    "TokenIdentityKey",
    "TokenKeyMissing",
    "TokenKeyRef",
    "TokenSession",
    "TokenSlot",
    "TokenUnavailable",
    "WrongPin",
]

log = logging.getLogger("kmsnet.pkcs11")

#: Where a non-interactive run finds the token's user PIN: a file holding it, or the PIN itself.
PIN_FILE_ENV = "KMSNET_PKCS11_PIN_FILE"
PIN_ENV = "KMSNET_PKCS11_PIN"

#: RFC 8410's id-Ed25519, DER: the CKA_EC_PARAMS SoftHSM (and PKCS#11 3.0) take for Ed25519 keys.
_ED25519_PARAMS = bytes.fromhex("06032b6570")
_ID_BYTES = 16
_GCM_TAG_BITS = 128


class TokenError(NodeError):
    """A PKCS#11 token could not do what was asked."""


class TokenUnavailable(TokenError, Unavailable):
    """The PKCS#11 module does not load, or holds no token with that label."""


class WrongPin(TokenError):
    """The token refused the PIN (or it is locked)."""


class PinRequired(TokenError):
    """A key of this home is in a PKCS#11 token, and no PIN was given."""


class NotExtractable(TokenError):
    """Asked for the private bytes of a key that lives in a token."""


#: The token's user PIN, or a function asked for it only when a token is actually opened
#: (so that a command on a file-backed home never prompts for one).
Pin = str | Callable[[], str]


def environment_pin() -> str:
    """The PIN from the file KMSNET_PKCS11_PIN_FILE names, else KMSNET_PKCS11_PIN; "" when neither is set.

    The default `Pin` of library callers (a running node); the command line adds a prompt.
    """
    file = os.environ.get(PIN_FILE_ENV)
    if file:
        try:
            # One trailing newline is the file's, not the PIN's.
            return Path(file).read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(f"cannot read the PIN file {file} ({PIN_FILE_ENV})") from exc
    return os.environ.get(PIN_ENV, "")


def resolve_pin(pin: Pin | None, slot: TokenSlot) -> str:
    """The PIN `pin` gives; `PinRequired` without one."""
    text = pin() if callable(pin) else pin
    if not text:
        raise PinRequired(f"the key is in the PKCS#11 token {slot.token!r}: give its PIN ({PIN_FILE_ENV} or {PIN_ENV})")
    return text


class TokenKeyMissing(TokenError, TrustError):
    """The token holds no such key, or one that is not the key the home names."""


@dataclass(frozen=True)
class TokenSlot:
    """Which token: the PKCS#11 module (a shared library path) and the token's label."""

    module: str
    token: str


@dataclass(frozen=True)
class TokenKeyRef:
    """What a home stores about a key in a token: where it is and what it is. Never key bytes."""

    slot: TokenSlot
    key_id: bytes
    kind: str  # "ed25519" or "aes256"
    label: str
    #: The Ed25519 public key (raw 32 bytes); empty for a secret key.
    public: bytes = field(default=b"")

    def to_record(self) -> bytes:
        """JSON for the home's keystore."""
        return json.dumps(
            {
                "module": self.slot.module,
                "token": self.slot.token,
                "key_id": self.key_id.hex(),
                "kind": self.kind,
                "label": self.label,
                "public": self.public.hex(),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_record(cls, data: bytes) -> TokenKeyRef:
        """Parse what `to_record` wrote."""
        try:
            raw = json.loads(data)
            return cls(
                slot=TokenSlot(str(raw["module"]), str(raw["token"])),
                key_id=bytes.fromhex(raw["key_id"]),
                kind=str(raw["kind"]),
                label=str(raw["label"]),
                public=bytes.fromhex(raw.get("public", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise KeystoreCorrupt("a token key reference does not parse") from exc


# PKCS#11 allows C_Initialize once per process: one `pkcs11.lib` per module path, shared.
_LIBS: dict[str, Any] = {}
_LIBS_LOCK = threading.Lock()


def _lib(module: str) -> Any:
    with _LIBS_LOCK:
        lib = _LIBS.get(module)
        if lib is None:
            try:
                lib = pkcs11.lib(module)
            except (RuntimeError, OSError, p11.PKCS11Error) as exc:
                raise TokenUnavailable(f"cannot load the PKCS#11 module {module}") from exc
            _LIBS[module] = lib
        return lib


def _find_token(lib: Any, slot: TokenSlot) -> Any:
    """The token labelled `slot.token` (caller holds _LIBS_LOCK).

    A module lists the tokens it saw when it was initialised; one inserted (or, for SoftHSM,
    created, or configured by a new SOFTHSM2_CONF) since then is found by initialising the module
    again, which is done only while no session of this process uses it.
    """
    token = _token_labelled(lib, slot)
    if token is None and not any(open_slot.module == slot.module for open_slot in _SESSIONS):
        try:
            lib.reinitialize()
        except p11.PKCS11Error as exc:
            raise TokenUnavailable(f"cannot re-initialise the PKCS#11 module {slot.module}") from exc
        token = _token_labelled(lib, slot)
    if token is None:
        raise TokenUnavailable(f"no PKCS#11 token labelled {slot.token!r} in {slot.module}")
    return token


def _token_labelled(lib: Any, slot: TokenSlot) -> Any:
    """The token, or None when the module does not list it (or cannot list its tokens at all, as
    SoftHSM cannot once the token directory it was initialised with is gone)."""
    try:
        return lib.get_token(token_label=slot.token)
    except p11.MultipleTokensReturned as exc:
        raise TokenUnavailable(f"more than one PKCS#11 token is labelled {slot.token!r}") from exc
    except p11.PKCS11Error:
        return None


def _ed25519_point(encoded: bytes) -> bytes:
    """The 32 raw bytes of CKA_EC_POINT: SoftHSM wraps them in a DER OCTET STRING, some tokens do not."""
    if len(encoded) == 32:
        return encoded
    try:
        value, rest = der_decoder.decode(encoded, asn1Spec=univ.OctetString())
    except PyAsn1Error as exc:
        raise TokenKeyMissing("the token's Ed25519 public key does not parse") from exc
    raw = bytes(value)
    if rest or len(raw) != 32:
        raise TokenKeyMissing("the token's Ed25519 public key is not 32 bytes")
    return raw


@dataclass
class _Shared:
    """The one logged-in PKCS#11 session a process holds with one token.

    A token's login state belongs to the whole process (a second C_Login fails with
    CKR_USER_ALREADY_LOGGED_IN), so every `TokenSession` on the same token shares it: the first
    logs in, the later ones must present the same PIN, the last to close logs out.
    """

    session: Any
    pin_digest: bytes
    users: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)


_SESSIONS: dict[TokenSlot, _Shared] = {}


def _pin_digest(slot: TokenSlot, pin: str) -> bytes:
    return hashlib.sha256(f"{slot.module}\0{slot.token}\0{pin}".encode()).digest()


class TokenSession:
    """A logged-in session with one token: make, find, use and destroy keys. `close()` when done."""

    def __init__(self, slot: TokenSlot, shared: _Shared) -> None:
        """Internal: use `open`."""
        self.slot = slot
        self._shared = shared
        self._session = shared.session
        self._closed = False

    @classmethod
    def open(cls, slot: TokenSlot, pin: Pin | None) -> TokenSession:
        """Log in to the token `slot` names with `pin` (read-write: keys are made and destroyed).

        Raises `TokenUnavailable` (no module, no such token), `PinRequired` or `WrongPin`.
        """
        lib = _lib(slot.module)
        pin = resolve_pin(pin, slot)
        digest = _pin_digest(slot, pin)
        with _LIBS_LOCK:
            shared = _SESSIONS.get(slot)
            if shared is not None:
                if not hmac.compare_digest(shared.pin_digest, digest):
                    raise WrongPin(f"the token {slot.token!r} refused the PIN")
                shared.users += 1
                return cls(slot, shared)
            token = _find_token(lib, slot)
            try:
                session = token.open(user_pin=pin, rw=True)
            except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinLocked, p11.PinExpired) as exc:
                raise WrongPin(f"the token {slot.token!r} refused the PIN") from exc
            except p11.PKCS11Error as exc:
                raise TokenUnavailable(f"cannot open a session with the token {slot.token!r}") from exc
            shared = _SESSIONS[slot] = _Shared(session, digest)
        log.info("token_opened", extra={"fields": {"token": slot.token}})
        return cls(slot, shared)

    def close(self) -> None:
        """End this session; the last one on a token logs out (keys found through it stop working)."""
        with _LIBS_LOCK:
            if self._closed:
                return
            self._closed = True
            self._shared.users -= 1
            if self._shared.users:
                return
            del _SESSIONS[self.slot]
        try:
            self._session.close()
        except p11.PKCS11Error:
            log.warning("token_close_failed", extra={"fields": {"token": self.slot.token}})

    def __enter__(self) -> TokenSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TokenSession {self.slot.token!r}>"

    # --- Ed25519 -------------------------------------------------------------------------------------

    def generate_ed25519(self, label: str) -> TokenEd25519Key:
        """A new Ed25519 key pair in the token: private half sensitive, non-extractable, sign only."""
        key_id = secrets.token_bytes(_ID_BYTES)
        try:
            with self._shared.lock:
                public, private = self._session.generate_keypair(
                    KeyType.EC_EDWARDS,
                    None,
                    store=True,
                    label=label,
                    id=key_id,
                    public_template={Attribute.EC_PARAMS: _ED25519_PARAMS, Attribute.VERIFY: True},
                    private_template={
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.SIGN: True,
                        Attribute.DECRYPT: False,
                        Attribute.UNWRAP: False,
                        Attribute.DERIVE: False,
                    },
                )
        except p11.PKCS11Error as exc:
            raise TokenError(f"the token {self.slot.token!r} could not make an Ed25519 key") from exc
        raw = _ed25519_point(public[Attribute.EC_POINT])
        ref = TokenKeyRef(self.slot, key_id, "ed25519", label, raw)
        log.info("token_key_generated", extra={"fields": {"token": self.slot.token, "kind": "ed25519", "label": label}})
        return TokenEd25519Key(ref, private, self._shared.lock)

    def ed25519(self, ref: TokenKeyRef) -> TokenEd25519Key:
        """The Ed25519 key `ref` names; `TokenKeyMissing` unless the token holds it with that public key."""
        private = self._find(ref, ObjectClass.PRIVATE_KEY, KeyType.EC_EDWARDS)
        public = self._find(ref, ObjectClass.PUBLIC_KEY, KeyType.EC_EDWARDS)
        if _ed25519_point(public[Attribute.EC_POINT]) != ref.public:
            raise TokenKeyMissing(f"the token's key {ref.label!r} is not the one this home was made with")
        return TokenEd25519Key(ref, private, self._shared.lock)

    # --- AES -----------------------------------------------------------------------------------------

    def generate_aes256(self, label: str) -> TokenAesKey:
        """A new AES-256 key in the token: sensitive, non-extractable, encrypt/decrypt only."""
        key_id = secrets.token_bytes(_ID_BYTES)
        try:
            with self._shared.lock:
                key = self._session.generate_key(
                    KeyType.AES,
                    256,
                    store=True,
                    label=label,
                    id=key_id,
                    template={
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.ENCRYPT: True,
                        Attribute.DECRYPT: True,
                        Attribute.WRAP: False,
                        Attribute.UNWRAP: False,
                    },
                )
        except p11.PKCS11Error as exc:
            raise TokenError(f"the token {self.slot.token!r} could not make an AES key") from exc
        log.info("token_key_generated", extra={"fields": {"token": self.slot.token, "kind": "aes256", "label": label}})
        return TokenAesKey(TokenKeyRef(self.slot, key_id, "aes256", label), key, self._shared.lock)

    def aes256(self, ref: TokenKeyRef) -> TokenAesKey:
        """The AES key `ref` names; `TokenKeyMissing` unless the token holds it."""
        return TokenAesKey(ref, self._find(ref, ObjectClass.SECRET_KEY, KeyType.AES), self._shared.lock)

    # --- any key -------------------------------------------------------------------------------------

    def destroy(self, ref: TokenKeyRef) -> int:
        """Delete every object of the key `ref` names from the token; return how many there were."""
        try:
            with self._shared.lock:
                objects = list(self._session.get_objects({Attribute.ID: ref.key_id}))
                for obj in objects:
                    obj.destroy()
        except p11.PKCS11Error as exc:
            raise TokenError(f"the token {self.slot.token!r} could not delete the key {ref.label!r}") from exc
        log.info("token_key_destroyed", extra={"fields": {"token": self.slot.token, "label": ref.label}})
        return len(objects)

    def holds(self, ref: TokenKeyRef) -> bool:
        """True while the token holds any object of the key `ref` names."""
        try:
            with self._shared.lock:
                return any(True for _ in self._session.get_objects({Attribute.ID: ref.key_id}))
        except p11.PKCS11Error as exc:
            raise TokenError(f"the token {self.slot.token!r} could not be searched") from exc

    def _find(self, ref: TokenKeyRef, object_class: ObjectClass, key_type: KeyType) -> Any:
        if ref.slot != self.slot:
            raise TokenKeyMissing(f"the key {ref.label!r} lives in another token ({ref.slot.token!r})")
        try:
            with self._shared.lock:
                return self._session.get_key(object_class=object_class, key_type=key_type, id=ref.key_id)
        except (p11.NoSuchKey, p11.MultipleObjectsReturned) as exc:
            raise TokenKeyMissing(f"the token {self.slot.token!r} holds no key {ref.label!r}") from exc
        except p11.PKCS11Error as exc:
            raise TokenError(f"the token {self.slot.token!r} could not be searched") from exc


class TokenEd25519Key(DelegatedEd25519):
    """An Ed25519 key in a token: signs there (CKM_EDDSA); signs X.509 objects via `DelegatedEd25519`."""

    def __init__(self, ref: TokenKeyRef, private: Any, lock: threading.Lock) -> None:
        """Internal: use `TokenSession.generate_ed25519` or `TokenSession.ed25519`."""
        self.ref = ref
        self._private = private
        self._lock = lock
        self._public = Ed25519PublicKey.from_public_bytes(ref.public)

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of `data`, made in the token."""
        try:
            with self._lock:
                return bytes(self._private.sign(data, mechanism=Mechanism.EDDSA))
        except p11.PKCS11Error as exc:
            raise TokenError(f"the token refused to sign with {self.ref.label!r}") from exc

    def public_key(self) -> Ed25519PublicKey:
        """The key's public half."""
        return self._public

    def __repr__(self) -> str:
        return f"<TokenEd25519Key {self.ref.label!r}>"


class TokenAesKey:
    """An AES-256 key in a token: AES-GCM encryption and decryption happen there (CKM_AES_GCM)."""

    def __init__(self, ref: TokenKeyRef, key: Any, lock: threading.Lock) -> None:
        """Internal: use `TokenSession.generate_aes256` or `TokenSession.aes256`."""
        self.ref = ref
        self._key = key
        self._lock = lock

    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM of `plaintext` under `nonce` (12 bytes) and `aad`: ciphertext || 16-byte tag."""
        try:
            with self._lock:
                return bytes(
                    self._key.encrypt(
                        plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad, _GCM_TAG_BITS)
                    )
                )
        except p11.PKCS11Error as exc:
            raise TokenError(f"the token refused to encrypt with {self.ref.label!r}") from exc

    def decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
        """The plaintext, or None when the tag does not verify (wrong key, nonce, aad or tampering)."""
        try:
            with self._lock:
                return bytes(
                    self._key.decrypt(
                        ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad, _GCM_TAG_BITS)
                    )
                )
        except (p11.EncryptedDataInvalid, p11.EncryptedDataLenRange, p11.GeneralError):
            # SoftHSM 2.6 reports a GCM tag that does not verify as CKR_GENERAL_ERROR.
            return None
        except p11.PKCS11Error as exc:
            raise TokenError(f"the token refused to decrypt with {self.ref.label!r}") from exc

    def __repr__(self) -> str:
        return f"<TokenAesKey {self.ref.label!r}>"


class TokenIdentityKey(IdentityKey):
    """A node identity (`protocol.identity.IdentityKey`) whose Ed25519 key is in a token.

    It signs transcripts, bundles and challenges there; `private_bytes` and `private_key` refuse
    (`NotExtractable`), and `delegated` signs X.509 objects (the node's CSRs) through the token.
    """

    __slots__ = ("_session", "delegated")

    def __init__(self, key: TokenEd25519Key, session: TokenSession | None = None) -> None:
        # IdentityKey.__init__ wants a private key object; this one fills the same slots from the token.
        self.delegated = key
        self._session = session  # closed by `close`, when this key owns it
        self.public = key.public_key()
        self.public_bytes = self.public.public_bytes_raw()

    @property
    def private_key(self) -> Any:
        """Refused: the key never leaves the token."""
        raise NotExtractable("the identity key is in a PKCS#11 token and never leaves it")

    def private_bytes(self) -> bytes:
        """Refused: the key never leaves the token."""
        raise NotExtractable("the identity key is in a PKCS#11 token and never leaves it")

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature over `data`, made in the token."""
        return self.delegated.sign(data)

    def close(self) -> None:
        """End the token session this key was opened with (if it owns one); it cannot sign afterwards."""
        if self._session is not None:
            self._session.close()

    def __repr__(self) -> str:
        return f"TokenIdentityKey(token={self.delegated.ref.slot.token!r}, label={self.delegated.ref.label!r})"
