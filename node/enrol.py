"""Enrolment, renewal and re-keying: a node's dealings with the CA's HTTP API (the CA's `ca.http`).

`enrol_node` fetches the CA root, checks its SHA-256 fingerprint when the user gave one, makes a
fresh Ed25519 identity key and prepares the node's keystore with it in the home (STAGING_FILE),
so that a home that cannot be written fails before the one-time token is spent; then it sends a
CSR with the token, verifies the certificate it gets back under that root, stores it, and moves
the keystore into place (HOME/keystore.db) with the records `node.node.Node` reads, and the CA's
URL for renewals:

    node/identity     the identity key's 32 raw private bytes, or, for a node made with a
    node/identity_token  PKCS#11 token (`node init --pkcs11`), instead: where the key is in the
                      token (`node.pkcs11.TokenKeyRef`; generated there, it never leaves it)
    node/certificate  the certificate (DER)
    node/root         the pinned CA root (PEM)
    node/relay        the relay URLs, one per line (UTF-8): several for a cluster of relays
    node/ca_url       the CA's HTTP API (UTF-8)

Nothing is left behind unless every step succeeded, and an existing keystore is never touched,
with one exception that makes enrolment safe to retry: when the CA may have certified the key
but its answer was lost or could not be stored, the prepared keystore stays, and running the same
enrolment again reuses its key; the CA answers a retry with the same token and the same key,
within the token's lifetime, with the same certificate (no orphan certificate, no spent token).

`renew_certificate` gets a new certificate for the same name and key before the current one
expires (certificates are short-lived: a week by default); `renewal_time` says when (at
RENEW_FRACTION of the validity). The request is authenticated by the key itself: the CSR is
signed by the current identity key and names it, and the CA refuses it for a certificate it
revoked, one that expired, or one it did not issue.

`rekey_node` is for after a compromise: a NEW identity key, enrolled with a new one-time token
(the CA checks the token, not the old key, which the attacker may hold), replaces node/identity
and node/certificate in the existing keystore. Sessions are kept. Peers see the new key in the
node's next INIT and report "identity changed" with the new safety number.

Both leave the signed prekey due for rotation (node/next_prekey_rotation removed): the published
bundle and one-time prekeys are signed over the old certificate, so the node must publish new
ones, signed with what it holds now, and replace the old ones at the relay.

The HTTP client is urllib, blocking: each is one short exchange (call it from a thread in a loop).
"""

from __future__ import annotations

import hmac
import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from node.clock import renewal_time as _renewal_time
from node.clock import utcnow
from node.errors import (
    AlreadyEnrolled,
    CaProtocolError,
    CaUnreachable,
    CertificateRefused,
    EnrolmentError,
    EnrolmentInputError,
    EnrolmentRefused,
    EnrolmentUnfinished,
    FingerprintMismatch,
    KeystoreCorrupt,
    NodeError,
    RenewalRefused,
    StorageError,
    WrongPassphrase,
    network_words,
)
from node.home import KEYSTORE_FILE, NS_NODE, NS_SESSION, identity_records, node_records, relay_record, remove_database
from node.keystore import ARGON2_INTERACTIVE, Argon2Params, Keystore
from node.link import check_url, parse_urls
from node.pkcs11 import Pin, TokenIdentityKey, TokenKeyRef, TokenSession, TokenSlot, environment_pin
from protocol import certs
from protocol.errors import DecodeError, LocalError, ProtocolError
from protocol.identity import IdentityKey

__all__ = [
    "Enrolment",
    "Renewal",
    "enrol_node",
    "load_identity",
    "parse_fingerprint",
    "rekey_node",
    "renew_certificate",
    "renewal_time",
    "require_not_enrolled",
]

log = logging.getLogger("kmsnet.node")

#: Seconds for each HTTP exchange with the CA.
HTTP_TIMEOUT = 10.0
#: The largest answer read from the CA (a root or a certificate is under 1 KiB).
MAX_RESPONSE = 64 * 1024
#: Characters of a CA error message shown to the user.
MAX_MESSAGE = 200

