"""protocol.crl and protocol.ocsp: CRLs, the node's RevocationState, and OCSP."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509 import ocsp
from cryptography.x509.oid import CRLEntryExtensionOID, ExtensionOID
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import certs
from protocol.certs import CLOCK_SKEW
from protocol.crl import REASONS, Freshness, RevocationState, RevokedEntry, VerifiedCrl, issue_crl, verify_crl
from protocol.errors import (
    CertificateRevoked,
    CrlInvalid,
    CrlRollback,
    DecodeError,
    LocalError,
    NoRevocationData,
    OcspError,
    StaleFeed,
)
from protocol.ocsp import OcspAnswer, build_ocsp_request, build_ocsp_response, crl_answer, verify_ocsp_response
from tests.support.pki import (
    DAY,
    NOW,
    YEAR,
    Ca,
    cn,
    ec_key,
    ed_key,
    key_usage,
    resign,
    split,
    split_one,
    tlv,
)

SECOND = timedelta(seconds=1)
HOUR = timedelta(hours=1)
NONCE = bytes(range(16))
_PKI = Ca()  # for hypothesis tests, which cannot take function-scoped fixtures


@pytest.fixture(scope="module")
def pki() -> Ca:
    return Ca()


@pytest.fixture(scope="module")
def rogue() -> Ca:
    """Another CA with the same name as `pki` but its own key."""
    return Ca(seed="rogue-ca")


def entry(serial: int, reason: str = "key-compromise", at: datetime = NOW - HOUR) -> RevokedEntry:
    return RevokedEntry(serial, at, reason)


def fresh_state(pki: Ca, *ders: bytes) -> RevocationState:
    state = RevocationState()
    for data in ders:
        state.accept(data, pki.root, NOW)
    return state


# --- values ------------------------------------------------------------------------------------------


def test_reasons_are_rfc5280_names() -> None:
    assert set(REASONS) == {
        "unspecified",
        "key-compromise",
        "ca-compromise",
        "affiliation-changed",
        "superseded",
        "cessation-of-operation",
        "certificate-hold",
        "privilege-withdrawn",
        "aa-compromise",
    }
    assert REASONS["key-compromise"] is x509.ReasonFlags.key_compromise
    assert x509.ReasonFlags.remove_from_crl not in REASONS.values()
    with pytest.raises(TypeError):
        REASONS["x"] = x509.ReasonFlags.unspecified  # type: ignore[index]


@pytest.mark.parametrize(
    "args",
    [
        (0, NOW, "unspecified"),
        (-1, NOW, "unspecified"),
        (True, NOW, "unspecified"),
        (2**159, NOW, "unspecified"),
        (1, NOW.replace(tzinfo=None), "unspecified"),
        (1, NOW, "keyCompromise"),
        (1, NOW, "remove-from-crl"),
    ],
)
def test_revoked_entry_validates(args: tuple[object, object, object]) -> None:
    with pytest.raises(LocalError):
        RevokedEntry(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": "maybe"},
        {"status": "revoked"},
        {"status": "revoked", "revoked_at": NOW},
        {"status": "revoked", "revoked_at": NOW, "reason": "nope"},
        {"status": "revoked", "revoked_at": NOW.replace(tzinfo=None), "reason": "superseded"},
        {"status": "good", "reason": "superseded"},
        {"status": "unknown", "revoked_at": NOW},
    ],
)
def test_ocsp_answer_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalError):
        OcspAnswer(**kwargs)  # type: ignore[arg-type]


def test_ocsp_answer_require_good() -> None:
    OcspAnswer("good").require_good(5)
    with pytest.raises(CertificateRevoked) as info:
        OcspAnswer("revoked", NOW, "superseded").require_good(5)
    assert (info.value.serial, info.value.reason) == (5, "superseded")
    with pytest.raises(OcspError, match="does not know"):
        OcspAnswer("unknown").require_good(5)


# --- issuing and verifying CRLs ------------------------------------------------------------------------


def test_crl_round_trip(pki: Ca) -> None:
    entries = [entry(5, "key-compromise"), entry(6, "unspecified"), entry(2**100, "superseded", NOW - DAY)]
    data = pki.signed_crl(7, entries)
    crl = verify_crl(data, pki.root, NOW)
    assert crl.number == 7
    assert (crl.this_update, crl.next_update) == (NOW, NOW + DAY)
    assert crl.revoked == frozenset({5, 6, 2**100})
    assert dict(crl.entries) == {e.serial: e for e in entries}
    assert crl.der == data
    assert crl.digest == _sha256(data)
    assert (
        repr(crl)
        == f"VerifiedCrl(number=7, revoked=3, next_update={(NOW + DAY).isoformat()}, digest={crl.digest[:8].hex()})"
    )
    assert crl_answer(crl, 5) == OcspAnswer("revoked", NOW - HOUR, "key-compromise")
    assert crl_answer(crl, 4) == OcspAnswer("good")
    assert verify_crl(data, pki.root, NOW) == crl
    with pytest.raises(TypeError):
        crl.entries[9] = entry(9)  # type: ignore[index]


def test_crl_format(pki: Ca) -> None:
    crl = x509.load_der_x509_crl(pki.signed_crl(7, [entry(5, "key-compromise"), entry(6, "unspecified")]))
    assert crl.issuer == pki.root.subject
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(pki.key.public_key()).digest
    five = crl.get_revoked_certificate_by_serial_number(5)
    assert five is not None
    assert five.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.key_compromise
    six = crl.get_revoked_certificate_by_serial_number(6)
    assert six is not None
    # RFC 5280 5.3.1: "unspecified" is expressed by leaving the reason out.
    assert len(six.extensions) == 0


def test_verified_crl_cannot_be_forged(pki: Ca) -> None:
    crl = verify_crl(pki.signed_crl(1), pki.root, NOW)
    fields = {f.name: getattr(crl, f.name) for f in dataclasses.fields(crl)}
    with pytest.raises(LocalError):
        VerifiedCrl(**fields)
    with pytest.raises(LocalError):
        dataclasses.replace(crl, number=99)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"number": -1}, "CRL number"),
        ({"number": 2**159}, "CRL number"),
        ({"number": True}, "CRL number"),
        ({"ca_key": ed_key(99)}, "does not belong"),
        ({"next_update": NOW}, "not before"),
        ({"this_update": NOW.replace(tzinfo=None)}, "timezone-aware"),
        ({"revoked": [entry(5), entry(5, "superseded")]}, "twice"),
        ({"revoked": [(5, NOW, "superseded")]}, "RevokedEntry"),
    ],
)
def test_issue_crl_refuses_bad_arguments(pki: Ca, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "ca_key": pki.key,
        "ca_cert": pki.root,
        "number": 1,
        "this_update": NOW,
        "next_update": NOW + DAY,
        "revoked": (),
    }
    args.update(kwargs)
    with pytest.raises(LocalError, match=match):
        issue_crl(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x30\x00", b"\x30\x03\x02\x01\x01"])
def test_garbage_crl_is_invalid_with_cause(pki: Ca, data: bytes) -> None:
    with pytest.raises(CrlInvalid) as info:
        verify_crl(data, pki.root, NOW)
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.filterwarnings("ignore:Parsed a serial number")
def test_every_single_bit_flip_in_a_crl_is_refused(pki: Ca) -> None:
    data = pki.signed_crl(3, [entry(5), entry(6, "unspecified")])
    for i in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CrlInvalid):
            verify_crl(bytes(flipped), pki.root, NOW)


def test_forged_crl_from_a_rogue_ca_with_the_same_name(pki: Ca, rogue: Ca) -> None:
    with pytest.raises(CrlInvalid, match="signature does not verify"):
        verify_crl(rogue.signed_crl(99), pki.root, NOW)


def test_crl_from_another_issuer_name(pki: Ca) -> None:
    other = Ca(name="other-ca")
    with pytest.raises(CrlInvalid, match="not the pinned root"):
        verify_crl(other.signed_crl(1), pki.root, NOW)


def test_crl_checked_against_an_unsupported_root_key(pki: Ca) -> None:
    odd_root = (
        x509.CertificateBuilder()
        .subject_name(pki.root.subject)
        .issuer_name(pki.root.subject)
        .public_key(X25519PrivateKey.from_private_bytes(b"\2" * 32).public_key())
        .serial_number(5)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(pki.key, None)
    )
    with pytest.raises(CrlInvalid, match="cannot be checked"):
        verify_crl(pki.signed_crl(1), odd_root, NOW)


def _raw_crl(
    pki: Ca,
    *,
    extensions: list[tuple[x509.ExtensionType, bool]],
    revoked: list[x509.RevokedCertificate] | None = None,
    this_update: datetime = NOW,
    next_update: datetime = NOW + DAY,
) -> bytes:
    builder = x509.CertificateRevocationListBuilder().issuer_name(pki.root.subject)
    builder = builder.last_update(this_update).next_update(next_update)
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    for rc in revoked or []:
        builder = builder.add_revoked_certificate(rc)
    return builder.sign(pki.key, None).public_bytes(serialization.Encoding.DER)


def _revoked(serial: int, *extensions: tuple[x509.ExtensionType, bool]) -> x509.RevokedCertificate:
    builder = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - HOUR)
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    return builder.build()


NUMBER_1 = (x509.CRLNumber(1), False)


@pytest.mark.parametrize(
    ("extensions", "revoked", "match"),
    [
        ([], None, "no CRLNumber"),
        ([NUMBER_1, (x509.DeltaCRLIndicator(0), True)], None, "critical extension"),
        ([(x509.UnrecognizedExtension(ExtensionOID.CRL_NUMBER, b"\x05\x00"), False)], None, "do not parse"),
        ([NUMBER_1], [_revoked(5), _revoked(5)], "listed twice"),
        ([NUMBER_1], [_revoked(5, (x509.CRLReason(x509.ReasonFlags.remove_from_crl), False))], "removeFromCRL"),
        ([NUMBER_1], [_revoked(5, (x509.CertificateIssuer([x509.DNSName("x.example")]), True))], "critical extension"),
        (
            [NUMBER_1],
            [_revoked(5, (x509.UnrecognizedExtension(CRLEntryExtensionOID.CRL_REASON, b"\x05\x00"), False))],
            "entries do not parse",
        ),
    ],
    ids=["no-number", "delta", "garbled-number", "duplicate", "remove-from-crl", "indirect", "garbled-reason"],
)
def test_crl_content_refusals(
    pki: Ca,
    extensions: list[tuple[x509.ExtensionType, bool]],
    revoked: list[x509.RevokedCertificate] | None,
    match: str,
) -> None:
    with pytest.raises(CrlInvalid, match=match):
        verify_crl(_raw_crl(pki, extensions=extensions, revoked=revoked), pki.root, NOW)


def test_noncritical_entry_extensions_are_tolerated(pki: Ca) -> None:
    data = _raw_crl(pki, extensions=[NUMBER_1], revoked=[_revoked(5, (x509.InvalidityDate(NOW - DAY), False))])
    assert verify_crl(data, pki.root, NOW).entries[5].reason == "unspecified"


def test_crl_with_zero_serial_entry(pki: Ca) -> None:
    # cryptography's builder refuses serial 0, so edit a signed CRL's TBS: INTEGER 5 -> INTEGER 0.
    data = _raw_crl(pki, extensions=[NUMBER_1], revoked=[_revoked(5)])
    tbs = x509.load_der_x509_crl(data).tbs_certlist_bytes
    tag, body = split_one(tbs)
    parts = split(body)
    entries_tag, entries_body = split_one(parts[5])
    entry_parts = split(split_one(split(entries_body)[0])[1])
    assert entry_parts[0] == bytes.fromhex("020105")
    entry_parts[0] = bytes.fromhex("020100")
    parts[5] = tlv(entries_tag, tlv(0x30, b"".join(entry_parts)))
    edited = tlv(tag, b"".join(parts))
    with pytest.raises(CrlInvalid, match="out of range"):
        verify_crl(resign(edited, pki.key), pki.root, NOW)


def test_crl_dates(pki: Ca) -> None:
    verify_crl(pki.signed_crl(1, this_update=NOW + CLOCK_SKEW), pki.root, NOW)
    with pytest.raises(CrlInvalid, match="in the future"):
        verify_crl(pki.signed_crl(1, this_update=NOW + CLOCK_SKEW + SECOND), pki.root, NOW)
    with pytest.raises(CrlInvalid, match="nextUpdate"):
        verify_crl(_raw_crl(pki, extensions=[NUMBER_1], next_update=NOW), pki.root, NOW)
    # Long past nextUpdate still verifies: staleness is RevocationState.check's business.
    verify_crl(pki.signed_crl(1), pki.root, NOW + 10 * YEAR)
    with pytest.raises(LocalError):
        verify_crl(pki.signed_crl(1), pki.root, NOW.replace(tzinfo=None))


def test_crl_without_next_update(pki: Ca) -> None:
    # cryptography's builder refuses to omit nextUpdate, so cut it out of a signed TBS.
    crl = x509.load_der_x509_crl(pki.signed_crl(1))
    tag, body = split_one(crl.tbs_certlist_bytes)
    parts = split(body)  # version, signature, issuer, thisUpdate, nextUpdate, [0] extensions
    assert len(parts) == 6 and parts[4][0] in (0x17, 0x18)
    edited = tlv(tag, b"".join(parts[:4] + parts[5:]))
    with pytest.raises(CrlInvalid, match="nextUpdate is missing"):
        verify_crl(resign(edited, pki.key), pki.root, NOW)


@pytest.mark.parametrize("size", [0, 64, 126, 127, 128, 300, 4627])
def test_signature_bit_string_encoding(size: int) -> None:
    from protocol.crl import _signature_bit_string

    signature = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert _signature_bit_string(signature) == tlv(0x03, b"\x00" + signature)


def test_non_canonical_signature_encoding_is_refused(pki: Ca) -> None:
    # A signature whose last bit is 0 can be re-labelled "1 unused bit" and stay valid DER.
    data = next(d for d in (pki.signed_crl(n) for n in range(1, 64)) if d[-1] & 1 == 0)
    assert data[-67:-64] == b"\x03\x41\x00"
    relabelled = data[:-65] + b"\x01" + data[-64:]
    assert x509.load_der_x509_crl(relabelled).is_signature_valid(pki.key.public_key())  # the quirk
    with pytest.raises(CrlInvalid, match="canonically"):
        verify_crl(relabelled, pki.root, NOW)


# --- RevocationState ------------------------------------------------------------------------------------------


def test_no_crl_means_no_revocation_data(pki: Ca) -> None:
    state = RevocationState()
    assert state.current is None and state.highest_number is None
    with pytest.raises(NoRevocationData):
        state.check(5, NOW)
    with pytest.raises(NoRevocationData):
        state.freshness(NOW)
    assert repr(state) == "RevocationState(current=None)"


def test_check_good_and_revoked_with_reason(pki: Ca) -> None:
    state = fresh_state(pki, pki.signed_crl(1, [entry(5, "key-compromise"), entry(6, "unspecified")]))
    state.check(7, NOW)
    with pytest.raises(CertificateRevoked) as info:
        state.check(5, NOW)
    assert (info.value.serial, info.value.reason) == (5, "key-compromise")
    with pytest.raises(CertificateRevoked, match="unspecified"):
        state.check(6, NOW)
    with pytest.raises(LocalError):
        state.check(7, NOW.replace(tzinfo=None))


def test_stale_feed_fails_closed_after_next_update_plus_skew(pki: Ca) -> None:
    state = fresh_state(pki, pki.signed_crl(1))
    state.check(5, NOW + DAY + CLOCK_SKEW)
    with pytest.raises(StaleFeed, match=r"stale since .*2026-03-02T12:00:00\+00:00"):
        state.check(5, NOW + DAY + CLOCK_SKEW + SECOND)


def test_stale_is_reported_before_revocation(pki: Ca) -> None:
    state = fresh_state(pki, pki.signed_crl(1, [entry(5)]))
    with pytest.raises(StaleFeed):
        state.check(5, NOW + 2 * DAY)


def test_freshness(pki: Ca) -> None:
    state = fresh_state(pki, pki.signed_crl(4))
    f = state.freshness(NOW)
    assert f == Freshness(4, NOW, NOW + DAY, stale=False, seconds_left=86400 + 300)
    assert state.freshness(NOW + DAY + CLOCK_SKEW) == Freshness(4, NOW, NOW + DAY, stale=False, seconds_left=0)
    late = state.freshness(NOW + DAY + CLOCK_SKEW + SECOND / 2)
    assert late.stale and late.seconds_left == -1
    with pytest.raises(LocalError):
        state.freshness(NOW.replace(tzinfo=None))


def test_accept_newer_replaces(pki: Ca) -> None:
    state = RevocationState()
    first = state.accept(pki.signed_crl(1), pki.root, NOW)
    assert state.current is first and state.highest_number == 1
    second = state.accept(pki.signed_crl(2, [entry(5)]), pki.root, NOW)
    assert state.current is second and state.highest_number == 2
    assert "number=2" in repr(state)
    # Numbers need not be consecutive.
    state.accept(pki.signed_crl(10), pki.root, NOW)
    assert state.highest_number == 10


def test_same_crl_again_is_a_no_op(pki: Ca) -> None:
    data = pki.signed_crl(3, [entry(5)])
    state = fresh_state(pki, data)
    held = state.current
    assert state.accept(data, pki.root, NOW + HOUR) is held
    assert state.current is held


def _assert_refused_unchanged(
    state: RevocationState, data: bytes, root: x509.Certificate, error: type[Exception], match: str
) -> None:
    before, snapshot = state.current, state.to_bytes()
    with pytest.raises(error, match=match):
        state.accept(data, root, NOW)
    assert state.current is before
    assert state.to_bytes() == snapshot


def test_refusals_leave_the_state_unchanged(pki: Ca, rogue: Ca) -> None:
    state = fresh_state(pki, pki.signed_crl(5, [entry(9)]))
    _assert_refused_unchanged(state, pki.signed_crl(4), pki.root, CrlRollback, "lower than the accepted 5")
    _assert_refused_unchanged(state, pki.signed_crl(0), pki.root, CrlRollback, "lower")
    _assert_refused_unchanged(state, pki.signed_crl(5), pki.root, CrlInvalid, "equivocates")
    _assert_refused_unchanged(state, rogue.signed_crl(6), pki.root, CrlInvalid, "signature")
    _assert_refused_unchanged(state, b"junk", pki.root, CrlInvalid, "parse")
    with pytest.raises(CertificateRevoked):
        state.check(9, NOW)


def test_rollback_still_refused_after_restart(pki: Ca) -> None:
    state = fresh_state(pki, pki.signed_crl(1), pki.signed_crl(8, [entry(5)]))
    restored = RevocationState.from_bytes(state.to_bytes(), pki.root, NOW + HOUR)
    assert restored.highest_number == 8
    assert restored.current == state.current
    assert restored.current is not None and restored.current.der == pki.signed_crl(8, [entry(5)])
    with pytest.raises(CrlRollback):
        restored.accept(pki.signed_crl(7), pki.root, NOW)
    with pytest.raises(CrlInvalid, match="equivocates"):
        restored.accept(pki.signed_crl(8), pki.root, NOW)
    with pytest.raises(CertificateRevoked):
        restored.check(5, NOW)


def test_empty_state_round_trips(pki: Ca) -> None:
    data = RevocationState().to_bytes()
    assert msgpack.unpackb(data) == {"v": 1, "highest": None, "crl": None}
    assert RevocationState.from_bytes(data, pki.root, NOW).current is None


def test_state_encoding_handles_big_crl_numbers(pki: Ca) -> None:
    state = fresh_state(pki, pki.signed_crl(2**158))
    obj = msgpack.unpackb(state.to_bytes())
    assert obj["highest"] == (2**158).to_bytes(20, "big")
    assert RevocationState.from_bytes(state.to_bytes(), pki.root, NOW).highest_number == 2**158


def _state_bytes(**fields: object) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def _bad_states(pki: Ca, rogue: Ca) -> list[bytes]:
    good = pki.signed_crl(3)
    n3 = (3).to_bytes(20, "big")
    return [
        b"",
        b"\xc1",
        _state_bytes(v=1, highest=None, crl=None) + b"\x00",
        msgpack.packb([1, None, None]),
        _state_bytes(v=1, highest=None),
        _state_bytes(v=1, highest=None, crl=None, extra=1),
        _state_bytes(v=2, highest=None, crl=None),
        _state_bytes(v=True, highest=None, crl=None),
        _state_bytes(v="1", highest=None, crl=None),
        _state_bytes(v=1, highest=n3, crl=None),
        _state_bytes(v=1, highest=None, crl=good),
        _state_bytes(v=1, highest=3, crl=good),
        _state_bytes(v=1, highest=n3[1:], crl=good),
        _state_bytes(v=1, highest=n3, crl="text"),
        _state_bytes(v=1, highest=n3, crl=b"junk"),
        _state_bytes(v=1, highest=(4).to_bytes(20, "big"), crl=good),
        _state_bytes(v=1, highest=n3, crl=rogue.signed_crl(3)),
        msgpack.packb({1: 2}),
    ]


def test_malformed_state_is_a_decode_error(pki: Ca, rogue: Ca) -> None:
    for data in _bad_states(pki, rogue):
        with pytest.raises(DecodeError):
            RevocationState.from_bytes(data, pki.root, NOW)


def test_restore_refuses_when_the_clock_went_back(pki: Ca) -> None:
    data = fresh_state(pki, pki.signed_crl(3)).to_bytes()
    with pytest.raises(DecodeError, match="no longer verifies") as info:
        RevocationState.from_bytes(data, pki.root, NOW - DAY)
    assert isinstance(info.value.__cause__, CrlInvalid)
    with pytest.raises(LocalError):
        RevocationState.from_bytes(data, pki.root, NOW.replace(tzinfo=None))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_state_bytes_only_raise_decode_error(data: bytes) -> None:
    try:
        state = RevocationState.from_bytes(data, _PKI.root, NOW)
    except DecodeError:
        return
    assert state.current is None


def test_ten_thousand_entry_crl(pki: Ca) -> None:
    start = time.perf_counter()
    reasons = sorted(REASONS)
    entries = [entry(1000 + i, reasons[i % len(reasons)], NOW - timedelta(seconds=i)) for i in range(10_000)]
    data = pki.signed_crl(42, entries)
    state = RevocationState()
    crl = state.accept(data, pki.root, NOW)
    assert len(crl.revoked) == 10_000
    assert crl.entries[1000 + 17] == entries[17]
    state.check(999, NOW)
    state.check(11_000, NOW)
    with pytest.raises(CertificateRevoked) as info:
        state.check(1000 + 9_999, NOW)
    assert info.value.reason == entries[9_999].reason
    lookups = time.perf_counter()
    for serial in range(5_000, 15_000):
        with contextlib.suppress(CertificateRevoked):
            state.check(serial, NOW)
    per_check = (time.perf_counter() - lookups) / 10_000
    assert per_check < 50e-6  # a set lookup, not get_revoked_certificate_by_serial_number (~0.6 ms)
    restored = RevocationState.from_bytes(state.to_bytes(), pki.root, NOW)
    assert restored.current == crl
    assert time.perf_counter() - start < 10


def test_openssl_parses_the_crl(pki: Ca, tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary")
    path = tmp_path / "crl.der"
    path.write_bytes(pki.signed_crl(0x1234, [entry(5, "key-compromise"), entry(6, "unspecified")]))
    out = subprocess.run(
        [openssl, "crl", "-inform", "DER", "-text", "-noout", "-in", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"X509v3 CRL Number: *\n *4660\n", out.stdout), out.stdout  # 4660 == 0x1234
    assert "Key Compromise" in out.stdout


# --- OCSP -------------------------------------------------------------------------------------------


class Registry:
    """The CA's view: which serials it issued and which it revoked."""

    def __init__(self, issued: set[int], revoked: list[RevokedEntry]) -> None:
        self.issued = issued
        self.revoked = {e.serial: e for e in revoked}

    def lookup(self, serial: int) -> OcspAnswer:
        if serial not in self.issued:
            return OcspAnswer("unknown")
        e = self.revoked.get(serial)
        return OcspAnswer("good") if e is None else OcspAnswer("revoked", e.revoked_at, e.reason)


