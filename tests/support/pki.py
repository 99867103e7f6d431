"""The one test PKI and its one "now": a CA, enrolled identities (alice, bob, mallory), CRLs, prekeys,
certificate-profile builders and a little DER surgery.

Everything is deterministic (keys from fixed seeds, a fixed `NOW`) so that failures reproduce.
The builders (`Ca`, `Node`, `Prekeys`, `make_prekeys`, `establish`) are plain classes and functions,
usable from fixtures (tests/conftest.py wraps them), from hypothesis state machines and from helpers
alike."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol import certs, handshake, wire
from protocol.identity import IdentityKey, KemKeyPair, X25519KeyPair
from protocol.messages import OneTimePrekey, PrekeyBundle, Suite
from protocol.revocation import RevocationState, RevokedEntry, issue_crl

#: The fixed "current time" of every test that does not run on the real clock.
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
WEEK = timedelta(days=7)
YEAR = timedelta(days=365)


def seeded(label: str, size: int = 32) -> bytes:
    """Deterministic key material: SHA-512 of a label, cut to `size` bytes (at most 64)."""
    return hashlib.sha512(b"kmsnet-test/" + label.encode()).digest()[:size]


def x25519(label: str) -> X25519KeyPair:
    """A deterministic X25519 key pair."""
    return X25519KeyPair.from_private_bytes(seeded(label))


def kem_pair(label: str) -> KemKeyPair:
    """A deterministic ML-KEM-768 key pair."""
    return KemKeyPair.from_seed(seeded(label, 64))


def ed_key(seed: int) -> Ed25519PrivateKey:
    """A deterministic Ed25519 key numbered `seed` (`Ca.node` gives serial n the key `ed_key(n + 1000)`)."""
    return Ed25519PrivateKey.from_private_bytes(seeded(f"ed25519/{seed}"))


def ec_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key (for refusals of a key type the profile does not allow)."""
    return ec.generate_private_key(ec.SECP256R1())


def cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class Node:
    """An enrolled identity: its name, Ed25519 identity key and DER certificate."""

    name: str
    identity: IdentityKey
    cert: bytes
    serial: int

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the DER certificate (what INIT frames address)."""
        return hashlib.sha256(self.cert).digest()


class Ca:
    """A test CA: an Ed25519 root, node enrolment and CRLs (through `protocol.certs` / `protocol.revocation`)."""

    def __init__(
        self,
        name: str = "kmsnet-test-ca",
        seed: str = "ca",
        *,
        not_before: datetime = NOW - YEAR,
        not_after: datetime = NOW + 20 * YEAR,
    ) -> None:
        self.name = name
        self.key = Ed25519PrivateKey.from_private_bytes(seeded(seed))
        self.root: x509.Certificate = certs.make_root(
            key=self.key, name=name, serial=1, not_before=not_before, not_after=not_after
        )

    def enrol(
        self,
        name: str,
        serial: int,
        *,
        identity: IdentityKey | None = None,
        not_before: datetime = NOW - DAY,
        not_after: datetime = NOW + YEAR,
    ) -> Node:
        """Issue a node certificate for `name` (identity key derived from the name unless given)."""
        identity = identity or IdentityKey.from_private_bytes(seeded(f"identity/{name}/{serial}"))
        cert = certs.issue(
            ca_key=self.key,
            ca_cert=self.root,
            subject_name=name,
            public_key=identity.public,
            serial=serial,
            not_before=not_before,
            not_after=not_after,
        )
        return Node(name, identity, cert.public_bytes(Encoding.DER), serial)

    def crl(
        self,
        revoked: Iterable[int] = (),
        *,
        number: int = 1,
        this_update: datetime = NOW - HOUR,
        next_update: datetime = NOW + DAY,
        reason: str = "key-compromise",
    ) -> bytes:
        """A signed CRL (DER) revoking `revoked` serials."""
        entries = [RevokedEntry(serial, this_update, reason) for serial in revoked]
        return issue_crl(
            ca_key=self.key,
            ca_cert=self.root,
            number=number,
            this_update=this_update,
            next_update=next_update,
            revoked=entries,
        )

    def revocation(
        self,
        revoked: Iterable[int] = (),
        *,
        now: datetime = NOW,
        this_update: datetime = NOW - HOUR,
        next_update: datetime = NOW + DAY,
    ) -> RevocationState:
        """A fresh RevocationState that accepted one CRL (by default empty, fresh at NOW)."""
        state = RevocationState()
        state.accept(self.crl(revoked, this_update=this_update, next_update=next_update), self.root, now)
        return state

    def node(
        self,
        name: str,
        *,
        serial: int = 100,
        key: Ed25519PrivateKey | None = None,
        not_before: datetime = NOW - DAY,
        not_after: datetime = NOW + YEAR,
    ) -> tuple[Ed25519PrivateKey, x509.Certificate]:
        """A node certificate as `cryptography` objects, with its key (`ed_key(serial + 1000)` unless given)."""
        key = key or ed_key(serial + 1000)
        cert = certs.issue(
            ca_key=self.key,
            ca_cert=self.root,
            subject_name=name,
            public_key=key.public_key(),
            serial=serial,
            not_before=not_before,
            not_after=not_after,
        )
        return key, cert

    def signed_crl(
        self,
        number: int,
        revoked: Iterable[RevokedEntry] = (),
        *,
        this_update: datetime = NOW,
        next_update: datetime = NOW + DAY,
    ) -> bytes:
        """CRL number `number` (DER) with exactly these entries."""
        return issue_crl(
            ca_key=self.key,
            ca_cert=self.root,
            number=number,
            this_update=this_update,
            next_update=next_update,
            revoked=revoked,
        )

    def custom(
        self,
        *,
        subject: x509.Name,
        public_key: Ed25519PublicKey | ec.EllipticCurvePublicKey,
        extensions: Sequence[tuple[x509.ExtensionType, bool]],
        serial: int = 500,
        not_before: datetime = NOW - DAY,
        not_after: datetime = NOW + YEAR,
    ) -> x509.Certificate:
        """A certificate signed by this CA with exactly the given extensions (for refusal tests)."""
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.root.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )
        for value, critical in extensions:
            builder = builder.add_extension(value, critical=critical)
        return builder.sign(self.key, None)


@dataclass
class Prekeys:
    """A responder's prekeys: the private side (`secrets`), the signed bundle, unhanded one-time prekeys."""

    owner: Node
    secrets: handshake.PrekeySecrets
    bundle: PrekeyBundle
    spk: X25519KeyPair
    kem: KemKeyPair | None
    onetime: dict[int, OneTimePrekey] = field(default_factory=dict)
    onetime_keys: dict[int, X25519KeyPair] = field(default_factory=dict)

    def fetch(self, *, with_onetime: bool = True) -> PrekeyBundle:
        """What a relay hands an initiator: the bundle plus the lowest unhanded one-time prekey (if any),
        round-tripped through the wire codec as it would be on the network."""
        onetime = None
        if with_onetime and self.onetime:
            onetime = self.onetime.pop(min(self.onetime))
        frame = wire.decode(wire.encode(self.bundle.with_onetime(onetime)))
        assert isinstance(frame, PrekeyBundle)
        return frame


def make_prekeys(
    owner: Node,
    *,
    kem: bool = True,
    onetime: int = 3,
    spk_id: int = 1,
    kem_id: int = 1,
    created: int = int((NOW - HOUR).timestamp()),
    label: str = "",
) -> Prekeys:
    """Deterministic prekeys for `owner`: a signed X25519 prekey, an ML-KEM prekey (unless `kem` is
    False: a CLASSIC bundle) and `onetime` signed one-time prekeys with ids 1..onetime."""
    tag = f"{owner.name}/{label}"
    spk = x25519(f"spk/{tag}/{spk_id}")
    kem_key = kem_pair(f"kem/{tag}/{kem_id}") if kem else None
    secrets = handshake.PrekeySecrets()
    secrets.add_signed(spk_id, spk)
    if kem_key is not None:
        secrets.add_kem(kem_id, kem_key)
    bundle = handshake.make_bundle(
        owner.identity,
        owner.cert,
        created=created,
        spk_id=spk_id,
        spk=spk,
        kem_id=kem_id if kem else None,
        kem=kem_key,
    )
    out = Prekeys(owner, secrets, bundle, spk, kem_key)
    for key_id in range(1, onetime + 1):
        key = x25519(f"otpk/{tag}/{key_id}")
        secrets.add_onetime(key_id, key)
        out.onetime[key_id] = handshake.make_onetime(owner.identity, owner.cert, key_id, key)
        out.onetime_keys[key_id] = key
    return out


