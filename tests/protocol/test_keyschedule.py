"""protocol.keyschedule: every derivation matches its definition (PROTOCOL.md §5).

Known-answer values (fixed inputs → exact bytes) are in test_vectors.py and tests/vectors/kat/.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import keyschedule as ks
from protocol import labels


def test_hkdf_is_rfc5869_sha256() -> None:
    ikm, salt, info = b"\x01" * 40, b"\x02" * 17, b"info"
    expected = HKDF(algorithm=hashes.SHA256(), length=77, salt=salt, info=info).derive(ikm)
    assert ks.hkdf(ikm, salt=salt, info=info, length=77) == expected
    assert len(ks.hkdf(ikm, salt=salt, info=info)) == ks.KEY_LEN == 32
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    assert ks.hkdf_expand(prk, info=info, length=77) == expected
    assert ks.hkdf_expand(prk, info=info) == expected[:32]


def test_kdf_ck_is_one_hmac_sha512() -> None:
    ck = bytes(range(32))
    out = hmac.new(ck, labels.LABEL_CHAIN, hashlib.sha512).digest()
    nxt, mk = ks.kdf_ck(ck)
    assert (nxt, mk) == (out[:32], out[32:])
    assert nxt != mk and len(nxt) == len(mk) == 32
    # A chain never cycles quickly and never reuses a message key.
    keys = set()
    for _ in range(200):
        ck, mk = ks.kdf_ck(ck)
        keys.add(mk)
        keys.add(ck)
    assert len(keys) == 400


def test_kdf_rk_is_hkdf_with_root_as_salt() -> None:
    root, dh = b"\x11" * 32, b"\x22" * 32
    out = HKDF(algorithm=hashes.SHA256(), length=64, salt=root, info=labels.LABEL_RATCHET).derive(dh)
    assert ks.kdf_rk(root, dh) == (out[:32], out[32:])
    assert ks.kdf_rk(root, dh) != ks.kdf_rk(dh, root)


def test_root_key_labels() -> None:
    secrets, th = b"\x33" * 96, b"\x44" * 32
    assert ks.root_key(secrets, th) == ks.hkdf(secrets, salt=th, info=labels.LABEL_ROOT)
    insecure = ks.root_key(secrets, th, insecure=True)
    assert insecure == ks.hkdf(secrets, salt=th, info=labels.LABEL_ROOT_INSECURE)
    assert insecure != ks.root_key(secrets, th)
    # Bound to the transcript: another transcript hash, another key.
    assert ks.root_key(secrets, b"\x45" * 32) != ks.root_key(secrets, th)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 2**31, 2**32 - 1])
def test_message_nonce_is_the_counter(n: int) -> None:
    nonce = ks.message_nonce(n)
    assert len(nonce) == ks.NONCE_LEN == 12
    assert nonce[:8] == bytes(8)
    assert int.from_bytes(nonce[8:], "big") == n


@pytest.mark.parametrize("n", [-1, 2**32])
def test_message_nonce_out_of_range(n: int) -> None:
    with pytest.raises(struct.error):
        ks.message_nonce(n)


def test_message_nonces_never_repeat_within_a_chain() -> None:
    assert len({ks.message_nonce(n) for n in range(5000)}) == 5000


def test_transcript_hash_definition() -> None:
    parts = (b"a", b"", b"\x00" * 40)
    h = hashlib.sha256(labels.LABEL_TRANSCRIPT)
    for p in parts:
        h.update(len(p).to_bytes(4, "big") + p)
    assert ks.transcript_hash(*parts) == h.digest()
    assert ks.transcript_hash() == hashlib.sha256(labels.LABEL_TRANSCRIPT).digest()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((b"ab", b"c"), (b"a", b"bc")),
        ((), (b"",)),
        ((b"",), (b"", b"")),
        ((b"x", b"y"), (b"y", b"x")),
        ((b"\x00\x00\x00\x01a",), (b"a",)),
    ],
)
def test_transcript_hash_is_injective_on_examples(a: tuple[bytes, ...], b: tuple[bytes, ...]) -> None:
    assert ks.transcript_hash(*a) != ks.transcript_hash(*b)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=12), max_size=5), st.lists(st.binary(max_size=12), max_size=5))
def test_transcript_hash_distinguishes_part_lists(a: list[bytes], b: list[bytes]) -> None:
    assert (ks.transcript_hash(*a) == ks.transcript_hash(*b)) == (a == b)
