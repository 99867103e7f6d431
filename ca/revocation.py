"""Revocation: revoking certificates, the CRL (numbered, persisted, re-issued on schedule) and OCSP answers.

`revoke` is an admin action, authorised by the caller (`CertificateAuthority`) before it reaches
`Revoker`; the CRL and OCSP are public. Whichever process revokes (`kmsnet ca revoke` while
`kmsnet ca serve` runs) issues and stores the new CRL itself, in the same transaction; the
running service publishes the stored one (`ca.service.CrlPublisher`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime

from cryptography import x509

from ca.errors import CertificateNotFound, InvalidRequest
from ca.home import AUDIT_LOG, NS_CA
from ca.policy import Signer
from ca.registry import CA_NODE_NAME, IssuedCertificate, Registry, check_node_name, serial_name
from node.audit import AuditValue
from node.clock import renewal_due
from node.errors import KeystoreCorrupt
from protocol.revocation import REASONS, OcspAnswer, RevokedEntry, build_ocsp_response, issue_crl

__all__ = ["Revocation", "Revoker"]

log = logging.getLogger("kmsnet.ca")


@dataclass(frozen=True)
class Revocation:
    """What `revoke` did: the certificates it revoked and the number of the CRL that lists them."""

    certificates: tuple[IssuedCertificate, ...]
    crl_number: int


@dataclass(frozen=True)
class Revoker:
    """Revokes certificates of `registry` and signs the CRL and OCSP answers with `signer`."""

    registry: Registry
    signer: Signer

    def revoke(self, name: str | None, serial: int | None, reason: str, *, actor: str, now: datetime) -> Revocation:
        """Revoke by name or serial and issue a new CRL at once (see `CertificateAuthority.revoke`).

        With `name`, every unrevoked node certificate for any key `name` was ever certified with
        that may still back a session (`IssuedCertificate.may_back_session`: until CRL_RETENTION
        past its notAfter, so also one that expired a moment ago, or the one a renewal replaced).
        """
        if reason not in REASONS:
            raise InvalidRequest(f"unknown revocation reason {reason!r}; expected one of {', '.join(REASONS)}")
        if name is None and serial is None:
            raise InvalidRequest("name a node or give a serial to revoke")
        if name is not None:
            check_node_name(name)
        with self.registry.keystore.transaction():
            targets = self._targets(name, serial, now)
            if any(r.kind == "node" and r.name == CA_NODE_NAME for r in targets):
                raise InvalidRequest(f"{CA_NODE_NAME!r} is the CA's own node: it is not revoked this way")
            revoked = tuple(replace(r, revoked_at=now, reason=reason) for r in targets)
            for record in revoked:
                self.registry.store(record)
                fields = {"name": record.name, "serial": serial_name(record.serial), "reason": reason}
                self.registry.audit.append(actor, "certificate_revoked", fields)
            number = self._issue_crl(now)[1]
        for record in revoked:
            log.info(
                "certificate_revoked",
                extra={"fields": {"name": record.name, "serial": serial_name(record.serial), "reason": reason}},
            )
        return Revocation(certificates=revoked, crl_number=number)

    def _targets(self, name: str | None, serial: int | None, now: datetime) -> list[IssuedCertificate]:
        """The records `revoke` revokes (inside its transaction); `CertificateNotFound` if none."""
        if serial is not None:
            record = self.registry.get(serial)
            if record is None or (name is not None and record.name != name):
                whose = f" to {name!r}" if name is not None else ""
                raise CertificateNotFound(f"this CA issued no certificate {serial:x}{whose}")
            if record.revoked_at is not None:
                raise CertificateNotFound(f"certificate {serial:x} is revoked already")
            return [record]
        nodes = [r for r in self.registry.records() if r.kind == "node"]
        keys = {r.public_key() for r in nodes if r.name == name}
        targets = [
            r
            for r in nodes
            if r.revoked_at is None and r.may_back_session(now) and (r.name == name or r.public_key() in keys)
        ]
        if not targets:
            raise CertificateNotFound(f"{name!r} holds no valid certificate to revoke: none could still back a session")
        return targets

    # --- CRL -------------------------------------------------------------------------------------------

    def current_crl(self, now: datetime) -> bytes:
        """The CRL to publish now (see `CertificateAuthority.current_crl`), re-issued when due."""
        keystore = self.registry.keystore
        # Read first: `serve` asks every second, and the write lock is only needed to re-issue.
        held = keystore.get(NS_CA, "crl")
        if held is not None and not _crl_due(held, now):
            return held
        with keystore.transaction():
            held = keystore.get(NS_CA, "crl")
            if held is not None and not _crl_due(held, now):
                return held
            return self._issue_crl(now)[0]

    def _issue_crl(self, now: datetime) -> tuple[bytes, int]:
        """Issue, persist, audit and return the next CRL and its number (inside the caller's transaction).

        It lists every revoked certificate while it may back a session (until CRL_RETENTION past
        its notAfter, `IssuedCertificate.may_back_session`). The number is
        persisted with the CRL, so it only ever rises.
        """
        keystore = self.registry.keystore
        raw_number = keystore.get(NS_CA, "crl_number")
        try:
            number = int(raw_number or b"0") + 1
        except ValueError as exc:
            raise KeystoreCorrupt(f"{keystore.path} holds an unreadable CRL number") from exc
        revoked = [
            RevokedEntry(r.serial, r.revoked_at, r.reason or "unspecified")
            for r in self.registry.records()
            if r.revoked_at is not None and r.may_back_session(now)
        ]
        next_update = now + self.signer.policy.crl_lifetime
        der = issue_crl(
            ca_key=self.signer.key,
            ca_cert=self.signer.root,
            number=number,
            this_update=now,
            next_update=next_update,
            revoked=revoked,
        )
        keystore.put(NS_CA, "crl_number", str(number).encode())
        keystore.put(NS_CA, "crl", der)
        fields: dict[str, AuditValue] = {
            "number": number,
            "revoked": len(revoked),
            "next_update": next_update.isoformat(),
        }
        self.registry.audit.append(AUDIT_LOG, "crl_issued", fields)
        log.info("crl_issued", extra={"fields": fields})
        return der, number

    # --- OCSP ------------------------------------------------------------------------------------------

    def ocsp_status(self, serial: int) -> OcspAnswer:
        """What this CA says about `serial`: revoked (time, reason), good (issued, not revoked), else unknown."""
        record = self.registry.get(serial)
        if record is None:
            return OcspAnswer("unknown")
        if record.revoked_at is not None:
            return OcspAnswer("revoked", record.revoked_at, record.reason or "unspecified")
        return OcspAnswer("good")

    def ocsp_response(self, request_der: bytes, now: datetime) -> bytes:
        """Answer one DER OCSP request (see `CertificateAuthority.ocsp_response`)."""
        return build_ocsp_response(
            request_der,
            ca_key=self.signer.key,
            ca_cert=self.signer.root,
            lookup=self.ocsp_status,
            now=now,
            validity=self.signer.policy.ocsp_validity,
        )


def _crl_due(der: bytes, now: datetime) -> bool:
    crl = x509.load_der_x509_crl(der)
    end = crl.next_update_utc
    # Never None (issue_crl always sets nextUpdate); a clock set back before thisUpdate gets a fresh CRL.
    return end is None or renewal_due(crl.last_update_utc, end, now)