def stored(secrets: handshake.PrekeySecrets) -> tuple[bytes, dict[tuple[str, str], bytes]]:
    """A prekey account as a node stores it: the account record and every replay-cache entry."""
    return secrets.to_bytes(), secrets.replay_records()


def reloaded(secrets: handshake.PrekeySecrets) -> handshake.PrekeySecrets:
    """`secrets` restored from what a node stores of it (`stored`)."""
    account, entries = stored(secrets)
    return handshake.PrekeySecrets.from_bytes(account, [(name, value) for (_, name), value in entries.items()])


def establish(
    ca: Ca,
    initiator: Node,
    prekeys: Prekeys,
    *,
    revocation: handshake.RevocationCheck | None = None,
    now: datetime = NOW,
    first: bytes = b"hello",
    suite: Suite = Suite.HYBRID,
    allowed: Sequence[Suite] = (Suite.HYBRID,),
    with_onetime: bool = True,
) -> tuple[handshake.Initiated, handshake.Responded]:
    """A complete, real handshake from `initiator` to the owner of `prekeys`."""
    revocation = revocation or ca.revocation(now=now)
    bundle = prekeys.fetch(with_onetime=with_onetime)
    initiated = handshake.initiate(
        identity=initiator.identity,
        certificate=initiator.cert,
        bundle=bundle,
        root=ca.root,
        revocation=revocation,
        now=now,
        expected_name=prekeys.owner.name,
        first_message=first,
        suite=suite,
    )
    responded = handshake.respond(
        handshake.decode_init(initiated.frame),
        identity=prekeys.owner.identity,
        certificate_fingerprint=prekeys.owner.fingerprint,
        bundle=prekeys.bundle,
        prekeys=prekeys.secrets,
        root=ca.root,
        revocation=revocation,
        now=now,
        allowed_suites=allowed,
    )
    return initiated, responded


# --- certificate profiles and DER surgery ----------------------------------------------------------


def key_usage(**flags: bool) -> x509.KeyUsage:
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{n: flags.get(n, False) for n in names})


def leaf_extensions(
    *,
    bc: x509.BasicConstraints | None = None,
    ku: x509.KeyUsage | None = None,
    eku: x509.ExtendedKeyUsage | None = None,
    drop: Sequence[type] = (),
) -> list[tuple[x509.ExtensionType, bool]]:
    """The extensions `certs.issue` would add, with replacements or omissions."""
    exts: list[tuple[x509.ExtensionType, bool]] = [
        (bc or x509.BasicConstraints(ca=False, path_length=None), True),
        (ku or key_usage(digital_signature=True), True),
        (eku or x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ]
    return [(v, c) for v, c in exts if type(v) not in drop]


ED25519_ALG = bytes.fromhex("300506032b6570")


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def split(data: bytes) -> list[bytes]:
    """Split concatenated DER TLVs into whole TLVs."""
    out = []
    i = 0
    while i < len(data):
        first = data[i + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            k = first & 0x7F
            header, length = 2 + k, int.from_bytes(data[i + 2 : i + 2 + k], "big")
        out.append(data[i : i + header + length])
        i += header + length
    return out


def split_one(item: bytes) -> tuple[int, bytes]:
    """A single TLV's tag and content octets."""
    first = item[1]
    header = 2 if first < 0x80 else 2 + (first & 0x7F)
    return item[0], item[header:]


def resign(tbs: bytes, key: Ed25519PrivateKey) -> bytes:
    """Wrap a (possibly edited) TBS certificate or TBS CRL with an Ed25519 signature by `key`."""
    signature = key.sign(tbs)
    return tlv(0x30, tbs + ED25519_ALG + tlv(0x03, b"\x00" + signature))


# --- module-level singletons (cheap to share: immutable) ------------------------------------------

CA = Ca()
ROGUE_CA = Ca(name="kmsnet-test-ca", seed="rogue-ca")  # same name, other key: a lookalike CA
ALICE = CA.enrol("alice", 0x1001)
BOB = CA.enrol("bob", 0x1002)
MALLORY = CA.enrol("mallory", 0x1003)
