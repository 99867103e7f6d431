"""Every key derivation of the protocol (PROTOCOL.md §5); the labels are in `protocol.labels`.

Nonces come from counters, never from randomness under a reused key: every message key encrypts
exactly one message, and its nonce is the message number, so a (key, nonce) pair can only repeat
if a message key is reused, which the ratchet forbids.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from protocol.labels import LABEL_CHAIN, LABEL_RATCHET, LABEL_ROOT, LABEL_ROOT_INSECURE, LABEL_TRANSCRIPT

KEY_LEN = 32
NONCE_LEN = 12

_SHA256 = hashes.SHA256()
_SHA512 = hashes.SHA512()
#: The AES-GCM nonce of message number n in its chain: 8 zero bytes then n as a big-endian u32.
#: A counter, never random: the message key is used once, so (key, nonce) never repeats.
#: (struct.error for n outside 0..2**32-1; the wire format bounds n before it gets here.)
message_nonce = struct.Struct(">8xI").pack


def hkdf(ikm: bytes, *, salt: bytes, info: bytes, length: int = KEY_LEN) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract with `salt`, expand with `info`."""
    return HKDF(algorithm=_SHA256, length=length, salt=salt, info=info).derive(ikm)


def hkdf_expand(prk: bytes, *, info: bytes, length: int = KEY_LEN) -> bytes:
    """HKDF-Expand alone (RFC 5869 §2.3), for tests against the RFC's PRK values."""
    return HKDFExpand(algorithm=_SHA256, length=length, info=info).derive(prk)


def root_key(secrets: bytes, transcript_hash: bytes, *, insecure: bool = False) -> bytes:
    """The session's first root key: HKDF(ikm = DH1 || DH2 || KEM secret, salt = transcript hash).

    Salting with the transcript hash binds the key to everything both sides verified.
    """
    return hkdf(secrets, salt=transcript_hash, info=LABEL_ROOT_INSECURE if insecure else LABEL_ROOT)


def kdf_rk(root: bytes, dh_output: bytes) -> tuple[bytes, bytes]:
    """A DH-ratchet step: (root, DH output) → (next root key, new chain key)."""
    out = HKDF(algorithm=_SHA256, length=2 * KEY_LEN, salt=root, info=LABEL_RATCHET).derive(dh_output)
    return out[:KEY_LEN], out[KEY_LEN:]


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """A symmetric chain step: chain key → (next chain key, message key).

    One HMAC-SHA512 keyed with the chain key over LABEL_CHAIN; the first half is the next
    chain key, the second the message key. HMAC is a PRF, so the halves are independent and
    neither reveals the other (one call where Signal makes two HMAC-SHA256 calls).
    """
    mac = hmac.HMAC(chain_key, _SHA512)
    mac.update(LABEL_CHAIN)
    out = mac.finalize()
    return out[:KEY_LEN], out[KEY_LEN:]


def transcript_hash(*parts: bytes) -> bytes:
    """SHA-256 over the domain label and each part, each prefixed by its 4-byte length.

    Length prefixes make the encoding injective: no two different part lists hash alike.
    """
    encoded = b"".join(len(part).to_bytes(4, "big") + part for part in parts)
    return hashlib.sha256(LABEL_TRANSCRIPT + encoded).digest()