def _respond(
    pki: Ca,
    request: bytes,
    lookup: Callable[[int], OcspAnswer] = lambda _serial: OcspAnswer("good"),
    *,
    now: datetime = NOW,
    validity: timedelta = HOUR,
) -> bytes:
    return build_ocsp_response(request, ca_key=pki.key, ca_cert=pki.root, lookup=lookup, now=now, validity=validity)


def _status(response: bytes) -> ocsp.OCSPResponseStatus:
    return ocsp.load_der_ocsp_response(response).response_status


def test_ocsp_and_crl_agree(pki: Ca) -> None:
    revoked = [entry(11, "key-compromise"), entry(12, "unspecified"), entry(13, "superseded", NOW - DAY)]
    registry = Registry({10, 11, 12, 13}, revoked)
    state = fresh_state(pki, pki.signed_crl(1, revoked))
    for serial in (10, 11, 12, 13, 14):
        _, cert = pki.node(f"n{serial}", serial=serial)
        request = build_ocsp_request(cert, pki.root, NONCE)
        answer = verify_ocsp_response(
            _respond(pki, request, registry.lookup), cert=cert, root=pki.root, nonce=NONCE, now=NOW
        )
        assert answer == registry.lookup(serial)
        if answer.status == "revoked":
            assert state.current is not None and crl_answer(state.current, serial) == answer
            with pytest.raises(CertificateRevoked) as info:
                state.check(serial, NOW)
            assert info.value.reason == answer.reason
            with pytest.raises(CertificateRevoked) as info2:
                answer.require_good(serial)
            assert info2.value.reason == answer.reason
        else:
            # good, or unknown (never issued): the CRL does not list it either.
            state.check(serial, NOW)
            assert answer.status == ("good" if serial in registry.issued else "unknown")


