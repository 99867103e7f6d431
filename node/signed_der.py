"""X.509 objects signed by an Ed25519 key that `cryptography` does not hold (a PKCS#11 token's).

`cryptography` builds every certificate, CRL, OCSP response and CSR, but signs only with keys it
holds. So `DelegatedEd25519` lets it sign with a throwaway key, takes the to-be-signed bytes it
made, has the real key sign those (in its device), and puts the real signature in place of the
throwaway one with pyasn1, an ASN.1 library, never by hand. Ed25519 has one AlgorithmIdentifier
and no parameters, so the to-be-signed bytes do not depend on which Ed25519 key signs them.

Every result is parsed back with `cryptography` and its signature verified under the real public
key before it is returned: a device that signed with another key, or an assembly that changed a
byte, fails here (`SigningFailed`) and never reaches a relying party.
"""

from __future__ import annotations

import abc
import hashlib
from typing import cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import namedtype, univ
from pyasn1_modules import rfc5280, rfc6960

from node.errors import NodeError

__all__ = ["DelegatedEd25519", "SigningFailed"]


class SigningFailed(NodeError):
    """The device's signature did not verify, or the signed object did not assemble."""


class _Signed(univ.Sequence):  # type: ignore[misc]  # pyasn1 is untyped
    """X.509's SIGNED{} shape, shared by Certificate, CertificateList and CertificationRequest:
    the to-be-signed part and the algorithm kept as the exact bytes `cryptography` wrote."""

    componentType = namedtype.NamedTypes(
        namedtype.NamedType("tbs", univ.Any()),
        namedtype.NamedType("algorithm", univ.Any()),
        namedtype.NamedType("signature", univ.BitString()),
    )


def _decode(der: bytes, spec: univ.Sequence) -> univ.Sequence:
    try:
        value, rest = der_decoder.decode(der, asn1Spec=spec)
    except PyAsn1Error as exc:
        raise SigningFailed("the object to sign does not parse") from exc
    if rest:
        raise SigningFailed("the object to sign has trailing bytes")
    return cast(univ.Sequence, value)


class DelegatedEd25519(abc.ABC):
    """An Ed25519 key whose `sign` runs elsewhere; implements `protocol.certs.DelegatedKey` and CSRs.

    Subclasses give `sign` and `public_key`; everything X.509 is done here.
    """

    @abc.abstractmethod
    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of `data` (64 bytes)."""

    @abc.abstractmethod
    def public_key(self) -> Ed25519PublicKey:
        """The key's public half."""

    def _signature(self, tbs: bytes) -> bytes:
        signature = self.sign(tbs)
        try:
            self.public_key().verify(signature, tbs)
        except InvalidSignature as exc:
            raise SigningFailed("the device's signature does not verify under its public key") from exc
        return signature

    def _resign(self, der: bytes, tbs: bytes) -> bytes:
        """`der` (SIGNED{} by a throwaway key over `tbs`) with this key's signature instead."""
        signed = _decode(der, _Signed())
        if bytes(signed["tbs"]) != tbs:
            raise SigningFailed("the to-be-signed bytes moved while assembling")
        signed["signature"] = univ.BitString.fromOctetString(self._signature(tbs))
        return cast(bytes, der_encoder.encode(signed))

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """The certificate `builder` describes, signed by this key."""
        draft = builder.sign(Ed25519PrivateKey.generate(), None)
        der = self._resign(draft.public_bytes(_DER), draft.tbs_certificate_bytes)
        return x509.load_der_x509_certificate(der)

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        """The CRL `builder` describes, signed by this key."""
        draft = builder.sign(Ed25519PrivateKey.generate(), None)
        der = self._resign(draft.public_bytes(_DER), draft.tbs_certlist_bytes)
        return x509.load_der_x509_crl(der)

    def sign_csr(self, builder: x509.CertificateSigningRequestBuilder) -> x509.CertificateSigningRequest:
        """The CSR `builder` describes, for this key (its subject key is set here), signed by it."""
        throwaway = Ed25519PrivateKey.generate()
        draft = builder.sign(throwaway, None)
        # A CSR carries its own public key: swap the throwaway's for ours in the to-be-signed part.
        info = _decode(draft.tbs_certrequest_bytes, _CertificationRequestInfo())
        info["subjectPKInfo"] = univ.Any(_spki_der(self.public_key()))
        tbs = cast(bytes, der_encoder.encode(info))
        signed = _decode(draft.public_bytes(_DER), _Signed())
        signed["tbs"] = univ.Any(tbs)
        signed["signature"] = univ.BitString.fromOctetString(self._signature(tbs))
        csr = x509.load_der_x509_csr(cast(bytes, der_encoder.encode(signed)))
        if not csr.is_signature_valid:
            raise SigningFailed("the assembled CSR does not verify")
        return csr

    def sign_ocsp_response(self, builder: ocsp.OCSPResponseBuilder, responder: x509.Certificate) -> ocsp.OCSPResponse:
        """The OCSP response `builder` describes, responder ID by hash of this key, `responder` attached.

        `cryptography` insists that the responder certificate holds the signing key, so the draft is
        made with a stand-in certificate for the throwaway key; the responder ID (SHA-1 of the key,
        RFC 6960 4.2.1) and the attached certificate are then set to ours before signing.
        """
        throwaway = Ed25519PrivateKey.generate()
        draft = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, _stand_in(throwaway, responder)).sign(
            throwaway, None
        )
        outer = _decode(draft.public_bytes(_DER), rfc6960.OCSPResponse())
        basic = _decode(bytes(outer["responseBytes"]["response"]), rfc6960.BasicOCSPResponse())
        data = basic["tbsResponseData"]
        data["responderID"]["byKey"] = hashlib.sha1(self.public_key().public_bytes_raw()).digest()  # noqa: S324 - RFC 6960's KeyHash is SHA-1
        basic["certs"][0] = _decode(responder.public_bytes(_DER), rfc5280.Certificate())
        tbs = cast(bytes, der_encoder.encode(data))
        basic["signature"] = univ.BitString.fromOctetString(self._signature(tbs))
        outer["responseBytes"]["response"] = der_encoder.encode(basic)
        response = ocsp.load_der_ocsp_response(cast(bytes, der_encoder.encode(outer)))
        if response.tbs_response_bytes != tbs:
            raise SigningFailed("the to-be-signed bytes moved while assembling")
        return response


class _CertificationRequestInfo(univ.Sequence):  # type: ignore[misc]  # pyasn1 is untyped
    """RFC 2986's CertificationRequestInfo, each field kept as the bytes `cryptography` wrote."""

    componentType = namedtype.NamedTypes(
        namedtype.NamedType("version", univ.Any()),
        namedtype.NamedType("subject", univ.Any()),
        namedtype.NamedType("subjectPKInfo", univ.Any()),
        namedtype.NamedType("attributes", univ.Any()),
    )


_DER = serialization.Encoding.DER


def _spki_der(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(_DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _stand_in(key: Ed25519PrivateKey, responder: x509.Certificate) -> x509.Certificate:
    """A certificate for `key` named like `responder`: only ever signs a draft, never leaves here."""
    name = responder.subject if len(responder.subject) else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "-")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(responder.not_valid_before_utc)
        .not_valid_after(responder.not_valid_after_utc)
        .sign(key, None)
    )
