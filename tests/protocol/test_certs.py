"""protocol.certs: issuing and verifying the CA root, node certificates and the relay's TLS certificate."""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import certs
from protocol.certs import CLOCK_SKEW, VerifiedCertificate, verify
from protocol.errors import (
    CertificateConstraintError,
    CertificateError,
    CertificateExpired,
    CertificateNotYetValid,
    DecodeError,
    LocalError,
    NameMismatch,
    UntrustedIssuer,
)
from tests.support.pki import (
    DAY,
    NOW,
    YEAR,
    Ca,
    cn,
    der,
    ec_key,
    ed_key,
    key_usage,
    leaf_extensions,
    resign,
    split,
    split_one,
    tlv,
)

SECOND = timedelta(seconds=1)
# A Name whose CN value has tag 13 (RELATIVE-OID): the outer DER is fine, the attribute is not.
GARBLED_NAME = tlv(0x30, tlv(0x31, tlv(0x30, bytes.fromhex("0603550403") + tlv(0x0D, b"a"))))


@pytest.fixture(scope="module")
def pki() -> Ca:
    return Ca()


@pytest.fixture(scope="module")
def alice(pki: Ca) -> x509.Certificate:
    return pki.node("alice", serial=0x1234)[1]


# --- make_root / issue ------------------------------------------------------------------------------


def test_root_is_a_path_length_zero_ca(pki: Ca) -> None:
    root = pki.root
    assert root.subject == root.issuer == cn(pki.name)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(pki.key.public_key())
    root.verify_directly_issued_by(root)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": ""},
        {"name": "x" * 65},
        {"serial": 0},
        {"serial": 2**159},
        {"serial": True},
        {"not_after": NOW - DAY},
        {"not_before": NOW.replace(tzinfo=None)},
    ],
)
def test_make_root_refuses_bad_arguments(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"key": ed_key(1), "name": "ca", "serial": 1, "not_before": NOW, "not_after": NOW + DAY}
    args.update(kwargs)
    with pytest.raises(LocalError):
        certs.make_root(**args)  # type: ignore[arg-type]


def test_node_certificate_profile(pki: Ca, alice: x509.Certificate) -> None:
    assert alice.subject == cn("alice")
    assert alice.issuer == pki.root.subject
    ext = alice.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value == key_usage(digital_signature=True)
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = pki.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        ed_key(0x1234 + 1000).public_key()
    )


def test_issue_without_root_ski_falls_back_to_the_key(pki: Ca) -> None:
    bare_root = (
        x509.CertificateBuilder()
        .subject_name(cn("bare"))
        .issuer_name(cn("bare"))
        .public_key(pki.key.public_key())
        .serial_number(9)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + YEAR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(pki.key, None)
    )
    cert = certs.issue(
        ca_key=pki.key,
        ca_cert=bare_root,
        subject_name="bob",
        public_key=ed_key(7).public_key(),
        serial=7,
        not_before=NOW - DAY,
        not_after=NOW + DAY,
    )
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki == x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.key.public_key())
    assert verify(cert, bare_root, NOW).name == "bob"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"subject_name": "Alice"}, "node name"),
        ({"subject_name": ""}, "node name"),
        ({"subject_name": "-x"}, "node name"),
        ({"public_key": X25519PrivateKey.from_private_bytes(b"\1" * 32).public_key()}, "Ed25519"),
        ({"ca_key": ed_key(99)}, "does not belong"),
        ({"serial": -1}, "serial"),
        ({"not_before": NOW + DAY}, "not before"),
    ],
)
def test_issue_refuses_bad_arguments(pki: Ca, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "ca_key": pki.key,
        "ca_cert": pki.root,
        "subject_name": "ok",
        "public_key": ed_key(5).public_key(),
        "serial": 5,
        "not_before": NOW,
        "not_after": NOW + DAY,
    }
    args.update(kwargs)
    with pytest.raises(LocalError, match=match):
        certs.issue(**args)  # type: ignore[arg-type]


