"""ca.records: the CA's JSON records read back what earlier versions of the CA wrote, byte for byte.

The literals below are records as the CA wrote them before `ca.records` existed (each record class
had its own hand-written codec then), captured from that code: PEM as ASCII text, digests and
secrets as hex, lifetimes as whole seconds, times as ISO 8601. A ca.db made by an older kmsnet must
open, and rewriting a record it holds must not change it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest

from ca.admin import AdminRecord, SessionRecord
from ca.issuance import TokenRecord
from ca.policy import CaPolicy
from ca.records import TEXT, JsonRecord
from ca.registry import IssuedCertificate
from node.errors import KeystoreCorrupt

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DIGEST = bytes(range(32))
PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

OLD_RECORDS: list[tuple[type[JsonRecord], bytes, JsonRecord]] = [
    (
        CaPolicy,
        b'{"certificate_validity":604800,"crl_lifetime":1800,"ocsp_validity":3600,"root_validity":315360000,'
        b'"server_validity":7776000}',
        CaPolicy(crl_lifetime=timedelta(minutes=30)),
    ),
    (
        IssuedCertificate,
        b'{"fingerprint":"abababababababababababababababababababababababababababababababab",'
        b'"issued_at":"2025-03-01T12:00:00+00:00","kind":"node","name":"alice",'
        b'"not_after":"2025-03-08T12:00:00+00:00","not_before":"2025-03-01T12:00:00+00:00",'
        b'"pem":"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n","reason":null,"revoked_at":null,'
        b'"serial":305441741}',
        IssuedCertificate(
            serial=0x1234ABCD,
            kind="node",
            name="alice",
            not_before=T0,
            not_after=T0 + timedelta(days=7),
            fingerprint="ab" * 32,
            issued_at=T0,
            pem=PEM,
        ),
    ),
    (
        IssuedCertificate,
        b'{"fingerprint":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",'
        b'"issued_at":"2025-03-01T12:00:00+00:00","kind":"server","name":"relay.example,127.0.0.1",'
        b'"not_after":"2025-05-30T12:00:00+00:00","not_before":"2025-03-01T12:00:00+00:00",'
        b'"pem":"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n","reason":"keyCompromise",'
        b'"revoked_at":"2025-03-01T13:00:00+00:00","serial":305441742}',
        IssuedCertificate(
            serial=0x1234ABCE,
            kind="server",
            name="relay.example,127.0.0.1",
            not_before=T0,
            not_after=T0 + timedelta(days=90),
            fingerprint="cd" * 32,
            issued_at=T0,
            pem=PEM,
            revoked_at=T0 + timedelta(hours=1),
            reason="keyCompromise",
        ),
    ),
    (
        TokenRecord,
        b'{"created":"2025-03-01T12:00:00+00:00",'
        b'"digest":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",'
        b'"expires":"2025-03-01T13:00:00+00:00","name":"bob","serial":null,"used":null}',
        TokenRecord(digest=DIGEST, name="bob", created=T0, expires=T0 + timedelta(hours=1)),
    ),
    (
        TokenRecord,
        b'{"created":"2025-03-01T12:00:00+00:00",'
        b'"digest":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",'
        b'"expires":"2025-03-01T13:00:00+00:00","name":"bob","serial":77,"used":"2025-03-01T12:05:00+00:00"}',
        TokenRecord(
            digest=DIGEST,
            name="bob",
            created=T0,
            expires=T0 + timedelta(hours=1),
            used=T0 + timedelta(minutes=5),
            serial=77,
        ),
    ),
    (
        SessionRecord,
        b'{"admin":"admin","created":"2025-03-01T12:00:00+00:00",'
        b'"digest":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",'
        b'"expires":"2025-03-01T12:15:00+00:00","role":"operator"}',
        SessionRecord(digest=DIGEST, admin="admin", role="operator", created=T0, expires=T0 + timedelta(minutes=15)),
    ),
    (
        AdminRecord,
        b'{"created":"2025-03-01T12:00:00+00:00","failures":[],"last_step":null,"locked_until":null,"name":"admin",'
        b'"role":"admin","secret":"000102030405060708090a0b0c0d0e0f10111213"}',
        AdminRecord(name="admin", role="admin", secret=bytes(range(20)), created=T0),
    ),
    (
        AdminRecord,
        b'{"created":"2025-03-01T12:00:00+00:00","failures":["2025-03-01T12:00:00+00:00","2025-03-01T12:00:30+00:00"],'
        b'"last_step":58000000,"locked_until":"2025-03-01T12:05:00+00:00","name":"carol","role":"auditor",'
        b'"secret":"000102030405060708090a0b0c0d0e0f10111213"}',
        AdminRecord(
            name="carol",
            role="auditor",
            secret=bytes(range(20)),
            created=T0,
            last_step=58000000,
            failures=(T0, T0 + timedelta(seconds=30)),
            locked_until=T0 + timedelta(minutes=5),
        ),
    ),
]


@pytest.mark.parametrize(("kind", "data", "value"), OLD_RECORDS)
def test_records_written_by_the_earlier_codecs_decode_and_re_encode_byte_for_byte(
    kind: type[JsonRecord], data: bytes, value: JsonRecord
) -> None:
    assert kind.from_record(data) == value
    assert value.to_record() == data


def test_fields_a_record_lacks_take_their_defaults() -> None:
    # An issued-certificate record from before revocation existed; a policy naming one lifetime only.
    old = (
        b'{"fingerprint":"ab","issued_at":"2025-03-01T12:00:00+00:00","kind":"node","name":"alice",'
        b'"not_after":"2025-03-08T12:00:00+00:00","not_before":"2025-03-01T12:00:00+00:00","pem":"PEM","serial":5}'
    )
    record = IssuedCertificate.from_record(old)
    assert (record.revoked_at, record.reason, record.pem) == (None, None, b"PEM")
    assert CaPolicy.from_record(b'{"crl_lifetime":60}') == CaPolicy(crl_lifetime=timedelta(seconds=60))


@pytest.mark.parametrize(
    ("kind", "data", "words"),
    [
        (CaPolicy, b'{"crl_lifetime":0}', "the CA policy record"),  # the dataclass's own check refuses it
        (CaPolicy, b"[1]", "the CA policy record"),
        (CaPolicy, b'{"crl_lifetime":true}', "the CA policy record"),
        (
            SessionRecord,
            b'{"admin":"a","created":"2025-03-01T12:00:00+00:00","digest":"00",'
            b'"expires":"2025-03-01T12:15:00+00:00","role":"root"}',
            "an admin-session record",
        ),
        (TokenRecord, b'{"name":"bob"}', "an enrolment-token record"),
        (TokenRecord, b"not json", "an enrolment-token record"),
        (
            AdminRecord,
            b'{"created":"x","failures":[],"last_step":null,"locked_until":null,"name":"a",'
            b'"role":"admin","secret":"00"}',
            "an administrator record",
        ),
        (
            AdminRecord,
            b'{"created":"2025-03-01T12:00:00+00:00","failures":"no","last_step":null,'
            b'"locked_until":null,"name":"a","role":"admin","secret":"zz"}',
            "an administrator record",
        ),
    ],
)
def test_a_record_that_does_not_parse_is_reported_as_corrupt_by_kind(
    kind: type[JsonRecord], data: bytes, words: str
) -> None:
    with pytest.raises(KeystoreCorrupt, match=f"^{words} does not parse$"):
        kind.from_record(data)


@dataclass(frozen=True)
class _Example(JsonRecord):
    RECORD = "an example record"

    label: Literal["x", "y"]
    blob: bytes = field(metadata=TEXT)
    period: timedelta = timedelta(seconds=90)


def test_a_new_record_kind_needs_no_codec_of_its_own() -> None:
    value = _Example(label="y", blob=b"-----PEM-----\n")
    assert value.to_record() == b'{"blob":"-----PEM-----\\n","label":"y","period":90}'
    assert _Example.from_record(value.to_record()) == value
    with pytest.raises(KeystoreCorrupt, match="an example record"):
        _Example.from_record(b'{"blob":"","label":"z"}')
