"""No key material and no plaintext in repr() or str() of anything that holds them.

A key must never leak through a log line or a traceback. For every key-holding object we collect the
secrets it holds (reaching into private attributes where needed: root, chain and message keys) and check
that neither their hex, nor any 8-byte window of that hex, nor their Python bytes repr appears in
repr(obj) or str(obj).
"""

from __future__ import annotations

from typing import Any

import pytest

from protocol import handshake
from protocol.certs import VerifiedCertificate
from protocol.crl import RevocationState
from protocol.identity import IdentityKey, KemKeyPair, X25519KeyPair
from protocol.keyschedule import kdf_ck
from protocol.ratchet import Ratchet
from protocol.session import Kind, Received
from tests.support.pki import ALICE, BOB, CA, Prekeys, establish, make_prekeys

PLAINTEXT = b"TOP-SECRET-PLAINTEXT-4242"


def leaks(text: str, secret: bytes) -> list[str]:
    """Ways `secret` shows up in `text` (empty if it does not)."""
    found = []
    hexed = secret.hex()
    if hexed in text or hexed.upper() in text:
        found.append("hex")
    if repr(secret) in text or repr(secret)[2:-1] in text:
        found.append("bytes repr")
    for i in range(0, max(1, len(secret) - 7)):
        window = secret[i : i + 8]
        if len(window) == 8 and (window.hex() in text or repr(window)[2:-1] in text):
            found.append(f"8-byte window at {i}")
            break
    return found


def assert_no_secrets(obj: Any, secrets: dict[str, bytes], plaintexts: tuple[bytes, ...] = ()) -> None:
    for render in (repr, str):
        text = render(obj)
        for name, secret in secrets.items():
            assert len(secret) >= 16, name
            found = leaks(text, secret)
            assert not found, f"{render.__name__}({type(obj).__name__}) shows {name}: {found}"
        for plaintext in plaintexts:
            assert plaintext.decode("latin-1") not in text, f"{render.__name__}({type(obj).__name__}) shows plaintext"
            assert plaintext.hex() not in text


def ratchet_secrets(r: Ratchet, prefix: str = "") -> dict[str, bytes]:
    """Everything secret a ratchet holds: root key, chain keys, next message keys, skipped keys, DH private key."""
    out = {f"{prefix}root key": r._rk, f"{prefix}ratchet private key": r._dhs.private_bytes()}
    if r._cks is not None:
        out[f"{prefix}sending chain key"] = r._cks
        out[f"{prefix}next sending message key"] = kdf_ck(r._cks)[1]
    if r._ckr is not None:
        out[f"{prefix}receiving chain key"] = r._ckr
        out[f"{prefix}next receiving message key"] = kdf_ck(r._ckr)[1]
    for (_, n), mk in r._skipped.items():
        out[f"{prefix}skipped message key {n}"] = mk
    return out


@pytest.fixture
def talked() -> tuple[handshake.Initiated, handshake.Responded, Prekeys]:
    """A handshake and some conversation, with skipped keys on bob's side."""
    prekeys = make_prekeys(BOB)
    initiated, responded = establish(CA, ALICE, prekeys, first=PLAINTEXT)
    a, b = initiated.session, responded.session
    pending = [a.encrypt(PLAINTEXT + b"%d" % i) for i in range(3)]
    b.decrypt(pending[2])  # two skipped keys
    a.decrypt(b.encrypt(PLAINTEXT))
    return initiated, responded, prekeys


def test_identity_key() -> None:
    key = IdentityKey.generate()
    assert_no_secrets(key, {"identity private key": key.private_bytes()})
    assert "IdentityKey(public=" in repr(key)


def test_x25519_key_pair() -> None:
    pair = X25519KeyPair.generate()
    assert_no_secrets(pair, {"x25519 private key": pair.private_bytes()})
    assert "X25519KeyPair(public=" in repr(pair)


def test_kem_key_pair() -> None:
    pair = KemKeyPair.generate()
    seed = pair.seed()
    assert_no_secrets(pair, {"kem seed d": seed[:32], "kem seed z": seed[32:], "kem seed": seed})
    assert "KemKeyPair(public=" in repr(pair)


