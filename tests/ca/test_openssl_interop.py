"""The CA's CRL and OCSP answers checked by the system `openssl`, independently of our own verifiers.

openssl's exit codes do not say "revoked" or "stale" reliably (`openssl ocsp` exits 0 on a revoked
answer), so its text output is parsed. The CA runs on the real clock: openssl checks validity against it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ca import CaService, CertificateAuthority
from protocol import certs
from tests.support.ca_helpers import PASS, Admin, csr_pem, init_ca
from tests.support.softhsm import SoftHsm

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the system openssl is not installed")


async def openssl(*args: str | Path, stdin: bytes | None = None) -> str:
    """Run openssl (without blocking the loop that serves the CA); stdout and stderr together."""
    process = await asyncio.create_subprocess_exec(
        "openssl",
        *map(str, args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(stdin), 30)
    return out.decode(errors="replace")


@dataclass
class Pki:
    """A CA serving HTTP, its files on disk: ca.pem, good.pem (alice), revoked.pem (mallory), crl.der."""

    dir: Path
    service: CaService
    authority: CertificateAuthority

    @property
    def ca_pem(self) -> Path:
        return self.dir / "ca" / "ca.pem"

    @property
    def url(self) -> str:
        return self.service.url + "/"


@pytest.fixture(params=["file", "pkcs11"])
async def pki(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Pki]:
    """The same PKI with the root key in ca.db, then in a SoftHSM token."""
    hsm: SoftHsm | None = request.getfixturevalue("softhsm_token") if request.param == "pkcs11" else None
    secret = init_ca(tmp_path / "ca", token=hsm)
    with CertificateAuthority.open(tmp_path / "ca", PASS, pin=hsm.pin if hsm else None) as authority:
        assert (authority.key_token is not None) == (hsm is not None)
        admin = Admin(authority, secret)
        for name, file in (("alice", "good.pem"), ("mallory", "revoked.pem"), ("bob", "superseded.pem")):
            (tmp_path / file).write_bytes(authority.enrol(admin.token(name).secret, csr_pem(name)))
        authority.revoke("mallory", reason="key-compromise", session=admin.session)
        authority.revoke("bob", reason="superseded", session=admin.session)
        (tmp_path / "crl.der").write_bytes(authority.current_crl())
        async with CaService(authority, port=0) as service:
            yield Pki(tmp_path, service, authority)


async def test_openssl_verify_with_the_crl_says_revoked_or_ok(pki: Pki) -> None:
    crl_pem = pki.dir / "crl.pem"
    await openssl("crl", "-inform", "DER", "-in", pki.dir / "crl.der", "-outform", "PEM", "-out", crl_pem)
    base = ("verify", "-crl_check", "-purpose", "sslclient", "-CAfile", pki.ca_pem, "-CRLfile", crl_pem)
    good = await openssl(*base, pki.dir / "good.pem")
    assert good.strip() == f"{pki.dir / 'good.pem'}: OK", good
    revoked = await openssl(*base, pki.dir / "revoked.pem")
    assert "certificate revoked" in revoked and ": OK" not in revoked, revoked


async def test_openssl_reads_the_crl_number_and_the_reasons(pki: Pki) -> None:
    text = await openssl("crl", "-inform", "DER", "-in", pki.dir / "crl.der", "-noout", "-text")
    number = re.search(r"X509v3 CRL Number:\s*\n\s*(\d+)", text)
    assert number is not None, text
    assert int(number[1]) == 2  # one CRL per revocation
    assert "Key Compromise" in text and "Superseded" in text
    assert "Signature Algorithm: ED25519" in text
    serial = certs.load_certificate((pki.dir / "revoked.pem").read_bytes()).serial_number
    listed = {int(found, 16) for found in re.findall(r"Serial Number: ([0-9A-F]+)", text)}
    assert serial in listed and len(listed) == 2


async def test_openssl_reads_the_crl_served_over_http(pki: Pki) -> None:
    def fetch() -> bytes:
        with urllib.request.urlopen(pki.service.url + "/crl", timeout=10) as answer:
            return bytes(answer.read())

    der = await asyncio.to_thread(fetch)
    assert der == (pki.dir / "crl.der").read_bytes()
    text = await openssl("crl", "-inform", "DER", "-noout", "-text", stdin=der)
    assert "X509v3 CRL Number:" in text


@pytest.mark.parametrize(
    ("file", "status"),
    [("good.pem", "good"), ("revoked.pem", "revoked"), ("superseded.pem", "revoked")],
)
async def test_openssl_ocsp_verifies_the_response_and_reads_the_status(pki: Pki, file: str, status: str) -> None:
    cert = pki.dir / file
    text = await openssl("ocsp", "-issuer", pki.ca_pem, "-cert", cert, "-url", pki.url, "-CAfile", pki.ca_pem)
    assert "Response verify OK" in text, text
    assert f"{cert}: {status}" in text, text
    if file == "revoked.pem":
        assert "Reason: keyCompromise" in text and "Revocation Time:" in text
    if file == "superseded.pem":
        assert "Reason: superseded" in text
    assert "WARNING: no nonce" not in text  # openssl sent a nonce and we echoed it