# --- node names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "0", "alice", "node-7", "a.b_c-d", "x" * 64, "9lives"])
def test_valid_node_names(name: str) -> None:
    assert certs.validate_node_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "Alice", ".a", "-a", "_a", "a b", "a/b", "é", "a\n", 7, None])
def test_invalid_node_names(name: object) -> None:
    with pytest.raises(LocalError):
        certs.validate_node_name(name)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=70))
def test_node_name_validation_matches_the_grammar(name: str) -> None:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789._-")
    ok = 1 <= len(name) <= 64 and set(name) <= allowed and name[0] not in "._-"
    if ok:
        assert certs.validate_node_name(name) == name
    else:
        with pytest.raises(LocalError):
            certs.validate_node_name(name)


# --- verify: the happy path ------------------------------------------------------------------------


def test_verify_returns_the_verified_facts(pki: Ca, alice: x509.Certificate) -> None:
    v = verify(alice, pki.root, NOW, expected_name="alice")
    assert v.name == "alice"
    assert v.serial == 0x1234
    assert v.public_key == ed_key(0x1234 + 1000).public_key()
    assert v.not_before == alice.not_valid_before_utc
    assert v.not_after == alice.not_valid_after_utc
    assert v.der == der(alice)
    assert v.fingerprint == certs.fingerprint(alice) == alice.fingerprint(hashes.SHA256())
    assert len(v.fingerprint) == 32
    assert verify(der(alice), pki.root, NOW) == v
    assert hash(verify(der(alice), pki.root, NOW)) == hash(v)


def test_verified_repr_shows_name_serial_fingerprint_only(pki: Ca, alice: x509.Certificate) -> None:
    v = verify(alice, pki.root, NOW)
    text = repr(v)
    assert text == f"VerifiedCertificate(name='alice', serial=0x1234, fingerprint={v.fingerprint.hex()})"
    assert v.der.hex() not in text


def test_verified_certificate_cannot_be_forged(pki: Ca, alice: x509.Certificate) -> None:
    v = verify(alice, pki.root, NOW)
    fields = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
    with pytest.raises(LocalError):
        VerifiedCertificate(**fields)
    with pytest.raises(LocalError):
        VerifiedCertificate(**fields, _mint=object())
    with pytest.raises(LocalError):
        dataclasses.replace(v, name="mallory")
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.name = "mallory"  # type: ignore[misc]


def test_verify_refuses_naive_now(pki: Ca, alice: x509.Certificate) -> None:
    with pytest.raises(LocalError):
        verify(alice, pki.root, NOW.replace(tzinfo=None))


def test_verify_accepts_any_aware_timezone(pki: Ca, alice: x509.Certificate) -> None:
    from datetime import timezone

    assert verify(alice, pki.root, NOW.astimezone(timezone(timedelta(hours=-7)))).name == "alice"


# --- verify: parsing and issuer --------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x30\x03\x02\x01\x01", b"-----BEGIN CERTIFICATE-----"])
def test_garbage_bytes_are_decode_errors(pki: Ca, data: bytes) -> None:
    with pytest.raises(DecodeError):
        verify(data, pki.root, NOW)


def test_invalid_version_is_a_decode_error(pki: Ca, alice: x509.Certificate) -> None:
    # InvalidVersion is not a ValueError in cryptography; it must still come out as DecodeError.
    data = der(alice).replace(bytes.fromhex("a003020102"), bytes.fromhex("a003020107"), 1)
    with pytest.raises(DecodeError, match="version"):
        verify(data, pki.root, NOW)
    with pytest.raises(DecodeError, match="version"):
        certs.load_certificate(data)


def test_garbled_issuer_is_a_decode_error(pki: Ca, alice: x509.Certificate) -> None:
    tag, body = split_one(alice.tbs_certificate_bytes)
    parts = split(body)
    assert parts[3] == pki.root.subject.public_bytes()
    parts[3] = GARBLED_NAME
    with pytest.raises(DecodeError, match="issuer"):
        verify(resign(tlv(tag, b"".join(parts)), pki.key), pki.root, NOW)


