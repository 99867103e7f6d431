"""The certificate authority, a process of its own (`kmsnet ca ...`). Its rooms:

- `ca.authority`: `CertificateAuthority`, the door every caller uses; it opens a CA home and
  checks admin sessions before handing each action to its room;
- `ca.home`: the home directory (ca.pem, ca.db) and the names of what ca.db holds;
- `ca.policy`: the lifetimes the CA issues with, and the root that signs;
- `ca.records`: the one JSON codec of every record in ca.db;
- `ca.admin`: administrators: roles, TOTP, lock-out, logins and sessions;
- `ca.issuance`: enrolment tokens, enrolment, renewal, the relay's and the CA node's certificates;
- `ca.registry`: the register of issued certificates;
- `ca.revocation`: revocation, the CRL and OCSP answers;
- `ca.http`, `ca.admin_api`: the HTTP API; `ca.service`: the running CA and its CRL publisher;
- `ca.errors`: what the CA raises.

The CA may use the node's keystore, audit log and PKCS#11 building blocks; the node never imports it.
"""

from __future__ import annotations

from ca.admin import AdminSession
from ca.admin_api import AdminApi
from ca.authority import (
    CA_NODE_NAME,
    CaCreated,
    CaPolicy,
    CertificateAuthority,
    EnrolmentToken,
    IssuedCertificate,
    Revocation,
)
from ca.http import DEFAULT_PORT, CaHttpServer
from ca.service import CRL_CHECK_INTERVAL, CaService, CrlPublisher, serve

__all__ = [
    "CA_NODE_NAME",
    "CRL_CHECK_INTERVAL",
    "DEFAULT_PORT",
    "AdminApi",
    "AdminSession",
    "CaCreated",
    "CaHttpServer",
    "CaPolicy",
    "CaService",
    "CertificateAuthority",
    "CrlPublisher",
    "EnrolmentToken",
    "IssuedCertificate",
    "Revocation",
    "serve",
]
