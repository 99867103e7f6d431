"""Who the attacker can claim to be: a victim's real certificate signed for with a key that is not the
victim's, a rogue CA's certificate, or a stolen identity key; and the revocation check it uses for
itself (it refuses nothing)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.identity import IdentityKey
from scenarios.lab import Enrolled


class Impostor:
    """An identity the attacker *claims*: the victim's public key, with signatures made by a key the
    attacker does hold (its own, a rogue CA's subject's, or a stolen one). Duck-types IdentityKey for
    `handshake.initiate`/`respond`, which read `public_bytes` and call `sign`."""

    def __init__(self, public_bytes: bytes, signer: IdentityKey | None = None) -> None:
        self.public_bytes = public_bytes
        self._signer = signer or IdentityKey(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        """A signature by the attacker's key: valid only if that key is the victim's (stolen)."""
        return self._signer.sign(data)

    def identity(self) -> IdentityKey:
        """Typed as the handshake expects it."""
        return cast(IdentityKey, self)


@dataclass(frozen=True)
class Credentials:
    """How the attacker presents itself as a node: a certificate (DER) and who signs for it."""

    certificate: bytes
    signer: Impostor | IdentityKey

    @classmethod
    def claimed(cls, certificate: bytes) -> Credentials:
        """The victim's real certificate, signed for with a key that is not the victim's."""
        cert = x509.load_der_x509_certificate(certificate)
        public = cert.public_key().public_bytes_raw()  # type: ignore[union-attr]
        return cls(certificate, Impostor(public))

    @classmethod
    def stolen(cls, certificate: bytes, identity: IdentityKey) -> Credentials:
        """The victim's certificate and its stolen identity key: indistinguishable from the victim."""
        return cls(certificate, identity)

    @classmethod
    def rogue(cls, enrolled: Enrolled) -> Credentials:
        """A certificate from a CA nobody pinned, with its own (valid) key."""
        return cls(enrolled.certificate, enrolled.identity)

    @property
    def identity(self) -> IdentityKey:
        """Typed as the handshake expects it."""
        return self.signer.identity() if isinstance(self.signer, Impostor) else self.signer


class AnyRevocation:
    """The attacker's revocation check: it vouches for everything (it has no reason to refuse)."""

    def check(self, serial: int, now: datetime) -> None:
        """Never refuses."""