def test_trailing_bytes_are_refused(pki: Ca, alice: x509.Certificate) -> None:
    with pytest.raises(DecodeError):
        verify(der(alice) + b"\0", pki.root, NOW)


def test_rogue_ca_with_the_same_name_is_untrusted(pki: Ca) -> None:
    rogue = Ca(seed="rogue-ca")
    assert rogue.root.subject == pki.root.subject
    _, forged = rogue.node("alice")
    with pytest.raises(UntrustedIssuer, match="signature"):
        verify(forged, pki.root, NOW)


def test_other_issuer_name_is_untrusted(pki: Ca) -> None:
    other = Ca(name="other-ca")  # same key, other name
    _, cert = other.node("alice")
    with pytest.raises(UntrustedIssuer, match="not the pinned root"):
        verify(cert, pki.root, NOW)


@pytest.mark.filterwarnings("ignore:Parsed a serial number")
def test_every_single_bit_flip_is_refused(pki: Ca, alice: x509.Certificate) -> None:
    data = der(alice)
    outcomes: dict[str, int] = {}
    for i in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises((DecodeError, CertificateError)) as info:
            verify(bytes(flipped), pki.root, NOW)
        outcomes[type(info.value).__name__] = outcomes.get(type(info.value).__name__, 0) + 1
    # Nearly every flip either breaks the DER or the signature; none gets past the issuer check.
    assert set(outcomes) <= {"DecodeError", "UntrustedIssuer"}
    assert outcomes.get("UntrustedIssuer", 0) > len(data) * 4


def test_leaf_as_root_is_refused(pki: Ca, alice: x509.Certificate) -> None:
    alice_key = ed_key(0x1234 + 1000)
    # Alice uses her own key to certify "bob": only a verifier that trusted a leaf as root would accept.
    bob = (
        x509.CertificateBuilder()
        .subject_name(cn("bob"))
        .issuer_name(alice.subject)
        .public_key(ed_key(2).public_key())
        .serial_number(2)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(alice_key, None)
    )
    with pytest.raises(UntrustedIssuer, match="not a CA"):
        verify(bob, alice, NOW)
    with pytest.raises(UntrustedIssuer):
        verify(bob, pki.root, NOW)


def _root_with(pki: Ca, extensions: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(pki.root.subject)
        .issuer_name(pki.root.subject)
        .public_key(pki.key.public_key())
        .serial_number(3)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + YEAR)
    )
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(pki.key, None)


@pytest.mark.parametrize(
    "extensions",
    [
        [],
        [(x509.BasicConstraints(ca=True, path_length=0), True)],
        [(x509.BasicConstraints(ca=True, path_length=0), True), (key_usage(digital_signature=True), True)],
        [(x509.BasicConstraints(ca=False, path_length=None), True), (key_usage(key_cert_sign=True), True)],
        [(x509.UnrecognizedExtension(ExtensionOID.BASIC_CONSTRAINTS, b"\x05\x00"), True)],
    ],
    ids=["no-extensions", "no-key-usage", "no-cert-sign", "not-ca", "garbled-basic-constraints"],
)
def test_root_that_is_not_a_ca_is_refused(
    pki: Ca, alice: x509.Certificate, extensions: list[tuple[x509.ExtensionType, bool]]
) -> None:
    with pytest.raises(UntrustedIssuer, match="not a CA"):
        verify(alice, _root_with(pki, extensions), NOW)


# --- verify: validity window and skew ------------------------------------------------------------------------


def test_expired_and_not_yet_valid(pki: Ca, alice: x509.Certificate) -> None:
    with pytest.raises(CertificateExpired):
        verify(alice, pki.root, NOW + 2 * YEAR)
    with pytest.raises(CertificateNotYetValid):
        verify(alice, pki.root, NOW - 2 * DAY)


