"""Helpers and fixtures of tests/node/test_enrol.py that other test modules use too."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from ca import CertificateAuthority
from ca.admin import secret_from_uri
from ca.http import CaHttpServer
from node.clock import utcnow
from node.enrol import Enrolment, enrol_node
from node.keystore import ARGON2_TEST
from tests.support.ca_helpers import Admin

PASS = "enrol test passphrase"
CA_PASS = "ca passphrase"
RELAY = "ws://127.0.0.1:8765"


@dataclass
class RunningCa:
    authority: CertificateAuthority
    server: CaHttpServer
    fingerprint: str
    admin: Admin

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture
async def ca(tmp_path: Path) -> AsyncIterator[RunningCa]:
    created = CertificateAuthority.init(tmp_path / "ca", CA_PASS, argon2=ARGON2_TEST)
    with CertificateAuthority.open(tmp_path / "ca", CA_PASS) as authority:
        async with CaHttpServer(authority, port=0) as server:
            admin = Admin(authority, secret_from_uri(created.admin.otpauth))
            yield RunningCa(authority, server, created.fingerprint, admin)


async def enrol(
    home: Path,
    name: str,
    ca_url: str,
    token: str,
    *,
    relay_url: str = RELAY,
    ca_fingerprint: str | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> Enrolment:
    """enrol_node in a thread: it blocks on HTTP, and the CA serves on this test's event loop."""
    call = functools.partial(
        enrol_node,
        home,
        name,
        ca_url,
        token,
        relay_url,
        PASS,
        ca_fingerprint=ca_fingerprint,
        argon2=ARGON2_TEST,
        clock=clock,
    )
    return await asyncio.to_thread(call)
