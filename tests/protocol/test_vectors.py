"""Test vectors through OUR wrappers: RFC 5869 / 7748 / 8032, Project Wycheproof, and our own known answers.

* RFC vectors (tests/vectors/rfc/): HKDF-SHA-256 through `keyschedule.hkdf` / `hkdf_expand`, X25519 through
  `X25519KeyPair`, Ed25519 through `IdentityKey` / `verify_signature`.
* Wycheproof (tests/vectors/wycheproof/): X25519 (valid ones match; every ZeroSharedSecret one is refused by
  `X25519KeyPair.exchange` AND by `handshake.initiate` as signed prekey or one-time prekey), AES-256-GCM with
  96-bit IVs through the ratchet's `_open` (the nonce function swapped for the vector's IV) and `AESGCM`
  encryption as `Ratchet.encrypt` calls it, HKDF-SHA-256 through `keyschedule.hkdf`.
* Our known answers (tests/vectors/kat/): fixed inputs → exact bytes, checked both ways (recomputing from
  the stored inputs gives the stored outputs; decoding / decrypting the stored outputs gives the inputs).
  The generators are the `INPUTS_*` constants and `compute_*` functions below. To regenerate deliberately:

      KMSNET_REGEN_VECTORS=1 .venv/bin/pytest -q tests/protocol/test_vectors.py

  (the handshake vector keeps its stored ML-KEM encapsulation unless the KEM seed changed; delete the file to
  draw a fresh one from a real encapsulation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import itertools
import json
import os
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding

from protocol import certs, handshake, keyschedule, labels, ratchet, revocation, wire
from protocol.errors import AuthenticationFailed, BadSignature, WeakKey
from protocol.identity import (
    IdentityKey,
    KemKeyPair,
    X25519KeyPair,
    kem_encapsulate,
    load_ed25519_public,
    verify_signature,
)
from protocol.messages import InitMessage, PrekeyBundle, RatchetMessage, Suite
from protocol.ratchet import Ratchet
from protocol.session import Kind, Session
from tests.support.pki import BOB, CA, HOUR, NOW, kem_pair

VECTORS = Path(__file__).parent.parent / "vectors"
REGEN = os.environ.get("KMSNET_REGEN_VECTORS") == "1"


def load(relative: str) -> Any:
    return json.loads((VECTORS / relative).read_text())


def h(data: str) -> bytes:
    return bytes.fromhex(data)


# ======================================================================================================
# RFC vectors
# ======================================================================================================

RFC5869 = load("rfc/rfc5869_hkdf_sha256.json")["tests"]
RFC7748 = load("rfc/rfc7748_x25519.json")
RFC8032 = load("rfc/rfc8032_ed25519.json")["tests"]


@pytest.mark.parametrize("case", RFC5869, ids=lambda c: f"A.{c['case']}")
def test_rfc5869_hkdf_sha256(case: dict[str, Any]) -> None:
    ikm, salt, info, prk, okm = (h(case[k]) for k in ("ikm", "salt", "info", "prk", "okm"))
    assert keyschedule.hkdf(ikm, salt=salt, info=info, length=case["length"]) == okm
    assert keyschedule.hkdf_expand(prk, info=info, length=case["length"]) == okm
    assert hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest() == prk  # the file's PRK is the RFC's


def test_rfc5869_has_cases_1_to_3() -> None:
    assert [c["case"] for c in RFC5869] == [1, 2, 3]


@pytest.mark.parametrize("vector", RFC7748["scalar_mult"], ids=lambda v: v["comment"])
def test_rfc7748_x25519(vector: dict[str, str]) -> None:
    pair = X25519KeyPair.from_private_bytes(h(vector["scalar"]))
    assert pair.exchange(h(vector["u"])) == h(vector["output"])


@pytest.mark.parametrize("iterations", ["1", "1000"])
def test_rfc7748_x25519_iterated(iterations: str) -> None:
    k = u = h(RFC7748["iterated"]["start"])
    for _ in range(int(iterations)):
        k, u = X25519KeyPair.from_private_bytes(k).exchange(u), k
    assert k == h(RFC7748["iterated"]["after"][iterations])


def test_rfc7748_diffie_hellman() -> None:
    v = RFC7748["diffie_hellman"]
    alice = X25519KeyPair.from_private_bytes(h(v["alice_private"]))
    bob = X25519KeyPair.from_private_bytes(h(v["bob_private"]))
    assert alice.public == h(v["alice_public"])
    assert bob.public == h(v["bob_public"])
    assert alice.exchange(bob.public) == bob.exchange(alice.public) == h(v["shared"])


@pytest.mark.parametrize("vector", RFC8032, ids=lambda v: v["name"])
def test_rfc8032_ed25519(vector: dict[str, str]) -> None:
    key = IdentityKey.from_private_bytes(h(vector["secret_key"]))
    message, signature = h(vector["message"]), h(vector["signature"])
    assert key.public_bytes == h(vector["public_key"])
    assert key.sign(message) == signature
    public = load_ed25519_public(h(vector["public_key"]))
    verify_signature(public, signature, message)
    with pytest.raises(BadSignature):
        verify_signature(public, signature[:-1] + bytes([signature[-1] ^ 0x40]), message)
    with pytest.raises(BadSignature):
        verify_signature(public, signature, message + b"\x00")


def test_rfc8032_has_the_required_tests() -> None:
    assert [v["name"] for v in RFC8032] == ["TEST 1", "TEST 2", "TEST 3", "TEST SHA(abc)"]
    assert h(RFC8032[3]["message"]) == hashlib.sha512(b"abc").digest()


# ======================================================================================================
# Wycheproof
# ======================================================================================================


def wycheproof(name: str) -> list[dict[str, Any]]:
    data = load(f"wycheproof/{name}")
    return [
        {**test, "group": {k: v for k, v in group.items() if k != "tests"}}
        for group in data["testGroups"]
        for test in group["tests"]
    ]


X25519_TESTS = wycheproof("x25519_test.json")
X25519_ZERO = [t for t in X25519_TESTS if "ZeroSharedSecret" in t["flags"]]
X25519_MATCH = [
    t for t in X25519_TESTS if t["result"] in ("valid", "acceptable") and "ZeroSharedSecret" not in t["flags"]
]


def test_wycheproof_x25519_selection() -> None:
    assert len(X25519_TESTS) == 518
    assert len(X25519_ZERO) == 31
    assert all(t["shared"] == "00" * 32 for t in X25519_ZERO)
    assert sum(t["result"] == "valid" for t in X25519_MATCH) == 264  # every valid vector is checked
    assert len(X25519_MATCH) + len(X25519_ZERO) == len(X25519_TESTS)


@pytest.mark.parametrize("vector", X25519_MATCH, ids=lambda t: f"tc{t['tcId']}")
def test_wycheproof_x25519_matches(vector: dict[str, Any]) -> None:
    """Valid vectors (and the acceptable ones with a non-zero result: twist points, non-canonical keys)."""
    pair = X25519KeyPair.from_private_bytes(h(vector["private"]))
    assert pair.exchange(h(vector["public"])) == h(vector["shared"])


def low_order_bundle(spk: bytes | None = None, onetime: bytes | None = None) -> PrekeyBundle:
    """Bob's bundle with the given (low-order) keys, signed by bob's real identity: only the key is bad."""
    good = X25519KeyPair.from_private_bytes(hashlib.sha256(b"good spk").digest())
    bundle = handshake.make_bundle(
        BOB.identity,
        BOB.cert,
        created=int((NOW - HOUR).timestamp()),
        spk_id=1,
        spk=SimpleNamespace(public=spk) if spk is not None else good,  # type: ignore[arg-type]
        kem_id=1,
        kem=kem_pair("wycheproof-kem"),
    )
    if onetime is not None:
        bundle = bundle.with_onetime(handshake.make_onetime(BOB.identity, BOB.cert, 1, SimpleNamespace(public=onetime)))  # type: ignore[arg-type]
    return bundle


def initiate_to(bundle: PrekeyBundle) -> handshake.Initiated:
    from tests.support.pki import ALICE

    return handshake.initiate(
        identity=ALICE.identity,
        certificate=ALICE.cert,
        bundle=bundle,
        root=CA.root,
        revocation=CA.revocation(),
        now=NOW,
        expected_name="bob",
    )


def test_low_order_bundle_helper_is_otherwise_valid() -> None:
    initiate_to(low_order_bundle())
    initiate_to(low_order_bundle(onetime=X25519KeyPair.generate().public))


@pytest.mark.parametrize("vector", X25519_ZERO, ids=lambda t: f"tc{t['tcId']}")
def test_wycheproof_x25519_zero_shared_secret_is_refused(vector: dict[str, Any]) -> None:
    public = h(vector["public"])
    with pytest.raises(WeakKey):
        X25519KeyPair.from_private_bytes(h(vector["private"])).exchange(public)
    with pytest.raises(WeakKey):
        initiate_to(low_order_bundle(spk=public))
    with pytest.raises(WeakKey):
        initiate_to(low_order_bundle(onetime=public))


AES_GCM_TESTS = [
    t
    for t in wycheproof("aes_gcm_test.json")
    if t["group"]["keySize"] == 256 and t["group"]["ivSize"] == 96 and t["group"]["tagSize"] == 128
]


def test_wycheproof_aes_gcm_selection() -> None:
    assert len(AES_GCM_TESTS) == 66
    assert sum(t["result"] == "valid" for t in AES_GCM_TESTS) == 39
    assert sum(t["result"] == "invalid" for t in AES_GCM_TESTS) == 27


@pytest.mark.parametrize("vector", AES_GCM_TESTS, ids=lambda t: f"tc{t['tcId']}-{t['result']}")
def test_wycheproof_aes_256_gcm(vector: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Decryption through `ratchet._open` (the ratchet's only AEAD-open path) with its counter-nonce function
    replaced by the vector's IV; encryption through `AESGCM` exactly as `Ratchet.encrypt` calls it (no wrapper)."""
    key, iv, aad, msg = h(vector["key"]), h(vector["iv"]), h(vector["aad"]), h(vector["msg"])
    sealed = h(vector["ct"]) + h(vector["tag"])
    monkeypatch.setattr(ratchet, "message_nonce", lambda n: iv)
    if vector["result"] == "valid":
        assert ratchet._open(key, 0, sealed, aad) == msg
        assert AESGCM(key).encrypt(iv, msg, aad) == sealed
    else:
        with pytest.raises(AuthenticationFailed):
            ratchet._open(key, 0, sealed, aad)