def test_ocsp_request_format(pki: Ca) -> None:
    _, cert = pki.node("alice", serial=77)
    request = ocsp.load_der_ocsp_request(build_ocsp_request(cert, pki.root, NONCE))
    assert isinstance(request.hash_algorithm, hashes.SHA256)
    assert request.serial_number == 77
    assert request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == NONCE


@pytest.mark.parametrize("nonce", [b"", b"x" * 15, b"x" * 33, "x" * 16])
def test_ocsp_request_refuses_weak_nonces(pki: Ca, nonce: object) -> None:
    _, cert = pki.node("alice")
    with pytest.raises(LocalError, match="nonce"):
        build_ocsp_request(cert, pki.root, nonce)  # type: ignore[arg-type]


def test_ocsp_request_refuses_the_wrong_issuer(pki: Ca) -> None:
    _, cert = Ca(name="other-ca").node("alice")
    with pytest.raises(LocalError, match="issuer"):
        build_ocsp_request(cert, pki.root, NONCE)


def test_ocsp_response_format(pki: Ca) -> None:
    _, cert = pki.node("alice", serial=77)
    response = ocsp.load_der_ocsp_response(
        _respond(
            pki, build_ocsp_request(cert, pki.root, NONCE), lambda _s: OcspAnswer("revoked", NOW - DAY, "unspecified")
        )
    )
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.signature_algorithm_oid == x509.SignatureAlgorithmOID.ED25519
    assert response.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(pki.key.public_key()).digest
    assert response.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert response.revocation_reason is None  # "unspecified" is left out, as in the CRL
    assert (response.this_update_utc, response.next_update_utc) == (NOW, NOW + HOUR)
    assert response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == NONCE


