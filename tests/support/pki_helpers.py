"""A small test PKI: a deterministic CA, node certificates, CRLs, and a little DER surgery.

Shared by test_certs.py and test_revocation.py (protocol.crl, protocol.ocsp). Keys come from fixed
seeds so failures reproduce.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol import certs
from protocol.crl import RevokedEntry, issue_crl

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)
YEAR = timedelta(days=365)
CA_NAME = "kmsnet-ca"


def ed_key(seed: int) -> Ed25519PrivateKey:
    """A deterministic Ed25519 key."""
    return Ed25519PrivateKey.from_private_bytes(seed.to_bytes(32, "big"))


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class Pki:
    """A CA: its key and self-signed root, and helpers to issue from it."""

    key: Ed25519PrivateKey
    root: x509.Certificate

    def node(
        self,
        name: str,
        *,
        serial: int = 100,
        key: Ed25519PrivateKey | None = None,
        not_before: datetime = NOW - DAY,
        not_after: datetime = NOW + YEAR,
    ) -> tuple[Ed25519PrivateKey, x509.Certificate]:
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

    def crl(
        self,
        number: int,
        revoked: Iterable[RevokedEntry] = (),
        *,
        this_update: datetime = NOW,
        next_update: datetime = NOW + DAY,
    ) -> bytes:
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


def make_pki(name: str = CA_NAME, seed: int = 1) -> Pki:
    key = ed_key(seed)
    root = certs.make_root(key=key, name=name, serial=1, not_before=NOW - YEAR, not_after=NOW + 20 * YEAR)
    return Pki(key, root)


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


# --- DER surgery --------------------------------------------------------------------------------

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