def test_skew_boundaries_are_inclusive(pki: Ca, alice: x509.Certificate) -> None:
    nb, na = alice.not_valid_before_utc, alice.not_valid_after_utc
    assert timedelta(minutes=5) == CLOCK_SKEW
    verify(alice, pki.root, nb - CLOCK_SKEW)
    verify(alice, pki.root, na + CLOCK_SKEW)
    with pytest.raises(CertificateNotYetValid, match="not valid before"):
        verify(alice, pki.root, nb - CLOCK_SKEW - SECOND)
    with pytest.raises(CertificateExpired, match="expired at"):
        verify(alice, pki.root, na + CLOCK_SKEW + SECOND)


def test_signature_is_checked_before_dates(pki: Ca) -> None:
    rogue = Ca(seed="rogue-ca")
    _, forged = rogue.node("alice", not_after=NOW - DAY, not_before=NOW - 2 * DAY)
    with pytest.raises(UntrustedIssuer):
        verify(forged, pki.root, NOW)


# --- verify: role constraints ------------------------------------------------------------------------------


def test_ca_certificate_presented_as_node_is_refused(pki: Ca) -> None:
    with pytest.raises(CertificateConstraintError, match="end-entity"):
        verify(pki.root, pki.root, NOW)


@pytest.mark.parametrize(
    ("extensions", "match"),
    [
        (leaf_extensions(bc=x509.BasicConstraints(ca=True, path_length=None)), "end-entity"),
        (leaf_extensions(drop=[x509.BasicConstraints]), "end-entity"),
        (leaf_extensions(drop=[x509.KeyUsage]), "keyUsage"),
        (leaf_extensions(ku=key_usage(key_agreement=True)), "keyUsage"),
        (leaf_extensions(ku=key_usage(digital_signature=True, key_cert_sign=True)), "keyUsage"),
        (leaf_extensions(drop=[x509.ExtendedKeyUsage]), "clientAuth"),
        (leaf_extensions(eku=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])), "clientAuth"),
        (
            [*leaf_extensions(), (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"), True)],
            "unknown critical",
        ),
        (
            [(x509.UnrecognizedExtension(ExtensionOID.BASIC_CONSTRAINTS, b"\x05\x00"), True)],
            "do not parse",
        ),
    ],
    ids=[
        "ca-true",
        "no-basic-constraints",
        "no-key-usage",
        "key-agreement-only",
        "key-cert-sign",
        "no-eku",
        "server-auth-only",
        "unknown-critical",
        "garbled-extension",
    ],
)
def test_wrong_role_is_refused(pki: Ca, extensions: list[tuple[x509.ExtensionType, bool]], match: str) -> None:
    cert = pki.custom(subject=cn("carol"), public_key=ed_key(3).public_key(), extensions=extensions)
    with pytest.raises(CertificateConstraintError, match=match):
        verify(cert, pki.root, NOW)