HKDF_TESTS = wycheproof("hkdf_sha256_test.json")


def test_wycheproof_hkdf_selection() -> None:
    assert len(HKDF_TESTS) == 86
    assert [t["tcId"] for t in HKDF_TESTS if t["result"] == "invalid"] == [
        t["tcId"] for t in HKDF_TESTS if "SizeTooLarge" in t["flags"]
    ]
    assert sum(t["result"] == "invalid" for t in HKDF_TESTS) == 3


@pytest.mark.parametrize("vector", HKDF_TESTS, ids=lambda t: f"tc{t['tcId']}-{t['result']}")
def test_wycheproof_hkdf_sha256(vector: dict[str, Any]) -> None:
    ikm, salt, info = h(vector["ikm"]), h(vector["salt"]), h(vector["info"])
    if vector["result"] == "valid":
        assert keyschedule.hkdf(ikm, salt=salt, info=info, length=vector["size"]) == h(vector["okm"])
    else:
        with pytest.raises(ValueError):
            keyschedule.hkdf(ikm, salt=salt, info=info, length=vector["size"])


# ======================================================================================================
# Our known-answer vectors: generators
# ======================================================================================================


def seed(label: str, size: int = 32) -> str:
    """Fixed, documented key material for the generators: SHA-512("kmsnet-kat/" + label), hex."""
    return hashlib.sha512(b"kmsnet-kat/" + label.encode()).digest()[:size].hex()


