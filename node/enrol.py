"""Enrolment: turn a one-time token from the CA into an enrolled node home.

`enrol_node` fetches the CA root over the CA's HTTP API (`node.ca.http`), checks its SHA-256
fingerprint when the user gave one, makes a fresh Ed25519 identity key, sends a CSR with the
token, verifies the certificate it gets back under that root, and only then creates the node's
keystore (HOME/keystore.db) with exactly the records `node.node.Node` reads:

    node/identity     the identity key's 32 raw private bytes
    node/certificate  the certificate (DER)
    node/root         the pinned CA root (PEM)
    node/relay        the relay URL (UTF-8)

Nothing is written unless every step succeeded, and an existing keystore is never touched.
The HTTP client is urllib, blocking: enrolment is one short, one-off exchange.
"""

from __future__ import annotations

import hmac
import http.client
import json
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from node.ca.authority import create_keystore, utcnow
from node.ca.errors import (
    AlreadyEnrolled,
    CaProtocolError,
    CaUnreachable,
    CertificateRefused,
    EnrolmentError,
    EnrolmentRefused,
    FingerprintMismatch,
    InvalidRequest,
)
from node.keystore import ARGON2_INTERACTIVE, Argon2Params, Keystore
from node.kms import KEYSTORE_FILE
from node.link import check_url
from node.node import NS_NODE
from protocol import certs
from protocol.errors import DecodeError, LocalError, ProtocolError
from protocol.identity import IdentityKey

__all__ = ["Enrolment", "enrol_node", "parse_fingerprint", "require_not_enrolled"]

log = logging.getLogger("kmsnet.node")

#: Seconds for each HTTP exchange with the CA.
HTTP_TIMEOUT = 10.0
#: The largest answer read from the CA (a root or a certificate is under 1 KiB).
MAX_RESPONSE = 64 * 1024
#: Characters of a CA error message shown to the user.
MAX_MESSAGE = 200

_HEX64 = re.compile(r"[0-9a-f]{64}")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class Enrolment:
    """What `enrol_node` did: the node, its keystore, and the CA root it now pins."""

    name: str
    keystore: Path
    serial: int
    not_after: datetime
    #: SHA-256 of the pinned root (hex). Unless `fingerprint_checked`, show it to the user to compare.
    ca_fingerprint: str
    fingerprint_checked: bool


def parse_fingerprint(text: str) -> bytes:
    """A SHA-256 fingerprint from hex, with or without ':' or spaces, any case; `InvalidRequest` otherwise."""
    cleaned = re.sub(r"[\s:]", "", text).lower().removeprefix("sha256")
    if _HEX64.fullmatch(cleaned) is None:
        raise InvalidRequest("a CA fingerprint is the SHA-256 of the root certificate: 64 hex digits")
    return bytes.fromhex(cleaned)


def require_not_enrolled(home: Path | str, passphrase: str) -> None:
    """Raise `AlreadyEnrolled` if `home`'s keystore holds a node identity already.

    A keystore without one (made by `kmsnet kms` first) is fine: the node joins it. A wrong
    passphrase for an existing keystore raises `WrongPassphrase` before anything is asked of the CA.
    """
    path = Path(home) / KEYSTORE_FILE
    if not path.exists():
        return
    with Keystore.open(path, passphrase=passphrase) as keystore:
        _refuse_identity(keystore, path)


def _refuse_identity(keystore: Keystore, path: Path) -> None:
    if keystore.get(NS_NODE, "identity") is not None:
        raise AlreadyEnrolled(f"{path} holds a node already (a node identity is never overwritten)")


