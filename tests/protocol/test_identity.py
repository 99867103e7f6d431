"""protocol.identity: Ed25519 identity keys, X25519 key pairs (with the all-zero refusal), ML-KEM-768 key pairs.

RFC and Wycheproof vectors for these wrappers are in test_vectors.py; reprs in test_repr.py.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import BadSignature, DecodeError, HandshakeError, RemoteError, WeakKey
from protocol.identity import (
    MLKEM768_SEED_LEN,
    IdentityKey,
    KemKeyPair,
    X25519KeyPair,
    kem_encapsulate,
    load_ed25519_public,
    short_fingerprint,
    verify_signature,
)
from protocol.messages import MLKEM768_CIPHERTEXT_LEN, MLKEM768_PUBLIC_LEN, SIGNATURE_LEN, X25519_LEN

#: Low-order X25519 public keys (u-coordinates of small-order points, canonical and not): each forces an
#: all-zero shared secret. The full Wycheproof set is in test_vectors.py.
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),  # p - 1
    bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),  # p (= 0)
    bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),  # p + 1 (= 1)
]


# --- Ed25519 identity keys ---------------------------------------------------------------------------


def test_identity_sign_and_verify() -> None:
    key = IdentityKey.generate()
    signature = key.sign(b"message")
    assert len(signature) == SIGNATURE_LEN
    assert len(key.public_bytes) == 32
    assert key.public_bytes == key.public.public_bytes_raw()
    verify_signature(key.public, signature, b"message")
    # Deterministic (RFC 8032): the same message signs to the same bytes.
    assert key.sign(b"message") == signature


def test_identity_private_bytes_round_trip() -> None:
    key = IdentityKey.generate()
    raw = key.private_bytes()
    assert len(raw) == 32
    again = IdentityKey.from_private_bytes(raw)
    assert again.public_bytes == key.public_bytes
    assert again.sign(b"x") == key.sign(b"x")
    assert isinstance(key.private_key, Ed25519PrivateKey)
    assert key.private_key.public_key().public_bytes_raw() == key.public_bytes


@pytest.mark.parametrize("raw", [b"", b"\x00" * 31, b"\x00" * 33, b"\x00" * 64])
def test_identity_from_private_bytes_refuses_wrong_length(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        IdentityKey.from_private_bytes(raw)


def test_verify_signature_refusals() -> None:
    key = IdentityKey.generate()
    other = IdentityKey.generate()
    signature = key.sign(b"message")
    with pytest.raises(BadSignature):
        verify_signature(key.public, signature, b"messagE")
    with pytest.raises(BadSignature):
        verify_signature(other.public, signature, b"message")
    for i in range(0, SIGNATURE_LEN * 8, 37):
        flipped = bytearray(signature)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(BadSignature):
            verify_signature(key.public, bytes(flipped), b"message")
    for bad in (b"", signature[:-1], signature + b"\x00", bytes(64)):
        with pytest.raises(BadSignature):
            verify_signature(key.public, bad, b"message")


def test_load_ed25519_public() -> None:
    key = IdentityKey.generate()
    loaded = load_ed25519_public(key.public_bytes)
    assert isinstance(loaded, Ed25519PublicKey)
    verify_signature(loaded, key.sign(b"m"), b"m")
    for bad in (b"", b"\x00" * 31, b"\x00" * 33):
        with pytest.raises(DecodeError):
            load_ed25519_public(bad)


# --- X25519 -------------------------------------------------------------------------------------------


def test_x25519_agreement_and_round_trip() -> None:
    a = X25519KeyPair.generate()
    b = X25519KeyPair.generate()
    shared = a.exchange(b.public)
    assert shared == b.exchange(a.public)
    assert len(shared) == 32 and len(a.public) == X25519_LEN
    again = X25519KeyPair.from_private_bytes(a.private_bytes())
    assert again.public == a.public
    assert again.exchange(b.public) == shared
    # It is the cryptography primitive underneath, nothing more.
    raw = X25519PrivateKey.from_private_bytes(a.private_bytes())
    assert raw.public_key().public_bytes_raw() == a.public


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_x25519_any_32_bytes_is_a_private_key(x: bytes, y: bytes) -> None:
    a = X25519KeyPair.from_private_bytes(x)
    b = X25519KeyPair.from_private_bytes(y)
    assert a.exchange(b.public) == b.exchange(a.public)


@pytest.mark.parametrize("raw", [b"", b"\x00" * 31, b"\x00" * 33])
def test_x25519_from_private_bytes_refuses_wrong_length(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        X25519KeyPair.from_private_bytes(raw)


@pytest.mark.parametrize("public", LOW_ORDER, ids=lambda p: p[:4].hex())
def test_x25519_low_order_public_key_is_weak(public: bytes) -> None:
    with pytest.raises(WeakKey):
        X25519KeyPair.generate().exchange(public)


@pytest.mark.parametrize("public", [b"", b"\x09" * 31, b"\x09" * 33, b"\x09" * 64])
def test_x25519_malformed_public_key_is_refused(public: bytes) -> None:
    with pytest.raises(WeakKey) as info:
        X25519KeyPair.generate().exchange(public)
    assert isinstance(info.value, RemoteError)


# --- ML-KEM-768 -----------------------------------------------------------------------------------------


def test_kem_encapsulate_decapsulate() -> None:
    pair = KemKeyPair.generate()
    assert len(pair.public) == MLKEM768_PUBLIC_LEN
    secret, ciphertext = kem_encapsulate(pair.public)
    assert len(secret) == 32 and len(ciphertext) == MLKEM768_CIPHERTEXT_LEN
    assert pair.decapsulate(ciphertext) == secret
    # Randomised: a second encapsulation gives another secret and ciphertext.
    secret2, ciphertext2 = kem_encapsulate(pair.public)
    assert (secret2, ciphertext2) != (secret, ciphertext)
    assert pair.decapsulate(ciphertext2) == secret2


def test_kem_seed_round_trip_is_deterministic() -> None:
    seed = hashlib.sha512(b"kem seed").digest()
    assert len(seed) == MLKEM768_SEED_LEN
    a = KemKeyPair.from_seed(seed)
    b = KemKeyPair.from_seed(seed)
    assert a.public == b.public
    assert a.seed() == seed
    secret, ciphertext = kem_encapsulate(a.public)
    assert b.decapsulate(ciphertext) == secret
    assert KemKeyPair.from_seed(a.seed()).public == a.public
    assert MLKEM768PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw() == a.public


@pytest.mark.parametrize("seed", [b"", b"\x00" * 32, b"\x00" * 63, b"\x00" * 65])
def test_kem_from_seed_refuses_wrong_length(seed: bytes) -> None:
    with pytest.raises(DecodeError):
        KemKeyPair.from_seed(seed)


def test_kem_implicit_rejection() -> None:
    """A tampered ciphertext of the right length decapsulates to an unrelated secret, not an error:
    the handshake then fails at message 0's authentication, never earlier."""
    pair = KemKeyPair.generate()
    secret, ciphertext = kem_encapsulate(pair.public)
    tampered = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    other = pair.decapsulate(tampered)
    assert len(other) == 32 and other != secret
    assert pair.decapsulate(tampered) == other  # deterministic