#: Where `enrol_node` prepares the keystore before redeeming the token: in the home, so that a retry
#: after an interrupted enrolment finds the same key (module docstring).
STAGING_FILE = ".keystore.db.enrolling"
#: The staged record naming the node being enrolled (removed when the keystore goes into place).
_STAGED_NAME = "enrolling"

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


@dataclass(frozen=True)
class Renewal:
    """What `renew_certificate` (or `rekey_node`) stored: the new certificate, and the one it replaced."""

    name: str
    serial: int
    not_after: datetime
    previous_serial: int
    #: When to renew this one (`renewal_time`).
    renew_at: datetime


def parse_fingerprint(text: str) -> bytes:
    """A SHA-256 fingerprint from hex, with or without ':' or spaces, any case; `EnrolmentInputError` otherwise."""
    cleaned = re.sub(r"[\s:]", "", text).lower().removeprefix("sha256")
    if _HEX64.fullmatch(cleaned) is None:
        raise EnrolmentInputError("a CA fingerprint is the SHA-256 of the root certificate: 64 hex digits")
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
    if keystore.get(NS_NODE, "identity") is not None or keystore.get(NS_NODE, "identity_token") is not None:
        raise AlreadyEnrolled(f"{path} holds a node already (a node identity is never overwritten)")


def load_identity(keystore: Keystore, pin: Pin | None = None) -> IdentityKey | None:
    """The node's identity key: from the keystore, or a handle on it in its PKCS#11 token.

    For a token-backed node this logs in with `pin` (default: KMSNET_PKCS11_PIN_FILE or
    KMSNET_PKCS11_PIN); the key owns that session (`TokenIdentityKey.close` ends it, else the
    process's end does). None when the keystore holds no node.
    """
    ref = keystore.get(NS_NODE, "identity_token")
    if ref is not None:
        token_ref = TokenKeyRef.from_record(ref)
        session = TokenSession.open(token_ref.slot, pin if pin is not None else environment_pin)
        try:
            return TokenIdentityKey(session.ed25519(token_ref), session)
        except BaseException:
            session.close()
            raise
    raw = keystore.get(NS_NODE, "identity")
    return None if raw is None else IdentityKey.from_private_bytes(raw)


def _new_identity(name: str, session: TokenSession | None) -> IdentityKey:
    """A fresh identity key: in the token when there is one, else in memory (for the keystore)."""
    if session is None:
        return IdentityKey.generate()
    return TokenIdentityKey(session.generate_ed25519(f"kmsnet-node-{name}"))