class ListKeygen:
    """A deterministic `keygen` seam: hands out fixed X25519 private keys in order; fails when exhausted."""

    def __init__(self, private_keys: list[str]) -> None:
        self._keys: Iterator[str] = iter(private_keys)
        self.used = 0

    def __call__(self) -> X25519KeyPair:
        try:
            key = next(self._keys)
        except StopIteration:
            raise AssertionError("the vector's keygen list is exhausted") from None
        self.used += 1
        return X25519KeyPair.from_private_bytes(h(key))


# --- keyschedule -------------------------------------------------------------------------------------------

INPUTS_KEYSCHEDULE: dict[str, Any] = {
    "labels": {
        name: getattr(labels, name).decode() for name in sorted(n for n in dir(labels) if n.startswith("LABEL_"))
    },
    "kdf_rk": [
        {"root": "00" * 32, "dh": "00" * 32},
        {"root": bytes(range(32)).hex(), "dh": bytes(range(32, 64)).hex()},
        {"root": seed("rk/root"), "dh": seed("rk/dh")},
    ],
    "kdf_ck": [{"chain_key": "00" * 32}, {"chain_key": "ff" * 32}, {"chain_key": seed("ck")}],
    "kdf_ck_chain": {"chain_key": seed("ck/chain"), "steps": 5},
    "transcript_hash": [
        {"parts": []},
        {"parts": [""]},
        {"parts": ["", ""]},
        {"parts": ["616263"]},
        {"parts": ["61", "6263"]},
        {"parts": ["6162", "63"]},
        {"parts": [seed("th/a"), seed("th/b", 64), "01"]},
    ],
    "message_nonce": [0, 1, 255, 256, 0x01020304, 0xFFFFFFFF],
    "root_key": [
        {"secrets": seed("root/secrets", 64), "transcript": seed("root/th"), "insecure": False},
        {"secrets": seed("root/secrets", 64), "transcript": seed("root/th"), "insecure": True},
        {"secrets": seed("root/secrets96", 64) + seed("root/more"), "transcript": seed("root/th2"), "insecure": False},
    ],
}