def test_ratchet_and_session(talked: tuple[handshake.Initiated, handshake.Responded, Prekeys]) -> None:
    initiated, responded, _ = talked
    for session in (initiated.session, responded.session):
        secrets = ratchet_secrets(session.ratchet)
        assert_no_secrets(session.ratchet, secrets, (PLAINTEXT,))
        assert_no_secrets(session, secrets, (PLAINTEXT,))
    assert responded.session.ratchet.skipped_count == 2
    assert "skipped=2" in repr(responded.session)


def test_closed_session(talked: tuple[handshake.Initiated, handshake.Responded, Prekeys]) -> None:
    _, responded, _ = talked
    responded.session.close("peer revoked")
    assert_no_secrets(responded.session, ratchet_secrets(responded.session.ratchet), (PLAINTEXT,))


def test_received() -> None:
    got = Received(Kind.DATA, PLAINTEXT)
    assert_no_secrets(got, {}, (PLAINTEXT,))
    assert repr(got) == f"Received(kind=DATA, {len(PLAINTEXT)} bytes)"
    assert_no_secrets([got, (got,)], {}, (PLAINTEXT,))  # inside containers too


def test_prekey_secrets(talked: tuple[handshake.Initiated, handshake.Responded, Prekeys]) -> None:
    _, _, prekeys = talked
    secrets = {"signed prekey private key": prekeys.spk.private_bytes()}
    assert prekeys.kem is not None
    secrets["kem seed"] = prekeys.kem.seed()
    for key_id, key in prekeys.onetime_keys.items():
        secrets[f"one-time prekey {key_id}"] = key.private_bytes()
    assert_no_secrets(prekeys.secrets, secrets)
    assert_no_secrets(handshake.PrekeySecrets.from_bytes(prekeys.secrets.to_bytes()), secrets)


def test_verified_certificate_and_revocation_state(
    talked: tuple[handshake.Initiated, handshake.Responded, Prekeys],
) -> None:
    initiated, responded, _ = talked
    secrets = {
        "alice identity": ALICE.identity.private_bytes(),
        "bob identity": BOB.identity.private_bytes(),
        "ca key": CA.key.private_bytes_raw(),
    }
    for peer in (initiated.peer, responded.peer):
        assert isinstance(peer, VerifiedCertificate)
        assert_no_secrets(peer, secrets)
    state = CA.revocation([ALICE.serial + 100])
    assert isinstance(state, RevocationState)
    assert_no_secrets(state, secrets)
    assert_no_secrets(RevocationState(), secrets)


def test_handshake_results(talked: tuple[handshake.Initiated, handshake.Responded, Prekeys]) -> None:
    """Initiated and Responded (dataclass reprs) show the sessions, the INIT frame and the peers: no secrets,
    and not message 0's plaintext (the frame holds its ciphertext)."""
    initiated, responded, prekeys = talked
    secrets = {
        **ratchet_secrets(initiated.session.ratchet, "alice "),
        **ratchet_secrets(responded.session.ratchet, "bob "),
        "alice identity": ALICE.identity.private_bytes(),
        "bob identity": BOB.identity.private_bytes(),
        "bob signed prekey": prekeys.spk.private_bytes(),
    }
    assert_no_secrets(initiated, secrets, (PLAINTEXT,))
    assert_no_secrets(responded, secrets, (PLAINTEXT,))


def test_the_checker_does_find_leaks() -> None:
    """The checker itself: it must flag hex, bytes reprs and partial (8-byte) leaks."""
    secret = bytes(range(32))
    assert leaks(f"key={secret.hex()}", secret) == ["hex", "8-byte window at 0"]
    assert "bytes repr" in leaks(f"key={secret!r}", secret)
    assert leaks(f"partial={secret[10:20].hex()}", secret) == ["8-byte window at 10"]
    assert leaks("nothing here", secret) == []

    class Leaky:
        def __repr__(self) -> str:
            return f"Leaky(key={secret[4:20]!r})"

    with pytest.raises(AssertionError, match="shows k"):
        assert_no_secrets(Leaky(), {"k": secret})
    with pytest.raises(AssertionError, match="plaintext"):
        assert_no_secrets(PLAINTEXT.decode(), {}, (PLAINTEXT,))
