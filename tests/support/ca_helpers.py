"""Helpers and fixtures of tests/ca/test_ca.py that other test modules use too."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from ca import AdminSession, CertificateAuthority, EnrolmentToken
from ca.admin import code_at, secret_from_uri
from ca.authority import DEFAULT_TOKEN_TTL, FIRST_ADMIN, CaPolicy
from node.clock import utcnow
from node.keystore import ARGON2_TEST
from tests.support.pki import NOW
from tests.support.softhsm import SoftHsm

PASS = "ca test passphrase"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class Ticks:
    """A monotonic clock the test moves by hand (for the throttle)."""

    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


class Admin:
    """The first administrator and their authenticator app, on the CA's clock.

    `code()` gives the code of the current 30-second step, or of the step after the last code it
    gave (a person waits for the next one; the CA accepts one step early), so that no code is
    handed out twice. `session` logs in when there is no open session (they last 15 minutes).
    """

    def __init__(self, authority: CertificateAuthority, secret: bytes, name: str = FIRST_ADMIN) -> None:
        self.authority = authority
        self.secret = secret
        self.name = name
        self._session: AdminSession | None = None
        self._last_step = 0

    def code(self) -> str:
        step = max(int(self.authority.clock().timestamp()) // 30, self._last_step + 1)
        self._last_step = step
        return code_at(self.secret, datetime.fromtimestamp(step * 30, UTC))

    def wrong_code(self) -> str:
        """A code of no step near now."""
        now = self.authority.clock()
        near = {code_at(self.secret, now + timedelta(seconds=30 * k)) for k in range(-2, 3)}
        return next(c for c in ("000000", "111111", "222222", "333333", "444444", "555555") if c not in near)

    @property
    def session(self) -> AdminSession:
        if self._session is None or self._session.expires_at <= self.authority.clock():
            self._session = self.authority.login(self.name, self.code())
        return self._session

    def token(self, name: str, ttl: timedelta = DEFAULT_TOKEN_TTL) -> EnrolmentToken:
        return self.authority.token(name, ttl, session=self.session)


def init_ca(
    home: Path, clock: Callable[[], datetime] = utcnow, policy: CaPolicy | None = None, token: SoftHsm | None = None
) -> bytes:
    """`CertificateAuthority.init` with cheap Argon2 (root key in `token` if given); returns the first
    administrator's TOTP secret."""
    slot, pin = (token.slot, token.pin) if token else (None, None)
    created = CertificateAuthority.init(home, PASS, argon2=ARGON2_TEST, clock=clock, policy=policy, token=slot, pin=pin)
    return secret_from_uri(created.admin.otpauth)


def csr_pem(name: str, key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey | None = None) -> bytes:
    """A CSR for CN=name signed by `key` (a fresh Ed25519 key by default)."""
    key = key or Ed25519PrivateKey.generate()
    algorithm = hashes.SHA256() if isinstance(key, ec.EllipticCurvePrivateKey) else None
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["keystore", "pkcs11"])
def root_in(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SoftHsm | None:
    """Where the CA of the shared fixtures keeps its root key: ca.db, then a SoftHSM token (whose PIN
    is then in the environment too, for the tests that open the CA again themselves)."""
    if request.param == "keystore":
        return None
    hsm: SoftHsm = request.getfixturevalue("softhsm_token")
    monkeypatch.setenv("KMSNET_PKCS11_PIN", hsm.pin)
    return hsm


@pytest.fixture
def otp_secret(tmp_path: Path, clock: Clock, root_in: SoftHsm | None) -> bytes:
    return init_ca(tmp_path / "ca", clock, token=root_in)


@pytest.fixture
def home(tmp_path: Path, otp_secret: bytes) -> Path:
    return tmp_path / "ca"


@pytest.fixture
def authority(home: Path, clock: Clock, root_in: SoftHsm | None) -> Iterator[CertificateAuthority]:
    with CertificateAuthority.open(home, PASS, clock=clock, pin=root_in.pin if root_in else None) as ca:
        yield ca


@pytest.fixture
def admin(authority: CertificateAuthority, otp_secret: bytes) -> Admin:
    return Admin(authority, otp_secret)


# --- HTTP ----------------------------------------------------------------------------------------------


async def http(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes and end the request stream, read the whole answer: (status, lower-cased headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    writer.write_eof()
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    return int(lines[0].split(" ")[1]), headers, body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: ca\r\n\r\n".encode()


def post(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: ca\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


@pytest.fixture
def ticks() -> Ticks:
    return Ticks()