@pytest.mark.parametrize("size", [0, 1, MLKEM768_CIPHERTEXT_LEN - 1, MLKEM768_CIPHERTEXT_LEN + 1])
def test_kem_malformed_ciphertext(size: int) -> None:
    with pytest.raises(HandshakeError):
        KemKeyPair.generate().decapsulate(b"\x00" * size)


@pytest.mark.parametrize("size", [0, 32, MLKEM768_PUBLIC_LEN - 1, MLKEM768_PUBLIC_LEN + 1])
def test_kem_encapsulate_malformed_public_key(size: int) -> None:
    with pytest.raises(HandshakeError):
        kem_encapsulate(b"\x00" * size)


# --- fingerprints ---------------------------------------------------------------------------------------


def test_short_fingerprint() -> None:
    public = b"\x42" * 32
    assert short_fingerprint(public) == hashlib.sha256(public).hexdigest()[:16]
    assert len(short_fingerprint(b"")) == 16
    assert short_fingerprint(b"a") != short_fingerprint(b"b")


def test_all_zero_output_is_refused_even_if_the_library_returns_it() -> None:
    """Defence in depth (RFC 7748 §6.1): the wrapper checks the output itself, it does not rely on
    `cryptography` raising first. A stand-in private key that returns zeros shows the check works."""

    class ZeroKey:
        def public_key(self) -> X25519PublicKey:
            return X25519PrivateKey.generate().public_key()

        def exchange(self, peer: object) -> bytes:
            return bytes(32)

    pair = X25519KeyPair(ZeroKey())  # type: ignore[arg-type]
    with pytest.raises(WeakKey, match="all-zero"):
        pair.exchange(X25519KeyPair.generate().public)