def test_sha1_cert_ids_are_answered_in_kind(pki: Ca) -> None:
    _, cert = pki.node("alice", serial=77)
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, pki.root, hashes.SHA1())
    request = request.add_extension(x509.OCSPNonce(NONCE), critical=False)
    response = _respond(pki, request.build().public_bytes(serialization.Encoding.DER))
    assert isinstance(ocsp.load_der_ocsp_response(response).hash_algorithm, hashes.SHA1)
    assert verify_ocsp_response(response, cert=cert, root=pki.root, nonce=NONCE, now=NOW) == OcspAnswer("good")


def _by_hash_request(
    *,
    name_hash: bytes = b"\0" * 20,
    key_hash: bytes = b"\0" * 20,
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(name_hash, key_hash, 5, hashes.SHA1())
    for value, critical in extensions or []:
        builder = builder.add_extension(value, critical=critical)
    return builder.build().public_bytes(serialization.Encoding.DER)


def _md5_request() -> bytes:
    # cryptography will not build an MD5 CertID; swap the SHA-1 OID for MD5's by hand.
    sha1_alg = bytes.fromhex("300906052b0e03021a0500")
    md5_alg = bytes.fromhex("300c06082a864886f70d02050500")
    request = _by_hash_request()
    assert sha1_alg in request
    cert_id = tlv(0x30, md5_alg + tlv(0x04, b"\0" * 20) + tlv(0x04, b"\0" * 20) + bytes.fromhex("020105"))
    return tlv(0x30, tlv(0x30, tlv(0x30, tlv(0x30, cert_id))))


@pytest.mark.parametrize(
    "request_der",
    [
        b"",
        b"garbage",
        b"\x30\x00",
        _md5_request(),
        _by_hash_request(
            extensions=[(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"), True)]
        ),
        _by_hash_request(extensions=[(x509.OCSPNonce(b"x" * 33), False)]),
        _by_hash_request(extensions=[(x509.OCSPNonce(b""), False)]),
    ],
    ids=["empty", "garbage", "empty-seq", "md5", "unknown-critical", "long-nonce", "empty-nonce"],
)
def test_malformed_request_gets_malformed_response(pki: Ca, request_der: bytes) -> None:
    response = _respond(pki, request_der, lambda _s: pytest.fail("lookup must not be consulted"))
    assert _status(response) is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    _, cert = pki.node("alice")
    with pytest.raises(OcspError, match="MALFORMED_REQUEST"):
        verify_ocsp_response(response, cert=cert, root=pki.root, nonce=NONCE, now=NOW)


def test_request_for_another_issuer_is_unauthorized(pki: Ca, rogue: Ca) -> None:
    _, cert = rogue.node("alice")
    response = _respond(pki, build_ocsp_request(cert, rogue.root, NONCE), lambda _s: pytest.fail("not consulted"))
    assert _status(response) is ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_unknown_noncritical_request_extension_is_ignored(pki: Ca) -> None:
    root = pki.root
    name_hash, key_hash = _hashes(root, hashes.SHA1())
    request = _by_hash_request(
        name_hash=name_hash,
        key_hash=key_hash,
        extensions=[(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"), False)],
    )
    assert _status(_respond(pki, request)) is ocsp.OCSPResponseStatus.SUCCESSFUL


def _hashes(root: x509.Certificate, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:
    # cryptography computes the CertID itself when given certificates; read its answer back.
    probe = ocsp.OCSPRequestBuilder().add_certificate(root, root, algorithm).build()
    return probe.issuer_name_hash, probe.issuer_key_hash


def test_build_ocsp_response_refuses_bad_arguments(pki: Ca) -> None:
    _, cert = pki.node("alice")
    request = build_ocsp_request(cert, pki.root, NONCE)
    with pytest.raises(LocalError, match="validity"):
        _respond(pki, request, validity=timedelta(0))
    with pytest.raises(LocalError, match="timezone-aware"):
        _respond(pki, request, now=NOW.replace(tzinfo=None))
    with pytest.raises(LocalError, match="OcspAnswer"):
        _respond(pki, request, lambda _s: "good")  # type: ignore[arg-type,return-value]
    with pytest.raises(LocalError, match="does not belong"):
        build_ocsp_response(
            request, ca_key=ed_key(5), ca_cert=pki.root, lookup=lambda _s: OcspAnswer("good"), now=NOW, validity=HOUR
        )


def test_responder_needs_an_ed25519_ca(pki: Ca) -> None:
    ec_root = (
        x509.CertificateBuilder()
        .subject_name(cn("ec-ca"))
        .issuer_name(cn("ec-ca"))
        .public_key(ec_key().public_key())
        .serial_number(1)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .sign(pki.key, None)
    )
    _, cert = pki.node("alice")
    response = _respond(pki, build_ocsp_request(cert, pki.root, NONCE))
    with pytest.raises(LocalError, match="Ed25519"):
        verify_ocsp_response(response, cert=cert, root=ec_root, nonce=NONCE, now=NOW)


# verify_ocsp_response refusals -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def asked(pki: Ca) -> tuple[x509.Certificate, bytes]:
    _, cert = pki.node("alice", serial=77)
    return cert, build_ocsp_request(cert, pki.root, NONCE)


def test_nonce_mismatch(pki: Ca, asked: tuple[x509.Certificate, bytes]) -> None:
    cert, request = asked
    response = _respond(pki, request)
    with pytest.raises(OcspError, match="nonce differs"):
        verify_ocsp_response(response, cert=cert, root=pki.root, nonce=bytes(16), now=NOW)


def test_nonce_missing(pki: Ca, asked: tuple[x509.Certificate, bytes]) -> None:
    cert, _ = asked
    without = ocsp.OCSPRequestBuilder().add_certificate(cert, pki.root, hashes.SHA256()).build()
    response = _respond(pki, without.public_bytes(serialization.Encoding.DER))
    assert len(ocsp.load_der_ocsp_response(response).extensions) == 0
    with pytest.raises(OcspError, match="no nonce"):
        verify_ocsp_response(response, cert=cert, root=pki.root, nonce=NONCE, now=NOW)


def test_wrong_signer(pki: Ca, rogue: Ca, asked: tuple[x509.Certificate, bytes]) -> None:
    cert, _ = asked
    # The rogue CA shares the name; it answers a request naming its own key, and signs.
    forged = _respond(rogue, build_ocsp_request(cert, rogue.root, NONCE))
    with pytest.raises(OcspError, match="not signed by the pinned root"):
        verify_ocsp_response(forged, cert=cert, root=pki.root, nonce=NONCE, now=NOW)


def test_response_about_another_certificate(pki: Ca, asked: tuple[x509.Certificate, bytes]) -> None:
    cert, _ = asked
    _, bob = pki.node("bob", serial=78)
    response = _respond(pki, build_ocsp_request(bob, pki.root, NONCE))
    with pytest.raises(OcspError, match="another certificate"):
        verify_ocsp_response(response, cert=cert, root=pki.root, nonce=NONCE, now=NOW)
    _, stranger = Ca(name="other-ca", seed="other-ca").node("alice", serial=77)
    with pytest.raises(OcspError, match="another certificate"):
        verify_ocsp_response(_respond(pki, asked[1]), cert=stranger, root=pki.root, nonce=NONCE, now=NOW)


def _signed(
    pki: Ca,
    *,
    serial: int = 77,
    name_hash: bytes | None = None,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    revocation_time: datetime | None = None,
    reason: x509.ReasonFlags | None = None,
    next_update: datetime | None = NOW + HOUR,
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
) -> bytes:
    """A response signed by the real CA, built by hand to say odd things."""
    real_name_hash, key_hash = _hashes(pki.root, hashes.SHA256())
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        name_hash or real_name_hash,
        key_hash,
        serial,
        hashes.SHA256(),
        status,
        NOW,
        next_update,
        revocation_time,
        reason,
    )
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.NAME, pki.root)
    for value, critical in extensions if extensions is not None else [(x509.OCSPNonce(NONCE), False)]:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(pki.key, None).public_bytes(serialization.Encoding.DER)


def test_hand_built_response_is_accepted(pki: Ca, asked: tuple[x509.Certificate, bytes]) -> None:
    # The control for the refusals below: _signed's defaults make a response verify_ocsp_response accepts.
    cert, _ = asked
    assert verify_ocsp_response(_signed(pki), cert=cert, root=pki.root, nonce=NONCE, now=NOW) == OcspAnswer("good")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name_hash": b"\1" * 32}, "another issuer"),
        ({"next_update": None}, "no nextUpdate"),
        (
            {"status": ocsp.OCSPCertStatus.REVOKED, "revocation_time": NOW, "reason": x509.ReasonFlags.remove_from_crl},
            "unusable reason",
        ),
        (
            {
                "extensions": [
                    (x509.OCSPNonce(NONCE), False),
                    (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"), True),
                ]
            },
            "unknown critical",
        ),
    ],
    ids=["issuer-hash", "no-next-update", "remove-from-crl", "unknown-critical"],
)
def test_odd_responses_are_refused(
    pki: Ca, asked: tuple[x509.Certificate, bytes], kwargs: dict[str, object], match: str
) -> None:
    cert, _ = asked
    with pytest.raises(OcspError, match=match):
        verify_ocsp_response(_signed(pki, **kwargs), cert=cert, root=pki.root, nonce=NONCE, now=NOW)  # type: ignore[arg-type]


OCSP_BASIC = tlv(0x06, bytes.fromhex("2b0601050507300101"))
CRITICAL_UNKNOWN_EXT = bytes.fromhex("300c06032a03040101ff04020500")
NONCRITICAL_UNKNOWN_EXT = bytes.fromhex("300906032a030404020500")


def _reissue(pki: Ca, response_der: bytes, edit: Callable[[list[bytes]], None]) -> bytes:
    """Edit the ResponseData of a response (as a list of its TLVs), sign it again with the real CA."""
    tag, body = split_one(ocsp.load_der_ocsp_response(response_der).tbs_response_bytes)
    parts = split(body)  # responderID, producedAt, responses, [1] responseExtensions
    edit(parts)
    basic = resign(tlv(tag, b"".join(parts)), pki.key)
    return tlv(0x30, bytes.fromhex("0a0100") + tlv(0xA0, tlv(0x30, OCSP_BASIC + tlv(0x04, basic))))


def _edit_single(parts: list[bytes], edit: Callable[[list[bytes]], list[bytes]]) -> None:
    tag, body = split_one(parts[2])
    singles = []
    for single in split(body):
        single_tag, single_body = split_one(single)
        singles.append(tlv(single_tag, b"".join(edit(split(single_body)))))
    parts[2] = tlv(tag, b"".join(singles))


def _twice(parts: list[bytes]) -> None:
    tag, body = split_one(parts[2])
    parts[2] = tlv(tag, body + body)


def _duplicate_nonce(parts: list[bytes]) -> None:
    tag, body = split_one(parts[3])
    seq_tag, exts = split_one(body)
    parts[3] = tlv(tag, tlv(seq_tag, exts + exts))


def _add_response_extension(parts: list[bytes]) -> None:
    tag, body = split_one(parts[3])
    seq_tag, exts = split_one(body)
    parts[3] = tlv(tag, tlv(seq_tag, NONCRITICAL_UNKNOWN_EXT + exts))


def _unknown_hash(parts: list[bytes]) -> None:
    def edit(fields: list[bytes]) -> list[bytes]:
        cert_id = split(split_one(fields[0])[1])
        cert_id[0] = tlv(0x30, tlv(0x06, bytes.fromhex("2a0304")))
        return [tlv(0x30, b"".join(cert_id)), *fields[1:]]

    _edit_single(parts, edit)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda parts: None, None),
        (_twice, "2 answers"),
        (_duplicate_nonce, "does not parse"),
        (_unknown_hash, "does not parse"),
        (lambda parts: _edit_single(parts, lambda f: [*f, tlv(0xA1, tlv(0x30, CRITICAL_UNKNOWN_EXT))]), "critical"),
        (lambda parts: _edit_single(parts, lambda f: [*f, tlv(0xA1, tlv(0x30, NONCRITICAL_UNKNOWN_EXT))]), None),
        (_add_response_extension, None),
    ],
    ids=[
        "control",
        "two-answers",
        "duplicate-nonce",
        "unknown-hash",
        "critical-single-extension",
        "noncritical-single-extension",
        "noncritical-response-extension",
    ],
)
def test_reshaped_responses(
    pki: Ca, asked: tuple[x509.Certificate, bytes], edit: Callable[[list[bytes]], None], match: str | None
) -> None:
    cert, request = asked
    data = _reissue(pki, _respond(pki, request), edit)
    if match is None:
        assert verify_ocsp_response(data, cert=cert, root=pki.root, nonce=NONCE, now=NOW) == OcspAnswer("good")
        return
    with pytest.raises(OcspError, match=match):
        verify_ocsp_response(data, cert=cert, root=pki.root, nonce=NONCE, now=NOW)