def enrol_node(
    home: Path | str,
    name: str,
    ca_url: str,
    token: str,
    relay_url: str | Sequence[str],
    passphrase: str,
    *,
    ca_fingerprint: str | None = None,
    argon2: Argon2Params = ARGON2_INTERACTIVE,
    clock: Callable[[], datetime] = utcnow,
    timeout: float = HTTP_TIMEOUT,
    key_token: TokenSlot | None = None,
    pin: Pin | None = None,
) -> Enrolment:
    """Enrol node `name` with the CA at `ca_url` using `token`, and create HOME/keystore.db.

    With `key_token` (and its `pin`) the identity key is generated in that PKCS#11 token and never
    leaves it; the keystore records where it is. If enrolment fails, that key is deleted again.

    The keystore is prepared in the home (STAGING_FILE, with the identity key) before the token is
    redeemed, so a home that cannot be written fails with the token unspent. Should the CA's answer
    be lost, or storing the certificate fail, after the CA may have certified the key, the prepared
    keystore is kept and `EnrolmentUnfinished` raised: the same call again (same token and
    passphrase) reuses that key, and the CA answers it with the same certificate.

    Raises, with nothing written: `EnrolmentInputError` (bad name, CA URL or fingerprint), `LinkError`
    (bad relay URL), `AlreadyEnrolled` (the keystore holds a node already), `CaUnreachable` (no answer, or the
    CA is throttling us), `CaProtocolError` (an answer outside the protocol), `FingerprintMismatch`
    (the root is not the one `ca_fingerprint` names), `EnrolmentRefused` (the CA refused the
    token or CSR), `EnrolmentError` (the CA found the request malformed), `CertificateRefused`
    (the root or the certificate does not verify, or is not for our name and key), or the
    keystore's errors; and `EnrolmentUnfinished` as above.
    """
    home = Path(home)
    try:
        certs.validate_node_name(name)
    except LocalError as exc:
        raise EnrolmentInputError(str(exc)) from exc
    relays = [check_url(url) for url in ([relay_url] if isinstance(relay_url, str) else relay_url)]
    if not relays:
        raise EnrolmentInputError("no relay URL")
    expected = parse_fingerprint(ca_fingerprint) if ca_fingerprint is not None else None
    base = _check_ca_url(ca_url)
    require_not_enrolled(home, passphrase)

    root = _fetch_root(base, timeout)
    fingerprint = certs.fingerprint(root)
    if expected is not None and not hmac.compare_digest(fingerprint, expected):
        raise FingerprintMismatch(
            f"the CA at {base} presents root {fingerprint.hex()}, not the expected {expected.hex()}: not enrolling"
        )
    records = node_records(root=root, relays=relays, ca_url=base)
    with _Stage.prepare(home, name, records, passphrase, argon2, (key_token, pin)) as stage:
        payload = {"token": token, "csr": _csr(stage.identity, name)}
        stage.keep = True  # from here on the CA may certify the key: keep it for a retry, unless it says no
        status, body = _exchange(f"{base}/enrol", json.dumps(payload).encode(), timeout)
        stage.keep = False  # an answer: a certificate we check now, or a refusal, which certified nothing
        issued = _certificate_answer("/enrol", status, body)
        verified = _verify_issued(issued, root, name, stage.identity, clock())
        stage.keep = True
        stage.finish(verified.der)
    log.info("node_enrolled", extra={"fields": {"node": name, "serial": f"{verified.serial:x}", "ca": base}})
    return Enrolment(
        name=name,
        keystore=home / KEYSTORE_FILE,
        serial=verified.serial,
        not_after=verified.not_after,
        ca_fingerprint=fingerprint.hex(),
        fingerprint_checked=expected is not None,
    )


def _staged_name(keystore: Keystore) -> str | None:
    """The node a prepared keystore is for: its marker, or, once the certificate is in, the certificate's name."""
    marker = keystore.get(NS_NODE, _STAGED_NAME)
    if marker is not None:
        return marker.decode("utf-8", "replace")
    certificate = keystore.get(NS_NODE, "certificate")
    if certificate is None:
        return None
    names = x509.load_der_x509_certificate(certificate).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