def compute_keyschedule(inputs: dict[str, Any]) -> dict[str, Any]:
    chain = []
    ck = h(inputs["kdf_ck_chain"]["chain_key"])
    for _ in range(inputs["kdf_ck_chain"]["steps"]):
        ck, mk = keyschedule.kdf_ck(ck)
        chain.append({"chain_key": ck.hex(), "message_key": mk.hex()})
    return {
        "labels": {name: getattr(labels, name).decode() for name in inputs["labels"]},
        "kdf_rk": [
            dict(
                zip(("root", "chain_key"), (x.hex() for x in keyschedule.kdf_rk(h(c["root"]), h(c["dh"]))), strict=True)
            )
            for c in inputs["kdf_rk"]
        ],
        "kdf_ck": [
            dict(
                zip(("chain_key", "message_key"), (x.hex() for x in keyschedule.kdf_ck(h(c["chain_key"]))), strict=True)
            )
            for c in inputs["kdf_ck"]
        ],
        "kdf_ck_chain": chain,
        "transcript_hash": [
            keyschedule.transcript_hash(*(h(p) for p in c["parts"])).hex() for c in inputs["transcript_hash"]
        ],
        "message_nonce": [keyschedule.message_nonce(n).hex() for n in inputs["message_nonce"]],
        "root_key": [
            keyschedule.root_key(h(c["secrets"]), h(c["transcript"]), insecure=c["insecure"]).hex()
            for c in inputs["root_key"]
        ],
    }


def inverse_keyschedule(inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    assert outputs["labels"] == inputs["labels"]
    for n, nonce in zip(inputs["message_nonce"], outputs["message_nonce"], strict=True):
        raw = h(nonce)
        assert raw[:8] == bytes(8) and int.from_bytes(raw[8:], "big") == n
    # A chain step's output is the next step's input.
    chain = outputs["kdf_ck_chain"]
    for prev, nxt in itertools.pairwise(chain):
        assert keyschedule.kdf_ck(h(prev["chain_key"]))[0].hex() == nxt["chain_key"]


# --- frames ------------------------------------------------------------------------------------------------

INPUTS_FRAMES: dict[str, Any] = {
    "message": {"dh": seed("frame/dh"), "pn": 3, "n": 300, "ciphertext": seed("frame/ct", 40)},
    "bundle": {
        "certificate": seed("frame/cert", 64),
        "created": 1_767_225_600,
        "spk_id": 7,
        "spk": seed("frame/spk"),
        "kem_id": 8,
        "kem": (seed("frame/kem", 64) * 19)[: 1184 * 2],
        "signature": seed("frame/sig", 64),
        "otpk_id": 70000,
        "otpk": seed("frame/otpk"),
        "otpk_signature": seed("frame/otpk-sig", 64),
    },
    "init": {
        "suite": 2,
        "certificate": seed("frame/cert2", 64),
        "responder_fingerprint": seed("frame/fp"),
        "spk_id": 7,
        "kem_id": None,
        "otpk_id": 70000,
        "ephemeral": seed("frame/eph"),
        "kem_ciphertext": None,
        "signature": seed("frame/init-sig", 64),
        "message": seed("frame/msg", 48),
        "created": 1_800_000_000_123,
    },
}


def _frame(cls: Any, fields: dict[str, Any]) -> Any:
    return cls(**{k: (h(v) if isinstance(v, str) else v) for k, v in fields.items()})


def _fields(frame: Any) -> dict[str, Any]:
    values = ((f.name, getattr(frame, f.name)) for f in dataclasses.fields(frame))
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in values}


FRAME_KINDS = {"message": RatchetMessage, "bundle": PrekeyBundle, "init": InitMessage}


def compute_frames(inputs: dict[str, Any]) -> dict[str, Any]:
    return {kind: wire.encode(_frame(FRAME_KINDS[kind], inputs[kind])).hex() for kind in FRAME_KINDS}