def test_response_freshness(pki: Ca, asked: tuple[x509.Certificate, bytes]) -> None:
    cert, request = asked
    response = _respond(pki, request, validity=HOUR)

    def check(now: datetime) -> OcspAnswer:
        return verify_ocsp_response(response, cert=cert, root=pki.root, nonce=NONCE, now=now)

    assert check(NOW + HOUR + CLOCK_SKEW).status == "good"
    assert check(NOW - CLOCK_SKEW).status == "good"
    with pytest.raises(OcspError, match="stale since"):
        check(NOW + HOUR + CLOCK_SKEW + SECOND)
    with pytest.raises(OcspError, match="in the future"):
        check(NOW - CLOCK_SKEW - SECOND)
    with pytest.raises(LocalError):
        check(NOW.replace(tzinfo=None))


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x30\x00"])
def test_garbage_response(pki: Ca, asked: tuple[x509.Certificate, bytes], data: bytes) -> None:
    with pytest.raises(OcspError, match="does not parse"):
        verify_ocsp_response(data, cert=asked[0], root=pki.root, nonce=NONCE, now=NOW)


@pytest.mark.filterwarnings("ignore:Parsed a serial number")
def test_every_single_bit_flip_in_a_response_is_refused(pki: Ca, asked: tuple[x509.Certificate, bytes]) -> None:
    cert, request = asked
    data = _respond(pki, request, lambda _s: OcspAnswer("revoked", NOW - DAY, "key-compromise"))
    original = verify_ocsp_response(data, cert=cert, root=pki.root, nonce=NONCE, now=NOW)
    assert original.status == "revoked"
    # The signature BIT STRING's unused-bits octet lies outside the signed bytes, and cryptography
    # ignores it (see test_non_canonical_signature_encoding_is_refused): a flip there may be accepted,
    # but can only ever yield the very same signed answer.
    padding_octet = len(data) - 65
    assert data[padding_octet - 2 : padding_octet + 1] == b"\x03\x41\x00"
    for i in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[i // 8] ^= 1 << (i % 8)
        if i // 8 == padding_octet:
            with contextlib.suppress(OcspError):
                assert verify_ocsp_response(bytes(flipped), cert=cert, root=pki.root, nonce=NONCE, now=NOW) == original
            continue
        with pytest.raises(OcspError):
            verify_ocsp_response(bytes(flipped), cert=cert, root=pki.root, nonce=NONCE, now=NOW)


def test_openssl_request_is_answered_and_openssl_accepts_the_answer(pki: Ca, tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary")
    _, cert = pki.node("alice", serial=77)
    (tmp_path / "root.pem").write_bytes(certs.certificate_pem(pki.root))
    (tmp_path / "alice.pem").write_bytes(certs.certificate_pem(cert))
    req, resp = tmp_path / "req.der", tmp_path / "resp.der"
    made = subprocess.run(
        [
            openssl,
            "ocsp",
            "-issuer",
            str(tmp_path / "root.pem"),
            "-cert",
            str(tmp_path / "alice.pem"),
            "-reqout",
            str(req),
        ],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    parsed = ocsp.load_der_ocsp_request(req.read_bytes())
    assert isinstance(parsed.hash_algorithm, hashes.SHA1)  # openssl's default CertID hash
    nonce = parsed.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    revoked = OcspAnswer("revoked", NOW - DAY, "key-compromise")
    resp.write_bytes(_respond(pki, req.read_bytes(), lambda _s: revoked))
    checked = subprocess.run(
        [
            openssl,
            "ocsp",
            "-reqin",
            str(req),
            "-respin",
            str(resp),
            "-VAfile",
            str(tmp_path / "root.pem"),
            "-resp_text",
        ],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr
    assert "Response verify OK" in checked.stderr + checked.stdout
    assert "Cert Status: revoked" in checked.stdout
    assert verify_ocsp_response(resp.read_bytes(), cert=cert, root=pki.root, nonce=nonce, now=NOW) == revoked


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def test_crl_against_a_leaf_posing_as_root_is_refused(pki: Ca) -> None:
    _, leaf = pki.node("alice")
    with pytest.raises(CrlInvalid, match="not a CA"):
        verify_crl(pki.signed_crl(1), leaf, NOW)


def test_crl_numbers_fit_twenty_octets(pki: Ca) -> None:
    assert verify_crl(pki.signed_crl(2**159 - 1), pki.root, NOW).number == 2**159 - 1
    with pytest.raises(LocalError):
        pki.signed_crl(2**159)


def test_crl_under_an_expired_root_is_refused() -> None:
    key = ed_key(55)
    root = certs.make_root(key=key, name="old-ca", serial=1, not_before=NOW - 3 * YEAR, not_after=NOW - YEAR)
    crl = issue_crl(ca_key=key, ca_cert=root, number=1, this_update=NOW - 2 * YEAR, next_update=NOW - 2 * YEAR + DAY,
                    revoked=[])  # fmt: skip
    with pytest.raises(CrlInvalid, match="root expired"):
        verify_crl(crl, root, NOW)