class _Stage:
    """The node's keystore, prepared at HOME/STAGING_FILE before the token is redeemed.

    `prepare` makes it (or reopens the one an interrupted enrolment of the same node under the same
    root left, to reuse its key); `finish` adds the certificate and moves it into place (or, for a
    keystore `kmsnet kms` made, copies the node's records into it). Leaving the `with` block
    unfinished removes it (and a token key made for it), unless `keep` says the CA may have
    certified its key: then it stays, and the error becomes `EnrolmentUnfinished`.
    """

    def __init__(
        self, home: Path, keystore: Keystore, identity: IdentityKey, session: TokenSession | None, passphrase: str
    ) -> None:
        self.home = home
        self.keystore = keystore
        self._passphrase = passphrase
        self.identity = identity
        self._session = session
        self.keep = False
        self._done = False

    @classmethod
    def prepare(
        cls,
        home: Path,
        name: str,
        records: dict[str, bytes],
        passphrase: str,
        argon2: Argon2Params,
        key: tuple[TokenSlot | None, Pin | None],
    ) -> _Stage:
        path = home / KEYSTORE_FILE
        if path.exists():  # a keystore `kmsnet kms` made: the node's records will join it; it must take writes
            with Keystore.open(path, passphrase=passphrase) as keystore, keystore.transaction():
                _refuse_identity(keystore, path)
        try:
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot write the home {home}: {exc.strerror or 'not a directory'}") from exc
        staged = home / STAGING_FILE
        if staged.exists():
            try:
                keystore = Keystore.open(staged, passphrase=passphrase)
            except WrongPassphrase as exc:
                raise WrongPassphrase(
                    f"{staged} holds an unfinished enrolment sealed under another passphrase: give that one, "
                    "or delete the file to start over (a new token may then be needed)"
                ) from exc
            if _staged_name(keystore) == name and keystore.get(NS_NODE, "root") == records["root"]:
                return cls._reopened(home, keystore, records, passphrase)
            keystore.close()
            remove_database(staged)  # another node or another CA: that attempt is abandoned
        key_token, pin = key
        session = None if key_token is None else TokenSession.open(key_token, pin)
        identity = _new_identity(name, session)
        try:
            keystore = Keystore.open(staged, passphrase=passphrase, create=True, argon2=argon2)
            stage = cls(home, keystore, identity, session, passphrase)
            with keystore.transaction():
                for record, value in {**identity_records(identity), **records, _STAGED_NAME: name.encode()}.items():
                    keystore.put(NS_NODE, record, value)
        except BaseException:
            if session is not None and isinstance(identity, TokenIdentityKey):
                session.destroy(identity.delegated.ref)
                session.close()
            remove_database(staged)
            raise
        return stage

    @classmethod
    def _reopened(cls, home: Path, keystore: Keystore, records: dict[str, bytes], passphrase: str) -> _Stage:
        """The stage an interrupted enrolment left: its key again, this attempt's relays and CA URL."""
        try:
            ref = keystore.get(NS_NODE, "identity_token")
            session = None
            if ref is not None:
                token_ref = TokenKeyRef.from_record(ref)
                session = TokenSession.open(token_ref.slot, environment_pin)
                identity: IdentityKey = TokenIdentityKey(session.ed25519(token_ref))
            else:
                raw = keystore.get(NS_NODE, "identity")
                if raw is None:
                    raise KeystoreCorrupt(f"{keystore.path} holds no identity key")
                identity = IdentityKey.from_private_bytes(raw)
            with keystore.transaction():
                for record, value in records.items():
                    keystore.put(NS_NODE, record, value)
        except BaseException:
            keystore.close()
            raise
        log.info("enrolment_resumed", extra={"fields": {"home": str(home)}})
        return cls(home, keystore, identity, session, passphrase)

    def finish(self, certificate: bytes) -> None:
        """Store `certificate` and put the keystore in place: HOME/keystore.db, all at once."""
        path = self.home / KEYSTORE_FILE
        with self.keystore.transaction():
            self.keystore.put(NS_NODE, "certificate", certificate)
            self.keystore.delete(NS_NODE, _STAGED_NAME)
        if path.exists():  # joining a KMS keystore: the node's records go in one transaction
            node = {record: self.keystore.get(NS_NODE, record) for record in self.keystore.names(NS_NODE)}
            with Keystore.open(path, passphrase=self._passphrase) as target, target.transaction():
                _refuse_identity(target, path)
                for record, value in node.items():
                    if value is not None:
                        target.put(NS_NODE, record, value)
        else:
            self.keystore.scrub()  # everything into the main file: the link below must carry it all
            self.keystore.close()
            try:
                os.link(self.home / STAGING_FILE, path)
            except FileExistsError as exc:
                raise AlreadyEnrolled(f"{path} appeared while enrolling; it was left as it is") from exc
            except OSError as exc:
                raise StorageError(f"cannot write {path}: {exc.strerror or 'the file system refused it'}") from exc
        self._done = True

    def __enter__(self) -> _Stage:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        self.keystore.close()
        try:
            if self._done or not self.keep:
                if not self._done and self._session is not None and isinstance(self.identity, TokenIdentityKey):
                    self._session.destroy(self.identity.delegated.ref)  # nothing refers to it: no orphan
                remove_database(self.home / STAGING_FILE)
        finally:
            if self._session is not None:
                self._session.close()
        if not self._done and self.keep and isinstance(error, Exception):
            raise EnrolmentUnfinished(
                f"{error} — the CA may have certified this node's key: run the same command again "
                "(same token, same passphrase) to finish; the CA then answers with the same certificate"
            ) from error