def test_unknown_noncritical_extension_is_fine(pki: Ca) -> None:
    extra = (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"), False)
    cert = pki.custom(subject=cn("carol"), public_key=ed_key(3).public_key(), extensions=[*leaf_extensions(), extra])
    assert verify(cert, pki.root, NOW).name == "carol"


def test_non_ed25519_leaf_is_refused(pki: Ca) -> None:
    cert = pki.custom(subject=cn("carol"), public_key=ec_key().public_key(), extensions=leaf_extensions())
    with pytest.raises(CertificateConstraintError, match="Ed25519"):
        verify(cert, pki.root, NOW)


def test_unparseable_leaf_key_is_refused(pki: Ca) -> None:
    cert = pki.custom(subject=cn("carol"), public_key=ed_key(3).public_key(), extensions=leaf_extensions())
    tbs = cert.tbs_certificate_bytes
    # The SPKI algorithm OID 1.3.101.112 (Ed25519) -> 1.3.101.127: same length, unknown algorithm.
    edited = tbs.replace(bytes.fromhex("300506032b65700321"), bytes.fromhex("300506032b657f0321"))
    assert edited != tbs
    with pytest.raises(CertificateConstraintError, match="unusable public key"):
        verify(resign(edited, pki.key), pki.root, NOW)


def test_server_certificate_is_not_a_node_identity(pki: Ca) -> None:
    server = certs.issue_server(
        ca_key=pki.key,
        ca_cert=pki.root,
        hostnames=["relay.local"],
        public_key=ed_key(4).public_key(),
        serial=44,
        not_before=NOW - DAY,
        not_after=NOW + DAY,
    )
    with pytest.raises(CertificateConstraintError, match="clientAuth"):
        verify(server, pki.root, NOW)


# --- verify: names -----------------------------------------------------------------------------------------


def test_expected_name_mismatch(pki: Ca, alice: x509.Certificate) -> None:
    with pytest.raises(NameMismatch, match="expected 'bob'"):
        verify(alice, pki.root, NOW, expected_name="bob")


@pytest.mark.parametrize(
    "subject",
    [
        x509.Name([]),
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kmsnet")]),
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a"), x509.NameAttribute(NameOID.COMMON_NAME, "b")]),
        cn("Alice"),
        cn("-alice"),
    ],
    ids=["empty", "no-cn", "two-cns", "uppercase", "leading-dash"],
)
def test_subject_that_names_no_node(pki: Ca, subject: x509.Name) -> None:
    cert = pki.custom(subject=subject, public_key=ed_key(3).public_key(), extensions=leaf_extensions())
    with pytest.raises(NameMismatch, match="does not name a node"):
        verify(cert, pki.root, NOW)


def test_garbled_subject_signed_by_the_ca_names_no_node(pki: Ca, alice: x509.Certificate) -> None:
    tag, body = split_one(alice.tbs_certificate_bytes)
    parts = split(body)
    assert parts[5] == alice.subject.public_bytes()
    parts[5] = GARBLED_NAME
    with pytest.raises(NameMismatch, match="does not parse"):
        verify(resign(tlv(tag, b"".join(parts)), pki.key), pki.root, NOW)


# --- loading and encoding -------------------------------------------------------------------------------


def test_load_certificate_pem_and_der(alice: x509.Certificate) -> None:
    pem = certs.certificate_pem(alice)
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert certs.load_certificate(pem) == alice
    assert certs.load_certificate(b"\n  " + pem) == alice
    assert certs.load_certificate(der(alice)) == alice


@pytest.mark.parametrize(
    "data", [b"", b"nope", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b"\x30\x00"]
)
def test_load_certificate_garbage(data: bytes) -> None:
    with pytest.raises(DecodeError):
        certs.load_certificate(data)


# --- the relay's TLS certificate ------------------------------------------------------------------------


def _server(pki: Ca, hostnames: object, public_key: object = None) -> x509.Certificate:
    return certs.issue_server(
        ca_key=pki.key,
        ca_cert=pki.root,
        hostnames=hostnames,  # type: ignore[arg-type]
        public_key=public_key or ec_key().public_key(),  # type: ignore[arg-type]
        serial=77,
        not_before=NOW - DAY,
        not_after=NOW + YEAR,
    )


def test_server_certificate_profile(pki: Ca) -> None:
    cert = _server(pki, ["Relay.Example.org", "127.0.0.1", "::1", "relay.example.org", "localhost"])
    assert cert.subject == cn("relay.example.org")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["relay.example.org", "localhost"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value == key_usage(digital_signature=True)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(pki.root)


def test_server_certificate_with_a_long_name_has_empty_subject_and_critical_san(pki: Ca) -> None:
    long_name = ".".join(["a" * 60] * 2)
    cert = _server(pki, [long_name], ed_key(8).public_key())
    assert cert.subject == x509.Name([])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DNSName) == [long_name]


@pytest.mark.parametrize(
    ("hostnames", "public_key"),
    [
        ("relay.local", None),
        ([], None),
        (["bad_name"], None),
        (["-bad.example"], None),
        (["a" * 64 + ".example"], None),
        ([("x" * 60 + ".") * 5 + "com"], None),
        ([7], None),
        (["relay.local"], X25519PrivateKey.from_private_bytes(b"\1" * 32).public_key()),
    ],
)
def test_issue_server_refuses_bad_arguments(pki: Ca, hostnames: object, public_key: object) -> None:
    with pytest.raises(LocalError):
        _server(pki, hostnames, public_key)


def _openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.skip("no openssl binary")
    return path


def test_openssl_verifies_server_and_node_certificates_strictly(
    pki: Ca, alice: x509.Certificate, tmp_path: Path
) -> None:
    openssl = _openssl()
    (tmp_path / "root.pem").write_bytes(certs.certificate_pem(pki.root))
    for key_kind, key in (("ec", ec_key().public_key()), ("ed25519", ed_key(9).public_key())):
        server = _server(pki, ["relay.local", "127.0.0.1"], key)
        (tmp_path / f"server-{key_kind}.pem").write_bytes(certs.certificate_pem(server))
    (tmp_path / "alice.pem").write_bytes(certs.certificate_pem(alice))
    at = str(int(NOW.timestamp()))
    common = [openssl, "verify", "-x509_strict", "-attime", at, "-CAfile", str(tmp_path / "root.pem")]
    for key_kind in ("ec", "ed25519"):
        leaf = str(tmp_path / f"server-{key_kind}.pem")
        for check in (["-verify_hostname", "relay.local"], ["-verify_ip", "127.0.0.1"]):
            out = subprocess.run([*common, "-purpose", "sslserver", *check, leaf], capture_output=True, text=True)
            assert out.returncode == 0, out.stdout + out.stderr
        wrong = subprocess.run(
            [*common, "-purpose", "sslserver", "-verify_hostname", "evil.local", leaf], capture_output=True, text=True
        )
        assert wrong.returncode != 0
    out = subprocess.run(
        [*common, "-purpose", "sslclient", str(tmp_path / "alice.pem")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --- cost ---------------------------------------------------------------------------------------------------


def test_verify_is_cheap(pki: Ca, alice: x509.Certificate) -> None:
    data = der(alice)
    verify(data, pki.root, NOW)
    start = time.perf_counter()
    for _ in range(200):
        verify(data, pki.root, NOW, expected_name="alice")
    per_call = (time.perf_counter() - start) / 200
    # Dominated by one Ed25519 verification (~50 us); a generous bound that still catches re-parsing loops.
    assert per_call < 0.005


def test_an_expired_root_vouches_for_nothing() -> None:
    pki = Ca("old-ca", "old-ca", not_before=NOW - 3 * YEAR, not_after=NOW - YEAR)
    _, cert = pki.node("alice", not_before=NOW - DAY, not_after=NOW + DAY)
    with pytest.raises(UntrustedIssuer, match="root expired"):
        certs.verify(cert, pki.root, NOW)


def test_remembered_certificates_are_still_checked_against_root_time_and_name(
    pki: Ca, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(certs, "CACHE_SIZE", 2)
    monkeypatch.setattr(certs, "_VERIFIED", certs.OrderedDict())
    _, alice = pki.node("alice", serial=301, not_before=NOW - DAY, not_after=NOW + DAY)
    first = certs.verify(der(alice), pki.root, NOW)
    assert certs.verify(der(alice), pki.root, NOW) is first  # remembered
    rogue = Ca(seed="rogue-ca-2")
    with pytest.raises(UntrustedIssuer):
        certs.verify(der(alice), rogue.root, NOW)  # the signature is checked on every call
    with pytest.raises(CertificateExpired):
        certs.verify(der(alice), pki.root, NOW + 2 * DAY)
    with pytest.raises(NameMismatch):
        certs.verify(der(alice), pki.root, NOW, expected_name="bob")
    for serial in (302, 303):
        _, other = pki.node(f"n{serial}", serial=serial)
        certs.verify(der(other), pki.root, NOW)
    assert len(certs._VERIFIED) == 2  # the least recently used went
    assert certs.verify(der(alice), pki.root, NOW) is not first  # verified afresh
