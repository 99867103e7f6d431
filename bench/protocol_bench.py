"""Protocol benchmark: our code side by side with the primitive floor, measured in the same run.

The floor of an operation is the cost of the `cryptography` / msgpack calls it cannot avoid,
timed bare; the ratio (ours / floor) is our orchestration overhead. Every figure is the best
of several repeats (the least disturbed by the machine), in microseconds per operation.

Output: a table, then one JSON line per figure: {"name", "value", "unit", "floor", "ratio"}.
Run with `make bench` (or `python bench/protocol_bench.py [--quick]`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding

from protocol import certs, handshake, revocation
from protocol.identity import IdentityKey, KemKeyPair, X25519KeyPair
from protocol.session import Session

NOW = datetime(2026, 1, 1, tzinfo=UTC)
PAYLOAD = os.urandom(1024)
SHA256 = hashes.SHA256()


def best(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Best-of-`repeat` microseconds per call of `fn`, `number` calls per repeat."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return min(times) * 1e6


# --- primitives -----------------------------------------------------------------------------------

KEY = os.urandom(32)
NONCE = bytes(12)
AAD = os.urandom(73)
CT = AESGCM(KEY).encrypt(NONCE, PAYLOAD, AAD)
X_PRIV = X25519PrivateKey.generate()
X_PUB = X25519PrivateKey.generate().public_key().public_bytes_raw()
ED = Ed25519PrivateKey.generate()
ED_PUB = ED.public_key()
SIG = ED.sign(b"m" * 100)
KEM = MLKEM768PrivateKey.generate()
KEM_PUB = KEM.public_key().public_bytes_raw()
KEM_CT = KEM.public_key().encapsulate()[1]


def p_hmac() -> None:
    m = hmac.HMAC(KEY, SHA256)
    m.update(b"\x01")
    m.finalize()


def p_aes_encrypt() -> None:
    AESGCM(KEY).encrypt(NONCE, PAYLOAD, AAD)


def p_aes_decrypt() -> None:
    AESGCM(KEY).decrypt(NONCE, CT, AAD)


def p_msgpack() -> None:
    msgpack.unpackb(msgpack.packb((1, 1, KEY, 0, 5, CT)))


def p_x25519_keygen() -> None:
    X25519PrivateKey.generate().public_key().public_bytes_raw()


def p_x25519_exchange() -> None:
    X_PRIV.exchange(X25519PublicKey.from_public_bytes(X_PUB))


def p_hkdf() -> None:
    HKDF(algorithm=SHA256, length=64, salt=KEY, info=b"info").derive(KEY)


def p_ed25519_sign() -> None:
    ED.sign(b"m" * 100)


def p_ed25519_verify() -> None:
    ED_PUB.verify(SIG, b"m" * 100)


def p_mlkem_encaps() -> None:
    MLKEM768PublicKey.from_public_bytes(KEM_PUB).encapsulate()


def p_mlkem_decaps() -> None:
    KEM.decapsulate(KEM_CT)


# --- our code -------------------------------------------------------------------------------------


class World:
    """A CA, two enrolled identities, a CRL of 1,000 revoked serials, and a prekey supply."""

    def __init__(self) -> None:
        self.ca_key = Ed25519PrivateKey.generate()
        self.root = certs.make_root(
            key=self.ca_key,
            name="bench-ca",
            serial=1,
            not_before=NOW - timedelta(days=1),
            not_after=NOW + timedelta(days=365),
        )
        self.alice, self.alice_cert = self.enrol("alice", 100_001)
        self.bob, self.bob_cert = self.enrol("bob", 100_002)
        self.bob_fp = hashlib.sha256(self.bob_cert).digest()
        revoked = [revocation.RevokedEntry(s, NOW - timedelta(hours=1), "key-compromise") for s in range(2, 1002)]
        crl = revocation.issue_crl(
            ca_key=self.ca_key,
            ca_cert=self.root,
            number=1,
            this_update=NOW - timedelta(minutes=1),
            next_update=NOW + timedelta(days=1),
            revoked=revoked,
        )
        self.revocation = revocation.RevocationState()
        self.revocation.accept(crl, self.root, NOW)
        self.spk = X25519KeyPair.generate()
        self.kem = KemKeyPair.generate()
        self.bundle = handshake.make_bundle(
            self.bob, self.bob_cert, created=int(NOW.timestamp()), spk_id=1, spk=self.spk, kem_id=1, kem=self.kem
        )

    def enrol(self, name: str, serial: int) -> tuple[IdentityKey, bytes]:
        key = IdentityKey.generate()
        cert = certs.issue(
            ca_key=self.ca_key,
            ca_cert=self.root,
            subject_name=name,
            public_key=key.public,
            serial=serial,
            not_before=NOW - timedelta(hours=1),
            not_after=NOW + timedelta(days=7),
        )
        return key, cert.public_bytes(Encoding.DER)

    def prekeys(self, count: int) -> tuple[handshake.PrekeySecrets, list[handshake.PrekeyBundle]]:
        """Fresh prekey secrets with `count` one-time prekeys, and one fetched bundle per prekey."""
        secrets = handshake.PrekeySecrets()
        secrets.add_signed(1, self.spk)
        secrets.add_kem(1, self.kem)
        bundles = []
        for i in range(1, count + 1):
            otpk = X25519KeyPair.generate()
            secrets.add_onetime(i, otpk)
            bundles.append(self.bundle.with_onetime(handshake.make_onetime(self.bob, self.bob_cert, i, otpk)))
        return secrets, bundles

    def handshake(self, secrets: handshake.PrekeySecrets, bundle: handshake.PrekeyBundle) -> tuple[Session, Session]:
        """Both sides of a full hybrid handshake, certificate and CRL checks included."""
        out = handshake.initiate(
            identity=self.alice,
            certificate=self.alice_cert,
            bundle=bundle,
            root=self.root,
            revocation=self.revocation,
            now=NOW,
            expected_name="bob",
            first_message=PAYLOAD,
        )
        got = handshake.respond(
            handshake.decode_init(out.frame),
            identity=self.bob,
            certificate_fingerprint=self.bob_fp,
            bundle=self.bundle,
            prekeys=secrets,
            root=self.root,
            revocation=self.revocation,
            now=NOW,
        )
        return out.session, got.session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run, noisier figures)")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    n_fast, n_slow, n_hs, repeat = 20_000 // scale, 2_000 // scale, 200 // scale, 5

    world = World()
    # Ed25519 verification cost grows with the message (SHA-512 inside), so the floor verifies what
    # the handshake verifies: a real certificate's signed part, a real bundle's signed bytes (~1.3 KB,
    # the ML-KEM key inside) and a short message for the one-time prekey and the transcript.
    cert = x509.load_der_x509_certificate(world.alice_cert)
    root_key = world.root.public_key()
    assert isinstance(root_key, Ed25519PublicKey)
    bundle_bytes = handshake.bundle_signed_bytes(world.bob_fp, 1, 1, world.spk.public, 1, world.kem.public)
    bundle_sig = world.bob.sign(bundle_bytes)

    def p_verify_certificate() -> None:
        root_key.verify(cert.signature, cert.tbs_certificate_bytes)

    def p_verify_bundle() -> None:
        world.bob.public.verify(bundle_sig, bundle_bytes)

    prim = {
        "hmac_sha256": best(p_hmac, n_fast, repeat),
        "aes256gcm_encrypt_1k": best(p_aes_encrypt, n_fast, repeat),
        "aes256gcm_decrypt_1k": best(p_aes_decrypt, n_fast, repeat),
        "msgpack_pack_unpack": best(p_msgpack, n_fast, repeat),
        "x25519_keygen": best(p_x25519_keygen, n_slow, repeat),
        "x25519_exchange": best(p_x25519_exchange, n_slow, repeat),
        "hkdf_sha256": best(p_hkdf, n_fast, repeat),
        "ed25519_sign": best(p_ed25519_sign, n_slow, repeat),
        "ed25519_verify_100b": best(p_ed25519_verify, n_slow, repeat),
        "ed25519_verify_certificate": best(p_verify_certificate, n_slow, repeat),
        "ed25519_verify_bundle": best(p_verify_bundle, n_slow, repeat),
        "mlkem768_encaps": best(p_mlkem_encaps, n_slow, repeat),
        "mlkem768_decaps": best(p_mlkem_decaps, n_slow, repeat),
    }
    msg_floor = (
        2 * prim["hmac_sha256"]
        + prim["aes256gcm_encrypt_1k"]
        + prim["aes256gcm_decrypt_1k"]
        + prim["msgpack_pack_unpack"]
    )
    step_floor = prim["x25519_keygen"] + 2 * prim["x25519_exchange"] + prim["hkdf_sha256"] + msg_floor
    # What a handshake cannot avoid, both sides: initiator verifies the certificate, the bundle and the
    # one-time prekey (3 Ed25519 verifies), makes an ephemeral, does 2 X25519 and an ML-KEM encapsulation,
    # signs the transcript, runs HKDF twice (root, first chain) and sends message 0; the responder
    # verifies the certificate and the transcript (2 verifies), does 2 X25519 and a decapsulation, HKDF
    # for the root, then the first DH-ratchet step (keygen, exchange, 2 HKDF) and decrypts message 0.
    # The CRL was verified when it arrived; per handshake the revocation check is a set lookup.
    hs_floor = (
        2 * prim["ed25519_verify_certificate"]
        + prim["ed25519_verify_bundle"]
        + 2 * prim["ed25519_verify_100b"]
        + prim["ed25519_sign"]
        + 2 * prim["x25519_keygen"]
        + 5 * prim["x25519_exchange"]
        + prim["mlkem768_encaps"]
        + prim["mlkem768_decaps"]
        + 5 * prim["hkdf_sha256"]
        + msg_floor
    )

    secrets, bundles = world.prekeys(1)
    a, b = world.handshake(secrets, bundles[0])
    b.decrypt(a.encrypt(b"warm"))

    def one_way() -> None:
        b.decrypt(a.encrypt(PAYLOAD))

    def alternating() -> None:
        b.decrypt(a.encrypt(PAYLOAD))
        a.decrypt(b.encrypt(PAYLOAD))

    ours = {
        "ratchet_one_way_1k": (best(one_way, n_fast, repeat), msg_floor),
        "ratchet_alternating_1k": (best(alternating, n_slow, repeat) / 2, step_floor),
    }
    hs_times = []
    for _ in range(repeat):
        secrets, bundles = world.prekeys(n_hs)
        start = time.perf_counter()
        for bundle in bundles:
            world.handshake(secrets, bundle)
        hs_times.append((time.perf_counter() - start) / n_hs)
    ours["hybrid_handshake_both_sides"] = (min(hs_times) * 1e6, hs_floor)

    rows = [(name, value, None) for name, value in prim.items()]
    rows += [(name, value, floor) for name, (value, floor) in ours.items()]
    print(f"{'figure':34} {'us/op':>10} {'floor us':>10} {'ratio':>7}")
    for name, value, floor in rows:
        ratio = f"{value / floor:7.2f}" if floor else ""
        print(f"{name:34} {value:10.2f} {floor or 0:10.2f} {ratio}" if floor else f"{name:34} {value:10.2f}")
    for name, value, floor in rows:
        print(
            json.dumps(
                {
                    "name": name,
                    "value": round(value, 3),
                    "unit": "us/op",
                    "floor": round(floor, 3) if floor else None,
                    "ratio": round(value / floor, 3) if floor else None,
                }
            )
        )


if __name__ == "__main__":
    main()