# --- talking to the CA -------------------------------------------------------------------------------


def _check_ca_url(url: str) -> str:
    parts = urlsplit(url)
    try:
        _ = parts.port
    except ValueError as exc:
        raise EnrolmentInputError(f"bad port in CA URL {url!r}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise EnrolmentInputError(f"not a CA URL (http://HOST:PORT): {url!r}")
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
        reason = network_words(getattr(exc, "reason", None) or exc)
        hint = f"is `kmsnet ca serve` running on {urlsplit(url).netloc}?"
        raise CaUnreachable(f"cannot reach the CA at {url} ({reason}): {hint}") from exc


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


def _csr(identity: IdentityKey, name: str) -> str:
    """A CSR (PEM) for CN=`name`, signed by `identity` (in its token, if it is in one): it proves we
    hold the key it names."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    if isinstance(identity, TokenIdentityKey):
        csr = identity.delegated.sign_csr(builder)
    else:
        csr = builder.sign(identity.private_key, None)
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _post_certificate(base: str, route: str, payload: dict[str, str], timeout: float) -> x509.Certificate:
    """POST an enrolment or renewal to the CA and return the certificate it answers with."""
    status, body = _exchange(f"{base}{route}", json.dumps(payload).encode(), timeout)
    return _certificate_answer(route, status, body)


def _certificate_answer(route: str, status: int, body: bytes) -> x509.Certificate:
    """The certificate in the CA's answer to an enrolment or renewal, or the error its status means."""
    if status == 403:
        refused = RenewalRefused if route == "/renew" else EnrolmentRefused
        raise refused(f"the CA refused the request: {_ca_message(body)}")
    if status == 400:
        raise EnrolmentError(f"the CA rejected the request as malformed: {_ca_message(body)}")
    if status == 429 or status >= 500:
        raise CaUnreachable(f"the CA is not issuing now ({status}): {_ca_message(body)}")
    if status != 200:
        raise CaProtocolError(f"the CA answered {status} for {route}: {_ca_message(body)}")
    try:
        pem = json.loads(body)["certificate"]
        return certs.load_certificate(pem.encode("ascii"))
    except (ValueError, KeyError, TypeError, AttributeError, DecodeError) as exc:
        raise CaProtocolError(f"the CA's answer to {route} holds no certificate") from exc


def _verify_issued(
    certificate: x509.Certificate, root: x509.Certificate, name: str, identity: IdentityKey, now: datetime
) -> certs.VerifiedCertificate:
    """Check that the CA's certificate chains to `root`, is valid now, names `name` and certifies `identity`."""
    try:
        verified = certs.verify(certificate, root, now, expected_name=name)
    except ProtocolError as exc:
        raise CertificateRefused(f"the CA's certificate does not verify: {exc}") from exc
    if verified.public_key.public_bytes_raw() != identity.public_bytes:
        raise CertificateRefused("the CA's certificate is for another key than the one we asked for")
    return verified


# --- renewal and re-keying ---------------------------------------------------------------------------


def renewal_time(certificate: bytes) -> datetime:
    """When to renew a certificate (DER): once RENEW_FRACTION (2/3) of its validity has passed."""
    cert = x509.load_der_x509_certificate(certificate)
    return _renewal_time(cert.not_valid_before_utc, cert.not_valid_after_utc)


@dataclass(frozen=True)
class _NodeState:
    name: str
    identity: IdentityKey
    certificate: bytes
    root: x509.Certificate
    ca_url: str | None

    def __enter__(self) -> _NodeState:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if isinstance(self.identity, TokenIdentityKey):
            self.identity.close()  # the token session `load_identity` opened for this request


def _node_state(keystore: Keystore, pin: Pin | None) -> _NodeState:
    identity = load_identity(keystore, pin)
    certificate = keystore.get(NS_NODE, "certificate")
    root = keystore.get(NS_NODE, "root")
    if identity is None or certificate is None or root is None:
        raise NodeError("this keystore holds no enrolled node (run `kmsnet node init` first)")
    # Read, not judged: an expired certificate must still say whose it is (the CA judges it).
    subject = x509.load_der_x509_certificate(certificate).subject
    ca_url = keystore.get(NS_NODE, "ca_url")
    return _NodeState(
        name=str(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value),
        identity=identity,
        certificate=certificate,
        root=certs.load_certificate(root),
        ca_url=None if ca_url is None else ca_url.decode("utf-8"),
    )


def _ca_base(state: _NodeState, ca_url: str | None) -> str:
    url = ca_url or state.ca_url
    if url is None:
        raise EnrolmentInputError("this node does not know its CA's URL (enrolled by an older kmsnet): give it")
    return _check_ca_url(url)


def _store_certificate(
    keystore: Keystore,
    state: _NodeState,
    verified: certs.VerifiedCertificate,
    base: str,
    new_identity: IdentityKey | None = None,
) -> Renewal:
    """Replace the node's certificate (and identity) in one transaction, unless it changed meanwhile."""
    with keystore.transaction():
        if keystore.get(NS_NODE, "certificate") != state.certificate:
            raise NodeError("the node's certificate changed while renewing: nothing was stored")
        keystore.put(NS_NODE, "certificate", verified.der)
        keystore.put(NS_NODE, "ca_url", base.encode("utf-8"))
        # The published prekeys are signed over the old certificate's fingerprint (and, on a
        # re-key, by the old key): without a rotation date, the node rotates its signed prekey on
        # its next connection, signing a new bundle and one-time prekeys with what it holds now.
        keystore.delete(NS_NODE, "next_prekey_rotation")
        if new_identity is not None:
            for record in ("identity", "identity_token"):
                keystore.delete(NS_NODE, record)
            for record, value in identity_records(new_identity).items():
                keystore.put(NS_NODE, record, value)
            # After a compromise, sessions made under the old identity are suspect too: drop them, so
            # every peer meets the new identity in a fresh handshake (and is told it changed).
            for peer in keystore.names(NS_SESSION):
                keystore.delete(NS_SESSION, peer)
    if new_identity is not None:
        keystore.scrub()  # the old identity key must not linger in the write-ahead log
    previous = x509.load_der_x509_certificate(state.certificate).serial_number
    return Renewal(
        name=state.name,
        serial=verified.serial,
        not_after=verified.not_after,
        previous_serial=previous,
        renew_at=renewal_time(verified.der),
    )


def renew_certificate(
    keystore: Keystore,
    *,
    ca_url: str | None = None,
    clock: Callable[[], datetime] = utcnow,
    timeout: float = HTTP_TIMEOUT,
    pin: Pin | None = None,
) -> Renewal:
    """Renew the node's certificate in `keystore` (same name, same key) and store the new one.

    `pin` unlocks the token of a token-backed node (default: from the environment).

    The CA is `ca_url`, else the URL stored at enrolment. Raises, with nothing stored:
    `RenewalRefused` (the CA found the certificate revoked, expired or not its own),
    `CaUnreachable`, `CaProtocolError`, `CertificateRefused` (the answer does not verify under
    the pinned root, or is not for our name and key), `EnrolmentInputError` (no CA URL), `NodeError`
    (no node in this keystore, or its certificate changed meanwhile). A running `Node` keeps
    presenting the old certificate until it reloads it.
    """
    with _node_state(keystore, pin) as state:
        base = _ca_base(state, ca_url)
        payload = {
            "certificate": certs.certificate_pem(x509.load_der_x509_certificate(state.certificate)).decode("ascii"),
            "csr": _csr(state.identity, state.name),
        }
        issued = _post_certificate(base, "/renew", payload, timeout)
        verified = _verify_issued(issued, state.root, state.name, state.identity, clock())
        renewal = _store_certificate(keystore, state, verified, base)
    fields = {"node": state.name, "serial": f"{renewal.serial:x}", "renew_at": renewal.renew_at.isoformat()}
    log.info("certificate_renewed", extra={"fields": fields})
    return renewal


def rekey_node(
    home: Path | str,
    name: str,
    ca_url: str,
    token: str,
    passphrase: str,
    *,
    clock: Callable[[], datetime] = utcnow,
    timeout: float = HTTP_TIMEOUT,
    pin: Pin | None = None,
) -> Renewal:
    """Give the enrolled node `name` in `home` a new identity key, enrolled with a one-time `token`.

    A token-backed node gets its new key in the same token (`pin` unlocks it; default: from the
    environment), and the old key is deleted from the token once the new one is stored.

    The CA must present the root the node pins (`FingerprintMismatch` otherwise). On success the
    new key and certificate replace the old ones in one transaction and the signed prekey is due
    for rotation (module docstring); sessions are dropped, so peers meet the new identity in a new
    handshake and see it change. Raises, with nothing changed:
    `EnrolmentInputError` (a name that is not the node's, a bad CA URL), `KeystoreNotFound` /
    `WrongPassphrase`, `NodeError` (no node here), and what `enrol_node` raises for the
    exchange with the CA.
    """
    base = _check_ca_url(ca_url)
    path = Path(home) / KEYSTORE_FILE
    with Keystore.open(path, passphrase=passphrase) as keystore, _node_state(keystore, pin) as state:
        if state.name != name:
            raise EnrolmentInputError(f"this home holds node {state.name!r}, not {name!r}")
        root = _fetch_root(base, timeout)
        if not hmac.compare_digest(certs.fingerprint(root), certs.fingerprint(state.root)):
            raise FingerprintMismatch(f"the CA at {base} presents another root than the one this node pins")
        old = state.identity
        session = None
        if isinstance(old, TokenIdentityKey):
            session = TokenSession.open(old.delegated.ref.slot, pin if pin is not None else environment_pin)
        try:
            identity = _new_identity(name, session)
            try:
                issued = _post_certificate(base, "/enrol", {"token": token, "csr": _csr(identity, name)}, timeout)
                verified = _verify_issued(issued, state.root, name, identity, clock())
                renewal = _store_certificate(keystore, state, verified, base, new_identity=identity)
            except BaseException:
                if session is not None and isinstance(identity, TokenIdentityKey):
                    session.destroy(identity.delegated.ref)
                raise
            if session is not None and isinstance(old, TokenIdentityKey):
                session.destroy(old.delegated.ref)  # the compromised key: of no use to anyone any more
        finally:
            if session is not None:
                session.close()
    log.info("node_rekeyed", extra={"fields": {"node": name, "serial": f"{renewal.serial:x}"}})
    return renewal


def set_relays(keystore: Keystore, urls: Sequence[str]) -> list[str]:
    """Replace the relays the node of `keystore` uses (each a ws:// or wss:// URL; LinkError if
    not); the node fails over from one to the next in this order. Returns them."""
    relays = parse_urls(" ".join(urls))
    keystore.put(NS_NODE, "relay", relay_record(relays))
    return relays


def relays_of(keystore: Keystore) -> list[str]:
    """The relays the node of `keystore` uses, in order."""
    stored = keystore.get(NS_NODE, "relay")
    return parse_urls(stored.decode("utf-8")) if stored else []