def enrol_node(
    home: Path | str,
    name: str,
    ca_url: str,
    token: str,
    relay_url: str,
    passphrase: str,
    *,
    ca_fingerprint: str | None = None,
    argon2: Argon2Params = ARGON2_INTERACTIVE,
    clock: Callable[[], datetime] = utcnow,
    timeout: float = HTTP_TIMEOUT,
) -> Enrolment:
    """Enrol node `name` with the CA at `ca_url` using `token`, and create HOME/keystore.db.

    Raises, with nothing written: `InvalidRequest` (bad name, CA URL or fingerprint), `LinkError`
    (bad relay URL), `AlreadyEnrolled` (the keystore holds a node already), `CaUnreachable` (no answer, or the
    CA is throttling us), `CaProtocolError` (an answer outside the protocol), `FingerprintMismatch`
    (the root is not the one `ca_fingerprint` names), `EnrolmentRefused` (the CA refused the
    token or CSR), `EnrolmentError` (the CA found the request malformed), `CertificateRefused`
    (the root or the certificate does not verify, or is not for our name and key), or the
    keystore's errors.
    """
    home = Path(home)
    try:
        certs.validate_node_name(name)
    except LocalError as exc:
        raise InvalidRequest(str(exc)) from exc
    check_url(relay_url)
    expected = parse_fingerprint(ca_fingerprint) if ca_fingerprint is not None else None
    base = _check_ca_url(ca_url)
    require_not_enrolled(home, passphrase)
    path = home / KEYSTORE_FILE

    root = _fetch_root(base, timeout)
    fingerprint = certs.fingerprint(root)
    if expected is not None and not hmac.compare_digest(fingerprint, expected):
        raise FingerprintMismatch(
            f"the CA at {base} presents root {fingerprint.hex()}, not the expected {expected.hex()}: not enrolling"
        )

    identity = IdentityKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(identity.private_key, None)
    )
    certificate = _request_certificate(base, token, csr.public_bytes(serialization.Encoding.PEM), timeout)
    try:
        verified = certs.verify(certificate, root, clock(), expected_name=name)
    except ProtocolError as exc:
        raise CertificateRefused(f"the CA's certificate does not verify: {exc}") from exc
    if verified.public_key.public_bytes_raw() != identity.public_bytes:
        raise CertificateRefused("the CA's certificate is for another key than the one we asked for")

    records = {
        "identity": identity.private_bytes(),
        "certificate": verified.der,
        "root": certs.certificate_pem(root),
        "relay": relay_url.encode("utf-8"),
    }

    def fill(keystore: Keystore) -> None:
        with keystore.transaction():
            _refuse_identity(keystore, path)
            for record, value in records.items():
                keystore.put(NS_NODE, record, value)

    if path.exists():
        # A keystore the KMS made: the node's records join it, in one transaction.
        with Keystore.open(path, passphrase=passphrase) as keystore:
            fill(keystore)
    else:
        try:
            create_keystore(path, passphrase=passphrase, argon2=argon2, fill=fill)
        except FileExistsError as exc:
            raise AlreadyEnrolled(f"{path} appeared while enrolling; it was left as it is") from exc
    log.info("node_enrolled", extra={"fields": {"node": name, "serial": f"{verified.serial:x}", "ca": base}})
    return Enrolment(
        name=name,
        keystore=path,
        serial=verified.serial,
        not_after=verified.not_after,
        ca_fingerprint=fingerprint.hex(),
        fingerprint_checked=expected is not None,
    )


# --- talking to the CA -------------------------------------------------------------------------------


def _check_ca_url(url: str) -> str:
    parts = urlsplit(url)
    try:
        _ = parts.port
    except ValueError as exc:
        raise InvalidRequest(f"bad port in CA URL {url!r}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise InvalidRequest(f"not a CA URL (http://HOST:PORT): {url!r}")
    return url.rstrip("/")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # The CA answers from where it was asked; following a redirect could send the token elsewhere.
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


# No proxies from the environment either: the token goes straight to the CA the user named.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _exchange(url: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
    """(status, body) of one GET (or POST of JSON `body`); `CaUnreachable` if there is no answer."""
    headers = {"Accept": "application/json, application/x-pem-file"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    # The URL's scheme was checked by _check_ca_url: http or https only.
    request = urllib.request.Request(url, data=body, headers=headers, method="GET" if body is None else "POST")  # noqa: S310
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, _read_bounded(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _read_bounded(exc)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CaUnreachable(f"cannot reach the CA at {url}: {reason}") from exc


def _read_bounded(response: http.client.HTTPResponse | urllib.error.HTTPError) -> bytes:
    data = response.read(MAX_RESPONSE + 1)
    if len(data) > MAX_RESPONSE:
        raise CaProtocolError(f"the CA's answer is over {MAX_RESPONSE} bytes")
    return data


def _ca_message(body: bytes) -> str:
    """The CA's `{"error": ...}` text, made safe for a terminal."""
    try:
        message = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return "no reason given"
    if not isinstance(message, str):
        return "no reason given"
    return _UNPRINTABLE.sub("?", message)[:MAX_MESSAGE]


def _fetch_root(base: str, timeout: float) -> x509.Certificate:
    status, body = _exchange(f"{base}/ca.pem", None, timeout)
    if status != 200:
        raise CaProtocolError(f"the CA answered {status} for /ca.pem: {_ca_message(body)}")
    try:
        root = certs.load_certificate(body)
    except DecodeError as exc:
        raise CaProtocolError(f"the CA's /ca.pem is not a certificate: {exc}") from exc
    try:
        certs.check_root(root)
    except ProtocolError as exc:
        raise CertificateRefused(f"the CA's root is unusable: {exc}") from exc
    return root


def _request_certificate(base: str, token: str, csr_pem: bytes, timeout: float) -> x509.Certificate:
    payload = json.dumps({"token": token, "csr": csr_pem.decode("ascii")}).encode()
    status, body = _exchange(f"{base}/enroll", payload, timeout)
    if status == 403:
        raise EnrolmentRefused(f"the CA refused the enrolment: {_ca_message(body)}")
    if status == 400:
        raise EnrolmentError(f"the CA rejected the enrolment request: {_ca_message(body)}")
    if status == 429 or status >= 500:
        raise CaUnreachable(f"the CA is not enrolling now ({status}): {_ca_message(body)}")
    if status != 200:
        raise CaProtocolError(f"the CA answered {status} for /enroll: {_ca_message(body)}")
    try:
        pem = json.loads(body)["certificate"]
        return certs.load_certificate(pem.encode("ascii"))
    except (ValueError, KeyError, TypeError, AttributeError, DecodeError) as exc:
        raise CaProtocolError("the CA's enrolment answer holds no certificate") from exc