def inverse_frames(inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    for kind, cls in FRAME_KINDS.items():
        frame = wire.decode(h(outputs[kind]))
        assert type(frame) is cls
        assert _fields(frame) == inputs[kind]
    assert _fields(wire.decode_message(h(outputs["message"]))) == inputs["message"]


# --- a ratchet conversation ---------------------------------------------------------------------------------

CONVERSATION = [
    ("alice", "first"),
    ("alice", "second, same chain"),
    ("bob", "reply: a DH step"),
    ("bob", ""),
    ("alice", "third: another DH step"),
    ("bob", "x" * 100),
    ("alice", "last"),
]

INPUTS_RATCHET: dict[str, Any] = {
    "root_key": seed("ratchet/root"),
    "alice_ephemeral": seed("ratchet/alice-eph"),
    "bob_signed_prekey": seed("ratchet/bob-spk"),
    "alice_keygen": [seed(f"ratchet/alice-{i}") for i in range(4)],
    "bob_keygen": [seed(f"ratchet/bob-{i}") for i in range(4)],
    "ad": seed("ratchet/ad"),
    "script": [{"from": who, "plaintext": text.encode().hex()} for who, text in CONVERSATION],
}


def ratchet_pair(inputs: dict[str, Any]) -> dict[str, Ratchet]:
    root = h(inputs["root_key"])
    eph = X25519KeyPair.from_private_bytes(h(inputs["alice_ephemeral"]))
    spk = X25519KeyPair.from_private_bytes(h(inputs["bob_signed_prekey"]))
    alice = Ratchet.initiator(
        root, ours=eph, theirs=spk.public, dh_output=eph.exchange(spk.public), keygen=ListKeygen(inputs["alice_keygen"])
    )
    bob = Ratchet.responder(
        root, theirs=eph.public, dh_output=spk.exchange(eph.public), keygen=ListKeygen(inputs["bob_keygen"])
    )
    return {"alice": alice, "bob": bob}


def compute_ratchet(inputs: dict[str, Any]) -> dict[str, Any]:
    sides = ratchet_pair(inputs)
    ad = h(inputs["ad"])
    frames = []
    for step in inputs["script"]:
        sender, receiver = step["from"], "bob" if step["from"] == "alice" else "alice"
        frame = wire.encode(sides[sender].encrypt(h(step["plaintext"]), ad))
        assert sides[receiver].decrypt(wire.decode_message(frame), ad) == h(step["plaintext"])
        frames.append(frame.hex())
    return {
        "frames": frames,
        "state_sha256": {name: hashlib.sha256(r.to_bytes()).hexdigest() for name, r in sides.items()},
    }


def inverse_ratchet(inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Fresh ratchets from the inputs decrypt the stored frames (receiving only) to the script's plaintexts."""
    sides = ratchet_pair(inputs)
    ad = h(inputs["ad"])
    for step, frame in zip(inputs["script"], outputs["frames"], strict=True):
        receiver = "bob" if step["from"] == "alice" else "alice"
        assert sides[receiver].decrypt(wire.decode_message(h(frame)), ad) == h(step["plaintext"])


# --- a full handshake ---------------------------------------------------------------------------------------

INPUTS_HANDSHAKE: dict[str, Any] = {
    "now": "2026-01-15T12:00:00+00:00",
    "ca": {
        "key": seed("hs/ca"),
        "name": "kmsnet-kat-ca",
        "serial": 1,
        "not_before": "2025-01-01T00:00:00+00:00",
        "not_after": "2035-01-01T00:00:00+00:00",
    },
    "alice": {"identity": seed("hs/alice"), "name": "alice", "serial": 0xA11CE},
    "bob": {"identity": seed("hs/bob"), "name": "bob", "serial": 0xB0B},
    "certificate_validity": {"not_before": "2026-01-01T00:00:00+00:00", "not_after": "2027-01-01T00:00:00+00:00"},
    "crl": {"number": 1, "this_update": "2026-01-15T00:00:00+00:00", "next_update": "2026-01-16T00:00:00+00:00"},
    "bob_prekeys": {
        "created": 1_768_474_800,  # 2026-01-15T11:00:00Z
        "spk_id": 1,
        "spk": seed("hs/bob-spk"),
        "kem_id": 1,
        "kem_seed": seed("hs/bob-kem", 64),
        "otpk_id": 1,
        "otpk": seed("hs/bob-otpk"),
    },
    "alice_keygen": [seed(f"hs/alice-{i}") for i in range(4)],
    "bob_keygen": [seed(f"hs/bob-{i}") for i in range(4)],
    "first_message": b"hello bob".hex(),
    "script": [{"from": who, "plaintext": text.encode().hex()} for who, text in CONVERSATION],
    # Filled by the generator from a real ML-KEM-768 encapsulation to the KEM prekey above.
    "kem_encapsulation": None,
}


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


class KatWorld:
    """Everything the handshake vector's inputs determine: CA, certificates, CRL state, bob's prekeys."""

    def __init__(self, inputs: dict[str, Any]) -> None:
        self.now = _time(inputs["now"])
        ca = inputs["ca"]
        self.ca_key = Ed25519PrivateKey.from_private_bytes(h(ca["key"]))
        self.root = certs.make_root(
            key=self.ca_key,
            name=ca["name"],
            serial=ca["serial"],
            not_before=_time(ca["not_before"]),
            not_after=_time(ca["not_after"]),
        )
        validity = inputs["certificate_validity"]
        self.identities: dict[str, IdentityKey] = {}
        self.certs: dict[str, bytes] = {}
        for who in ("alice", "bob"):
            node = inputs[who]
            self.identities[who] = IdentityKey.from_private_bytes(h(node["identity"]))
            cert = certs.issue(
                ca_key=self.ca_key,
                ca_cert=self.root,
                subject_name=node["name"],
                public_key=self.identities[who].public,
                serial=node["serial"],
                not_before=_time(validity["not_before"]),
                not_after=_time(validity["not_after"]),
            )
            self.certs[who] = cert.public_bytes(Encoding.DER)
        crl = inputs["crl"]
        self.crl = revocation.issue_crl(
            ca_key=self.ca_key,
            ca_cert=self.root,
            number=crl["number"],
            this_update=_time(crl["this_update"]),
            next_update=_time(crl["next_update"]),
            revoked=[],
        )
        self.revocation = revocation.RevocationState()
        self.revocation.accept(self.crl, self.root, self.now)
        p = inputs["bob_prekeys"]
        self.spk = X25519KeyPair.from_private_bytes(h(p["spk"]))
        self.kem = KemKeyPair.from_seed(h(p["kem_seed"]))
        self.otpk = X25519KeyPair.from_private_bytes(h(p["otpk"]))
        self.prekeys = handshake.PrekeySecrets()
        self.prekeys.add_signed(p["spk_id"], self.spk)
        self.prekeys.add_kem(p["kem_id"], self.kem)
        self.prekeys.add_onetime(p["otpk_id"], self.otpk)
        self.published = handshake.make_bundle(
            self.identities["bob"],
            self.certs["bob"],
            created=p["created"],
            spk_id=p["spk_id"],
            spk=self.spk,
            kem_id=p["kem_id"],
            kem=self.kem,
        )
        self.fetched = self.published.with_onetime(
            handshake.make_onetime(self.identities["bob"], self.certs["bob"], p["otpk_id"], self.otpk)
        )

    def respond(self, init_frame: bytes, keygen: Callable[[], X25519KeyPair]) -> handshake.Responded:
        return handshake.respond(
            handshake.decode_init(init_frame),
            identity=self.identities["bob"],
            certificate_fingerprint=hashlib.sha256(self.certs["bob"]).digest(),
            bundle=self.published,
            prekeys=self.prekeys,
            root=self.root,
            revocation=self.revocation,
            now=self.now,
            keygen=keygen,
        )


def compute_handshake(inputs: dict[str, Any]) -> dict[str, Any]:
    world = KatWorld(inputs)
    encapsulation = inputs["kem_encapsulation"]
    stored = (h(encapsulation["shared_secret"]), h(encapsulation["ciphertext"]))

    def kem_encaps(public: bytes) -> tuple[bytes, bytes]:
        assert public == world.kem.public, "the initiator encapsulates to the bundle's KEM prekey"
        return stored

    bundle_frame = wire.encode(world.fetched)
    initiated = handshake.initiate(
        identity=world.identities["alice"],
        certificate=world.certs["alice"],
        bundle=wire.decode(bundle_frame),  # type: ignore[arg-type]
        root=world.root,
        revocation=world.revocation,
        now=world.now,
        expected_name=inputs["bob"]["name"],
        first_message=h(inputs["first_message"]),
        keygen=ListKeygen(inputs["alice_keygen"]),
        kem_encaps=kem_encaps,
    )
    responded = world.respond(initiated.frame, ListKeygen(inputs["bob_keygen"]))
    assert responded.first == (Kind.DATA, h(inputs["first_message"]))
    sessions = {"alice": initiated.session, "bob": responded.session}
    frames = []
    for step in inputs["script"]:
        receiver = "bob" if step["from"] == "alice" else "alice"
        frame = sessions[step["from"]].encrypt(h(step["plaintext"]))
        assert sessions[receiver].decrypt(frame).data == h(step["plaintext"])
        frames.append(frame.hex())
    return {
        "root_certificate": world.root.public_bytes(Encoding.DER).hex(),
        "alice_certificate": world.certs["alice"].hex(),
        "bob_certificate": world.certs["bob"].hex(),
        "crl": world.crl.hex(),
        "bundle_frame": bundle_frame.hex(),
        "init_frame": initiated.frame.hex(),
        "transcript_hash": initiated.session.transcript.hex(),
        "frames": frames,
        "state_sha256": {name: hashlib.sha256(s.to_bytes()).hexdigest() for name, s in sessions.items()},
    }


def inverse_handshake(inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    """The stored bytes decode to the inputs: certificates verify and name the inputs' keys, the bundle frame
    carries the prekeys' public halves, bob decapsulates the stored KEM ciphertext to the stored secret and
    answers the stored INIT, and both sides decrypt the stored conversation frames to the script."""
    world = KatWorld(inputs)
    root = certs.load_certificate(h(outputs["root_certificate"]))
    for who in ("alice", "bob"):
        verified = certs.verify(h(outputs[f"{who}_certificate"]), root, world.now, expected_name=inputs[who]["name"])
        assert verified.public_key.public_bytes_raw() == world.identities[who].public_bytes
        assert verified.serial == inputs[who]["serial"]
    bundle = wire.decode(h(outputs["bundle_frame"]))
    assert isinstance(bundle, PrekeyBundle)
    p = inputs["bob_prekeys"]
    assert (bundle.spk_id, bundle.spk, bundle.kem_id, bundle.kem) == (
        p["spk_id"],
        world.spk.public,
        p["kem_id"],
        world.kem.public,
    )
    assert (bundle.otpk_id, bundle.otpk, bundle.created) == (p["otpk_id"], world.otpk.public, p["created"])
    handshake.verify_bundle(bundle, root=root, revocation=world.revocation, now=world.now, expected_name="bob")
    init = handshake.decode_init(h(outputs["init_frame"]))
    encapsulation = inputs["kem_encapsulation"]
    assert init.kem_ciphertext == h(encapsulation["ciphertext"])
    assert world.kem.decapsulate(init.kem_ciphertext) == h(encapsulation["shared_secret"])
    assert init.ephemeral == X25519KeyPair.from_private_bytes(h(inputs["alice_keygen"][0])).public
    responded = world.respond(h(outputs["init_frame"]), ListKeygen(inputs["bob_keygen"]))
    assert responded.first.data == h(inputs["first_message"])
    assert responded.session.transcript.hex() == outputs["transcript_hash"]
    assert responded.peer.der == h(outputs["alice_certificate"])
    # alice's session, rebuilt from the inputs alone (same seams), then both sides only receive.
    initiated = handshake.initiate(
        identity=world.identities["alice"],
        certificate=h(outputs["alice_certificate"]),
        bundle=bundle,
        root=root,
        revocation=world.revocation,
        now=world.now,
        expected_name="bob",
        first_message=h(inputs["first_message"]),
        keygen=ListKeygen(inputs["alice_keygen"]),
        kem_encaps=lambda public: (h(encapsulation["shared_secret"]), h(encapsulation["ciphertext"])),
    )
    sessions: dict[str, Session] = {"alice": initiated.session, "bob": responded.session}
    for step, frame in zip(inputs["script"], outputs["frames"], strict=True):
        receiver = "bob" if step["from"] == "alice" else "alice"
        assert sessions[receiver].decrypt(h(frame)).data == h(step["plaintext"])


# --- the registry and regeneration ----------------------------------------------------------------------------

KATS: dict[str, tuple[dict[str, Any], Callable[..., dict[str, Any]], Callable[..., None], str]] = {
    "keyschedule": (
        INPUTS_KEYSCHEDULE,
        compute_keyschedule,
        inverse_keyschedule,
        "kdf_rk, kdf_ck (one step and a chain), transcript_hash, message_nonce, root_key, labels",
    ),
    "frames": (
        INPUTS_FRAMES,
        compute_frames,
        inverse_frames,
        "encoded RatchetMessage, PrekeyBundle and InitMessage frames",
    ),
    "ratchet_conversation": (
        INPUTS_RATCHET,
        compute_ratchet,
        inverse_ratchet,
        "a Double Ratchet conversation from a fixed root key with fixed X25519 keys (keygen seam)",
    ),
    "handshake": (
        INPUTS_HANDSHAKE,
        compute_handshake,
        inverse_handshake,
        "a full HYBRID handshake with fixed keys, certificates, CRL and a recorded real ML-KEM encapsulation, "
        "then a conversation",
    ),
}


def kat_path(name: str) -> Path:
    return VECTORS / "kat" / f"{name}.json"


def generator_inputs(name: str) -> dict[str, Any]:
    """The generator's inputs; for the handshake, with the stored KEM encapsulation if it is still for the same
    KEM key, else a fresh one from a real encapsulation."""
    inputs = json.loads(json.dumps(KATS[name][0]))
    if name == "handshake":
        path = kat_path(name)
        stored = json.loads(path.read_text())["inputs"] if path.exists() else None
        if stored is not None and stored["bob_prekeys"]["kem_seed"] == inputs["bob_prekeys"]["kem_seed"]:
            inputs["kem_encapsulation"] = stored["kem_encapsulation"]
        else:
            secret, ciphertext = kem_encapsulate(KemKeyPair.from_seed(h(inputs["bob_prekeys"]["kem_seed"])).public)
            inputs["kem_encapsulation"] = {"shared_secret": secret.hex(), "ciphertext": ciphertext.hex()}
    return inputs


def regenerate(name: str) -> None:
    """Rewrite one KAT file from its generator (deliberately: KMSNET_REGEN_VECTORS=1)."""
    inputs = generator_inputs(name)
    _, compute, _, what = KATS[name]
    document = {
        "description": f"kmsnet known-answer vector: {what}. Generated by tests/protocol/test_vectors.py "
        "(KMSNET_REGEN_VECTORS=1 to regenerate); all byte strings are hex.",
        "inputs": inputs,
        "outputs": compute(inputs),
    }
    kat_path(name).parent.mkdir(parents=True, exist_ok=True)
    kat_path(name).write_text(json.dumps(document, indent=2) + "\n")


@pytest.fixture(scope="module", autouse=True)
def _regenerate_if_asked() -> None:
    if REGEN:
        for name in KATS:
            regenerate(name)


# ======================================================================================================
# Our known-answer vectors: the checks
# ======================================================================================================


@pytest.mark.parametrize("name", list(KATS))
def test_kat_forward(name: str) -> None:
    """Computing from the stored inputs gives exactly the stored outputs."""
    vector = json.loads(kat_path(name).read_text())
    _, compute, _, _ = KATS[name]
    assert json.loads(json.dumps(compute(vector["inputs"]))) == vector["outputs"]


@pytest.mark.parametrize("name", list(KATS))
def test_kat_inverse(name: str) -> None:
    """Decoding / decrypting the stored outputs gives back the inputs."""
    vector = json.loads(kat_path(name).read_text())
    _, _, inverse, _ = KATS[name]
    inverse(vector["inputs"], vector["outputs"])


@pytest.mark.parametrize("name", list(KATS))
def test_kat_file_matches_its_generator(name: str) -> None:
    """The stored inputs are the generator's: regenerating would not silently change the vector."""
    vector = json.loads(kat_path(name).read_text())
    assert vector["inputs"] == generator_inputs(name)


def test_kat_handshake_encapsulation_is_a_real_one() -> None:
    """The recorded encapsulation is an ML-KEM-768 ciphertext for bob's KEM prekey (not a stub)."""
    inputs = json.loads(kat_path("handshake").read_text())["inputs"]
    kem = KemKeyPair.from_seed(h(inputs["bob_prekeys"]["kem_seed"]))
    encapsulation = inputs["kem_encapsulation"]
    assert len(h(encapsulation["ciphertext"])) == 1088
    assert kem.decapsulate(h(encapsulation["ciphertext"])) == h(encapsulation["shared_secret"])
    assert KemKeyPair.generate().decapsulate(h(encapsulation["ciphertext"])) != h(encapsulation["shared_secret"])


def test_kat_handshake_suite_and_onetime_prekey() -> None:
    outputs = json.loads(kat_path("handshake").read_text())["outputs"]
    init = handshake.decode_init(h(outputs["init_frame"]))
    assert init.suite == Suite.HYBRID and init.otpk_id == 1 and init.signature is not None


def test_kat_keygen_lists_are_used_up_exactly_as_recorded() -> None:
    """The keygen seams draw the recorded keys in order (so the vectors exercise every DH step)."""
    inputs = json.loads(kat_path("ratchet_conversation").read_text())["inputs"]
    sides = ratchet_pair(inputs)
    ad = h(inputs["ad"])
    for step in inputs["script"]:
        receiver = "bob" if step["from"] == "alice" else "alice"
        sides[receiver].decrypt(sides[step["from"]].encrypt(h(step["plaintext"]), ad), ad)
    alice_keygen = sides["alice"]._keygen
    bob_keygen = sides["bob"]._keygen
    assert isinstance(alice_keygen, ListKeygen) and isinstance(bob_keygen, ListKeygen)
    assert (alice_keygen.used, bob_keygen.used) == (2, 3)  # alice: 2 DH steps; bob: initial key + 2 DH steps
