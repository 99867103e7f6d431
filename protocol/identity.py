"""Key objects: identity (Ed25519), X25519 key pairs, ML-KEM-768 key pairs.

Every class that holds private key material shows only a short fingerprint of its *public*
key in `repr`, so a key can never leak through a log line or a traceback.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from protocol.errors import BadSignature, DecodeError, HandshakeError, WeakKey
from protocol.messages import X25519_LEN

MLKEM768_SEED_LEN = 64
_ZERO = bytes(X25519_LEN)


def short_fingerprint(public: bytes) -> str:
    """First 8 bytes of SHA-256 of a public key, in hex: enough to tell keys apart in a log."""
    return hashlib.sha256(public).hexdigest()[:16]


class IdentityKey:
    """A node's long-term Ed25519 signing key."""

    __slots__ = ("_key", "public", "public_bytes")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public: Ed25519PublicKey = key.public_key()
        self.public_bytes: bytes = self.public.public_bytes_raw()

    @classmethod
    def generate(cls) -> IdentityKey:
        """A fresh identity key from the OS's randomness."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> IdentityKey:
        """Restore from the 32-byte seed that `private_bytes` returned."""
        try:
            return cls(Ed25519PrivateKey.from_private_bytes(data))
        except ValueError as exc:
            raise DecodeError("an Ed25519 private key is 32 bytes") from exc

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The `cryptography` key object (for certificate requests and signing APIs)."""
        return self._key

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key, for sealing in the keystore only."""
        return self._key.private_bytes_raw()

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature over `data`."""
        return self._key.sign(data)

    def __repr__(self) -> str:
        return f"IdentityKey(public={short_fingerprint(self.public_bytes)})"


def verify_signature(public: Ed25519PublicKey, signature: bytes, data: bytes) -> None:
    """Raise BadSignature unless `signature` is `public`'s Ed25519 signature over `data`."""
    try:
        public.verify(signature, data)
    except InvalidSignature as exc:
        raise BadSignature("signature does not verify") from exc


def load_ed25519_public(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its 32 raw bytes (DecodeError otherwise)."""
    try:
        return Ed25519PublicKey.from_public_bytes(data)
    except ValueError as exc:
        raise DecodeError("an Ed25519 public key is 32 bytes") from exc


class X25519KeyPair:
    """An X25519 key pair (prekeys, ephemerals, ratchet keys)."""

    __slots__ = ("_key", "public")

    def __init__(self, key: X25519PrivateKey) -> None:
        self._key = key
        self.public: bytes = key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> X25519KeyPair:
        """A fresh key pair from the OS's randomness."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> X25519KeyPair:
        """Restore from the 32 raw private bytes."""
        try:
            return cls(X25519PrivateKey.from_private_bytes(data))
        except ValueError as exc:
            raise DecodeError("an X25519 private key is 32 bytes") from exc

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key, for sealing in the keystore or session state only."""
        return self._key.private_bytes_raw()

    def exchange(self, peer_public: bytes) -> bytes:
        """X25519(our private, their public), refusing an all-zero result (RFC 7748 §6.1).

        A low-order public key forces the all-zero output, which would make the "shared"
        secret known to anyone; `cryptography` raises for it, and we check again in
        constant time rather than rely on that.
        """
        try:
            peer = X25519PublicKey.from_public_bytes(peer_public)
            out = self._key.exchange(peer)
        except ValueError as exc:
            raise WeakKey("X25519 public key refused (low order or malformed)") from exc
        if hmac.compare_digest(out, _ZERO):  # cryptography raises first; we do not rely on it
            raise WeakKey("X25519 produced the all-zero output")
        return out

    def __repr__(self) -> str:
        return f"X25519KeyPair(public={short_fingerprint(self.public)})"


class KemKeyPair:
    """An ML-KEM-768 key pair (the signed post-quantum prekey)."""

    __slots__ = ("_key", "public")

    def __init__(self, key: MLKEM768PrivateKey) -> None:
        self._key = key
        self.public: bytes = key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> KemKeyPair:
        """A fresh key pair from the OS's randomness."""
        return cls(MLKEM768PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> KemKeyPair:
        """Restore from the 64-byte seed (FIPS 203 d || z)."""
        try:
            return cls(MLKEM768PrivateKey.from_seed_bytes(seed))
        except ValueError as exc:
            raise DecodeError("an ML-KEM-768 seed is 64 bytes") from exc

    def seed(self) -> bytes:
        """The 64-byte seed, for sealing in the keystore only."""
        return self._key.private_bytes_raw()

    def decapsulate(self, ciphertext: bytes) -> bytes:
        """The 32-byte shared secret for `ciphertext` (implicit rejection: a bad one yields garbage)."""
        try:
            return self._key.decapsulate(ciphertext)
        except ValueError as exc:
            raise HandshakeError("ML-KEM ciphertext malformed") from exc

    def __repr__(self) -> str:
        return f"KemKeyPair(public={short_fingerprint(self.public)})"


def kem_encapsulate(public: bytes) -> tuple[bytes, bytes]:
    """(shared secret, ciphertext) for an ML-KEM-768 public key."""
    try:
        key = MLKEM768PublicKey.from_public_bytes(public)
    except ValueError as exc:
        raise HandshakeError("ML-KEM-768 public key malformed") from exc
    return key.encapsulate()
