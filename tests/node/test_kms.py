"""node/kms.py: the seed's calls, versions, rewrap, states, compromise, signatures, persistence, audit."""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from node.errors import (
    CompromisedVersion,
    InvalidCiphertext,
    InvalidRequest,
    InvalidSignature,
    KeyExists,
    KeyMismatch,
    KeyNotFound,
    KeyStateError,
    KeystoreNotFound,
    KeyTypeError,
    MessageTooLong,
    TrustError,
    VersionNotFound,
    VersionTooOld,
    WeakPeerKey,
    WrongPassphrase,
)
from node.keystore import ARGON2_TEST, Keystore
from node.kms import (
    ALLOWED,
    DH_INFO,
    KEYSTORE_FILE,
    TOKEN_KEY_TYPES,
    TRANSITIONS,
    CompromisedVersionWarning,
    KeyInfo,
    KeyManagementSystem,
    KeyState,
    KeyType,
    Operation,
    Transition,
    rsa_oaep_decrypt,
    rsa_oaep_encrypt,
    rsa_oaep_max_message,
)
from node.pkcs11 import TokenSlot
from tests.support.softhsm import SoftHsm

ROOT = Path(__file__).resolve().parent.parent.parent
VECTORS = Path(__file__).parent.parent / "vectors" / "wycheproof"
T0 = datetime(2030, 1, 1, tzinfo=UTC)
PASS = "kms test passphrase"
TOKEN = re.compile(r"kmsnet:v1:([A-Za-z0-9_.-]+):([0-9]+):([A-Za-z0-9+/]*={0,2})")

SEED = """\
kms = KeyManagementSystem()
kms.generate_symmetric_key("session1")
encrypted = kms.encrypt_data_symmetric("session1", "Hello World")
print(kms.decrypt_data_symmetric("session1", encrypted))          # Hello World
kms.generate_asymmetric_key_pair("user1")
encrypted = kms.encrypt_asymmetric("user1", "Hello Asymmetric")
print(kms.decrypt_asymmetric("user1", encrypted))                 # Hello Asymmetric
private_A, public_A = kms.generate_diffie_hellman_keys()
private_B, public_B = kms.generate_diffie_hellman_keys()
print(kms.derive_shared_secret(private_A, public_B) == kms.derive_shared_secret(private_B, public_A))  # True
"""
SEED_OUTPUT = "Hello World\nHello Asymmetric\nTrue\n"


class Clock:
    """An injectable clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


class TokenByDefault(KeyManagementSystem):
    """A KMS that makes every aes256-gcm and ed25519 key in the test's PKCS#11 token."""

    def __init__(self, slot: TokenSlot, pin: str, clock: Clock) -> None:
        super().__init__(clock=clock, pin=pin)
        self._slot = slot

    def create_key(
        self,
        key_id: str,
        key_type: KeyType | str = KeyType.AES256_GCM,
        *,
        rotation_period: timedelta | None = None,
        token: TokenSlot | None = None,
    ) -> KeyInfo:
        if token is None and key_type in TOKEN_KEY_TYPES:
            token = self._slot
        return super().create_key(key_id, key_type, rotation_period=rotation_period, token=token)


@pytest.fixture(params=["keystore", "pkcs11"])
def kms(clock: Clock, request: pytest.FixtureRequest) -> Iterator[KeyManagementSystem]:
    """An in-memory KMS; in the "pkcs11" run its aes256-gcm and ed25519 keys live in a SoftHSM token."""
    if request.param == "keystore":
        with KeyManagementSystem(clock=clock) as k:
            yield k
        return
    hsm: SoftHsm = request.getfixturevalue("softhsm_token")
    with TokenByDefault(hsm.slot, hsm.pin, clock) as k:
        yield k


def disk_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


def retoken(token: str, *, key_id: str | None = None, version: int | None = None, body: bytes | None = None) -> str:
    match = TOKEN.fullmatch(token)
    assert match is not None
    new_body = base64.b64encode(body).decode() if body is not None else match[3]
    return f"kmsnet:v1:{key_id or match[1]}:{version or match[2]}:{new_body}"


def version_of(token: str) -> int:
    match = TOKEN.fullmatch(token)
    assert match is not None
    return int(match[2])


def body_of(token: str) -> bytes:
    match = TOKEN.fullmatch(token)
    assert match is not None
    return base64.b64decode(match[3])


def last_audit(kms: KeyManagementSystem) -> dict[str, object]:
    entry = list(kms.audit.entries())[-1]
    return {"actor": entry.actor, "action": entry.action, **entry.fields}


def assert_last_audit(kms: KeyManagementSystem, **expected: object) -> None:
    entry = last_audit(kms)
    assert {name: entry.get(name) for name in expected} == expected


# --- the seed ---------------------------------------------------------------------------------------


def test_seed_snippet_runs_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile("from node.kms import KeyManagementSystem\n" + SEED, "seed", "exec"), {})
    assert capsys.readouterr().out == SEED_OUTPUT


def test_seed_snippet_in_a_fresh_interpreter() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from node.kms import KeyManagementSystem\n" + SEED],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, SEED_OUTPUT, "")


def test_seed_calls_mirror_str_and_bytes(kms: KeyManagementSystem) -> None:
    kms.generate_symmetric_key("s")
    text_token = kms.encrypt_data_symmetric("s", "héllo")
    assert isinstance(text_token, str) and TOKEN.fullmatch(text_token)
    assert kms.decrypt_data_symmetric("s", text_token) == "héllo"
    binary = bytes(range(256))
    bytes_token = kms.encrypt_data_symmetric("s", binary)
    assert isinstance(bytes_token, bytes)
    assert kms.decrypt_data_symmetric("s", bytes_token) == binary
    with pytest.raises(InvalidRequest, match="binary"):
        kms.decrypt_data_symmetric("s", bytes_token.decode())
    with pytest.raises(TypeError, match="the data must be text or bytes"):
        kms.encrypt_data_symmetric("s", 42)  # type: ignore[call-overload]


def test_seed_calls_check_the_key_type(kms: KeyManagementSystem) -> None:
    kms.generate_symmetric_key("s")
    kms.generate_asymmetric_key_pair("r")
    with pytest.raises(KeyTypeError):
        kms.encrypt_asymmetric("s", "x")
    with pytest.raises(KeyTypeError):
        kms.encrypt_data_symmetric("r", "x")
    token = kms.encrypt_asymmetric("r", b"bytes in, bytes out")
    assert isinstance(token, bytes)
    assert kms.decrypt_asymmetric("r", token) == b"bytes in, bytes out"


# --- symmetric ciphertexts ------------------------------------------------------------------------


def test_ciphertext_format_carries_key_id_and_version(kms: KeyManagementSystem) -> None:
    kms.create_key("k.1_a-b")
    token = kms.encrypt("k.1_a-b", b"data")
    match = TOKEN.fullmatch(token)
    assert match is not None and match[1] == "k.1_a-b" and match[2] == "1"
    assert len(body_of(token)) == 12 + 4 + 16
    result = kms.decrypt("k.1_a-b", token)
    assert (result.plaintext, result.key_id, result.version, result.compromised) == (b"data", "k.1_a-b", 1, False)
    assert b"data" not in repr(result).encode()
    assert kms.encrypt("k.1_a-b", b"data") != token  # fresh nonce


def test_tampered_ciphertexts_are_refused(kms: KeyManagementSystem) -> None:
    kms.create_key("k")
    token = kms.encrypt("k", b"attack at dawn")
    body = body_of(token)
    for i in (0, 12, len(body) - 1):  # nonce, ciphertext, tag
        flipped = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
        with pytest.raises(InvalidCiphertext):
            kms.decrypt("k", retoken(token, body=flipped))
    bad_tokens = [
        retoken(token, body=body[:-1]),
        retoken(token, body=b""),
        token + "A",
        token.replace("kmsnet:v1", "kmsnet:v2"),
        token.replace("kmsnet:v1", "vault:v1"),
        token + "\n",
        "",
        "kmsnet:v1:k:01:" + token.rsplit(":", 1)[1],
        "kmsnet:v1:k:1:***",
    ]
    for bad in bad_tokens:
        with pytest.raises(InvalidCiphertext):
            kms.decrypt("k", bad)
    with pytest.raises(InvalidCiphertext):
        kms.decrypt("k", token.encode() + b"\xff")
    assert issubclass(InvalidCiphertext, TrustError)


def test_key_id_and_version_are_bound_to_the_ciphertext(kms: KeyManagementSystem) -> None:
    kms.create_key("a")
    kms.create_key("b")
    token = kms.encrypt("a", b"for a")
    with pytest.raises(KeyMismatch):
        kms.decrypt("b", token)
    with pytest.raises(InvalidCiphertext):  # relabelled for b: b's key does not open it
        kms.decrypt("b", retoken(token, key_id="b"))
    kms.rotate("a")
    with pytest.raises(InvalidCiphertext):  # relabelled as version 2: the AAD no longer matches
        kms.decrypt("a", retoken(token, version=2))
    with pytest.raises(VersionNotFound):
        kms.decrypt("a", retoken(token, version=3))
    with pytest.raises(KeyNotFound):
        kms.decrypt("nope", token)


def test_invalid_requests(kms: KeyManagementSystem) -> None:
    for bad_id in ("", "has:colon", "-leading", "x" * 65, "sp ace", "é"):
        with pytest.raises(InvalidRequest):
            kms.create_key(bad_id)
    with pytest.raises(InvalidRequest):
        kms.create_key("k", "aes128-cbc")
    with pytest.raises(InvalidRequest):
        kms.create_key("k", rotation_period=timedelta(0))
    with pytest.raises(InvalidRequest):
        KeyManagementSystem(passphrase="no home")
    kms.create_key("k")
    with pytest.raises(KeyExists):
        kms.create_key("k", KeyType.ED25519)


# --- rotation, rewrap, minimum version ------------------------------------------------------------


def test_rotation_keeps_old_ciphertexts_readable_and_new_ones_use_the_new_version(kms: KeyManagementSystem) -> None:
    kms.create_key("k")
    v1 = kms.encrypt("k", b"one")
    info = kms.rotate("k")
    assert info.primary_version == 2 and [v.version for v in info.versions] == [1, 2]
    v2 = kms.encrypt("k", b"two")
    assert version_of(v2) == 2
    assert kms.decrypt("k", v1).plaintext == b"one" and kms.decrypt("k", v1).version == 1
    assert kms.decrypt("k", v2).plaintext == b"two" and kms.decrypt("k", v2).version == 2


def test_rewrap_moves_a_ciphertext_to_the_primary_without_returning_plaintext(kms: KeyManagementSystem) -> None:
    kms.create_key("k")
    old = kms.encrypt("k", b"payload")
    kms.rotate("k")
    kms.rotate("k")
    new = kms.rewrap("k", old)
    assert last_audit(kms) == {
        "actor": "local",
        "action": "rewrap",
        "key_id": "k",
        "from_version": 1,
        "version": 3,
        "outcome": "ok",
    }
    assert isinstance(new, str) and "payload" not in new
    assert version_of(new) == 3
    assert kms.decrypt("k", new).plaintext == b"payload"
    with pytest.raises(InvalidCiphertext):
        kms.rewrap("k", retoken(old, body=body_of(old)[:-1] + b"\x00"))


def test_rsa_keys_rotate_and_rewrap_too(kms: KeyManagementSystem) -> None:
    kms.create_key("r", KeyType.RSA_3072)
    old = kms.encrypt("r", b"short secret")
    kms.rotate("r")
    new = kms.rewrap("r", old)
    assert version_of(new) == 2
    assert kms.decrypt("r", new).plaintext == kms.decrypt("r", old).plaintext == b"short secret"
    with pytest.raises(InvalidCiphertext):  # the OAEP label binds the version
        kms.decrypt("r", retoken(old, version=2))


def test_min_decryption_version_refuses_older_ciphertexts(kms: KeyManagementSystem) -> None:
    kms.create_key("k")
    v1 = kms.encrypt("k", b"one")
    kms.rotate("k")
    v2 = kms.encrypt("k", b"two")
    assert kms.set_min_decryption_version("k", 2).min_decryption_version == 2
    with pytest.raises(VersionTooOld):
        kms.decrypt("k", v1)
    with pytest.raises(VersionTooOld):
        kms.rewrap("k", v1)
    assert kms.decrypt("k", v2).plaintext == b"two"
    with pytest.raises(VersionNotFound):
        kms.set_min_decryption_version("k", 3)
    with pytest.raises(VersionNotFound):
        kms.set_min_decryption_version("k", 0)
    kms.set_min_decryption_version("k", 1)  # lowering again is allowed (the material is still there)
    assert kms.decrypt("k", v1).plaintext == b"one"


def test_auto_rotation_period(kms: KeyManagementSystem, clock: Clock) -> None:
    kms.create_key("k", rotation_period=timedelta(days=30))
    first = kms.encrypt("k", b"x")
    clock.advance(days=29)
    assert version_of(kms.encrypt("k", b"x")) == 1
    clock.advance(days=1)
    assert kms.decrypt("k", first).version == 1  # reading does not rotate
    assert kms.describe("k").primary_version == 1
    assert version_of(kms.encrypt("k", b"x")) == 2
    rotations = [e for e in kms.audit.entries() if e.action == "rotate"]
    assert rotations[-1].fields["trigger"] == "rotation_period"
    assert kms.describe("k").versions[1].created_at == clock.now
    kms.set_rotation_period("k", None)
    clock.advance(days=365)
    assert version_of(kms.encrypt("k", b"x")) == 2


def test_auto_rotation_applies_to_signing_keys(kms: KeyManagementSystem, clock: Clock) -> None:
    kms.create_key("s", KeyType.ED25519, rotation_period=timedelta(hours=1))
    clock.advance(hours=2)
    assert version_of(kms.sign("s", b"m")) == 2


# --- states ---------------------------------------------------------------------------------------

# The spec (module docstring, docs/KMS.md), written out again so that a change to either side shows.
E, D, P, X = "enabled", "disabled", "pending_deletion", "destroyed"
SPEC_TRANSITIONS: dict[str, dict[Transition, str | None]] = {
    #        enable disable schedule_deletion cancel_deletion destroy
    E: dict(zip(Transition, [E, D, P, None, X], strict=True)),
    D: dict(zip(Transition, [E, D, P, None, X], strict=True)),
    P: dict(zip(Transition, [None, None, None, D, X], strict=True)),
    X: dict(zip(Transition, [None, None, None, None, None], strict=True)),
}
SPEC_ALLOWED = {
    Operation.ENCRYPT: {E},
    Operation.DECRYPT: {E},
    Operation.REWRAP: {E},
    Operation.SIGN: {E},
    Operation.VERIFY: {E},
    Operation.ROTATE: {E},
    Operation.PUBLIC_KEY: {E},
    Operation.SET_MIN_DECRYPTION_VERSION: {E, D},
    Operation.SET_ROTATION_PERIOD: {E, D},
    Operation.MARK_COMPROMISED: {E, D, P},
}


def test_tables_match_the_spec() -> None:
    assert {(s.value, t): new.value for (s, t), new in TRANSITIONS.items()} == {
        (s, t): new for s, row in SPEC_TRANSITIONS.items() for t, new in row.items() if new is not None
    }
    assert {op: {s.value for s in states} for op, states in ALLOWED.items()} == SPEC_ALLOWED


def put_in_state(kms: KeyManagementSystem, key_id: str, state: str) -> None:
    if state == D:
        kms.disable(key_id)
    elif state == P:
        kms.schedule_deletion(key_id, 7)
    elif state == X:
        kms.destroy(key_id)
    assert kms.describe(key_id).state == state


def apply(kms: KeyManagementSystem, key_id: str, event: Transition) -> None:
    actions: dict[Transition, Callable[[str], object]] = {
        Transition.ENABLE: kms.enable,
        Transition.DISABLE: kms.disable,
        Transition.SCHEDULE_DELETION: lambda k: kms.schedule_deletion(k, 7),
        Transition.CANCEL_DELETION: kms.cancel_deletion,
        Transition.DESTROY: kms.destroy,
    }
    actions[event](key_id)


@pytest.mark.parametrize("event", list(Transition))
@pytest.mark.parametrize("state", [E, D, P, X])
def test_every_transition_is_allowed_or_refused_as_documented(state: str, event: Transition) -> None:
    kms = KeyManagementSystem()
    kms.create_key("k")
    put_in_state(kms, "k", state)
    expected = SPEC_TRANSITIONS[state][event]
    if expected is None:
        with pytest.raises(KeyStateError):
            apply(kms, "k", event)
        assert kms.describe("k").state == state
        assert_last_audit(kms, action=event.value, outcome="refused", error="key_state_error")
    else:
        apply(kms, "k", event)
        info = kms.describe("k")
        assert info.state == expected
        assert (info.deletion_date is not None) == (expected == P)
        assert_last_audit(kms, action=event.value, state=expected, outcome="ok")


def perform(kms: KeyManagementSystem, op: Operation, key_id: str, artefact: str) -> None:
    actions: dict[Operation, Callable[[], object]] = {
        Operation.ENCRYPT: lambda: kms.encrypt(key_id, b"x"),
        Operation.DECRYPT: lambda: kms.decrypt(key_id, artefact),
        Operation.REWRAP: lambda: kms.rewrap(key_id, artefact),
        Operation.SIGN: lambda: kms.sign(key_id, b"x"),
        Operation.VERIFY: lambda: kms.verify(key_id, b"x", artefact),
        Operation.ROTATE: lambda: kms.rotate(key_id),
        Operation.PUBLIC_KEY: lambda: kms.public_key_pem(key_id),
        Operation.SET_MIN_DECRYPTION_VERSION: lambda: kms.set_min_decryption_version(key_id, 1),
        Operation.SET_ROTATION_PERIOD: lambda: kms.set_rotation_period(key_id, timedelta(days=1)),
        Operation.MARK_COMPROMISED: lambda: kms.mark_compromised(key_id, 1),
    }
    actions[op]()


@pytest.mark.parametrize("op", list(Operation))
@pytest.mark.parametrize("state", [E, D, P, X])
def test_every_operation_in_every_state(state: str, op: Operation) -> None:
    kms = KeyManagementSystem()
    signing = op in (Operation.SIGN, Operation.VERIFY, Operation.PUBLIC_KEY)
    kms.create_key("k", KeyType.ED25519 if signing else KeyType.AES256_GCM)
    artefact = kms.sign("k", b"x") if signing else kms.encrypt("k", b"x")
    put_in_state(kms, "k", state)
    if state in SPEC_ALLOWED[op]:
        perform(kms, op, "k", artefact)
        assert_last_audit(kms, action=op.value, outcome="ok")
    else:
        with pytest.raises(KeyStateError):
            perform(kms, op, "k", artefact)
        assert_last_audit(kms, action=op.value, outcome="refused", error="key_state_error")


def test_operations_check_the_key_type(kms: KeyManagementSystem) -> None:
    kms.create_key("aes")
    kms.create_key("sig", KeyType.ED25519)
    with pytest.raises(KeyTypeError):
        kms.sign("aes", b"x")
    with pytest.raises(KeyTypeError):
        kms.public_key_pem("aes")
    with pytest.raises(KeyTypeError):
        kms.encrypt("sig", b"x")
    with pytest.raises(KeyTypeError):
        kms.decrypt("sig", kms.sign("sig", b"x"))


def test_scheduled_deletion_waits_then_destroys(clock: Clock, tmp_path: Path) -> None:
    with KeyManagementSystem(tmp_path, PASS, clock=clock, argon2=ARGON2_TEST) as kms:
        kms.create_key("k")
        token = kms.encrypt("k", b"x")
        with pytest.raises(InvalidRequest):
            kms.schedule_deletion("k", 6)
        with pytest.raises(InvalidRequest):
            kms.schedule_deletion("k", 31)
        info = kms.schedule_deletion("k", 7)
        assert info.deletion_date == T0 + timedelta(days=7)
        clock.advance(days=7, seconds=-1)
        assert kms.describe("k").state == P
        clock.advance(seconds=1)
        with pytest.raises(KeyStateError, match="destroyed"):
            kms.decrypt("k", token)
        destroy = next(e for e in kms.audit.entries() if e.action == "destroy")
        assert destroy.actor == "scheduler" and destroy.fields["from_state"] == P
        assert kms.list_keys()[0].state == X
    with Keystore.open(tmp_path / KEYSTORE_FILE, passphrase=PASS) as store:
        assert store.names("kms", "material/") == []


def test_list_keys_destroys_what_is_due(kms: KeyManagementSystem, clock: Clock) -> None:
    kms.create_key("b")
    kms.create_key("a")
    kms.schedule_deletion("b", 7)
    clock.advance(days=8)
    assert [(i.key_id, i.state) for i in kms.list_keys()] == [("a", E), ("b", X)]


def test_cancelled_deletion_comes_back_disabled(kms: KeyManagementSystem, clock: Clock) -> None:
    kms.create_key("k")
    token = kms.encrypt("k", b"kept")
    kms.schedule_deletion("k")
    assert kms.describe("k").deletion_date == T0 + timedelta(days=30)
    assert kms.cancel_deletion("k").state == D
    clock.advance(days=60)
    kms.enable("k")
    assert kms.decrypt("k", token).plaintext == b"kept"


def test_destroyed_key_keeps_its_id(kms: KeyManagementSystem) -> None:
    kms.create_key("k")
    kms.destroy("k")
    with pytest.raises(KeyExists):
        kms.create_key("k")
    assert kms.describe("k").state == X


# --- compromised versions -------------------------------------------------------------------------


def test_compromised_version_refuses_to_encrypt_and_is_flagged_on_decrypt(kms: KeyManagementSystem) -> None:
    kms.create_key("k")
    old = kms.encrypt("k", b"secret")
    kms.mark_compromised("k", 1)
    assert kms.describe("k").versions[0].compromised
    with pytest.raises(CompromisedVersion):
        kms.encrypt("k", b"more")
    with pytest.raises(CompromisedVersion):
        kms.decrypt("k", old)
    refused = last_audit(kms)
    assert refused["compromised"] is True and refused["outcome"] == "refused"
    flagged = kms.decrypt("k", old, allow_compromised=True)
    assert flagged.plaintext == b"secret" and flagged.compromised
    assert last_audit(kms)["compromised"] is True
    kms.rotate("k")
    new = kms.rewrap("k", old)  # rewrap reads the compromised version: that is how data moves off it
    assert kms.decrypt("k", new).compromised is False
    assert version_of(kms.encrypt("k", b"after rotation")) == 2
    with pytest.raises(VersionNotFound):
        kms.mark_compromised("k", 3)
    assert issubclass(CompromisedVersion, TrustError)


def test_seed_decrypt_under_a_compromised_version_warns(kms: KeyManagementSystem) -> None:
    kms.generate_symmetric_key("s")
    token = kms.encrypt_data_symmetric("s", "Hello World")
    kms.mark_compromised("s", 1)
    with pytest.warns(CompromisedVersionWarning, match="compromised version 1"):
        assert kms.decrypt_data_symmetric("s", token) == "Hello World"


def test_compromised_signing_version(kms: KeyManagementSystem) -> None:
    kms.create_key("s", KeyType.ED25519)
    signature = kms.sign("s", b"release")
    kms.mark_compromised("s", 1)
    with pytest.raises(CompromisedVersion):
        kms.sign("s", b"release")
    with pytest.raises(CompromisedVersion):
        kms.verify("s", b"release", signature)
    assert kms.verify("s", b"release", signature, allow_compromised=True).compromised


# --- signatures -----------------------------------------------------------------------------------


def test_sign_and_verify(kms: KeyManagementSystem) -> None:
    kms.create_key("s", KeyType.ED25519)
    signature = kms.sign("s", b"release 1.0")
    assert TOKEN.fullmatch(signature) and len(body_of(signature)) == 64
    assert kms.verify("s", b"release 1.0", signature).version == 1
    with pytest.raises(InvalidSignature):
        kms.verify("s", b"release 1.1", signature)
    bad = body_of(signature)
    with pytest.raises(InvalidSignature):
        kms.verify("s", b"release 1.0", retoken(signature, body=bytes([bad[0] ^ 1]) + bad[1:]))
    with pytest.raises(InvalidSignature):
        kms.verify("s", b"release 1.0", "not a signature")
    kms.create_key("other", KeyType.ED25519)
    with pytest.raises(KeyMismatch):
        kms.verify("other", b"release 1.0", signature)
    # Plain Ed25519 over the data: anyone with the public key can check it.
    public = serialization.load_pem_public_key(kms.public_key_pem("s"))
    assert isinstance(public, Ed25519PublicKey)
    public.verify(bad, b"release 1.0")


def test_signatures_are_versioned(kms: KeyManagementSystem) -> None:
    kms.create_key("s", KeyType.ED25519)
    v1 = kms.sign("s", b"m")
    kms.rotate("s")
    v2 = kms.sign("s", b"m")
    assert version_of(v2) == 2
    assert kms.verify("s", b"m", v1).version == 1
    with pytest.raises(InvalidSignature):  # version 2's key does not verify version 1's signature
        kms.verify("s", b"m", retoken(v1, version=2))
    kms.set_min_decryption_version("s", 2)
    with pytest.raises(VersionTooOld):
        kms.verify("s", b"m", v1)
    assert kms.public_key_pem("s", 1) != kms.public_key_pem("s")


# --- RSA-OAEP -------------------------------------------------------------------------------------


def test_rsa_3072_oaep_limits(kms: KeyManagementSystem) -> None:
    kms.create_key("r", KeyType.RSA_3072)
    assert rsa_oaep_max_message(3072) == 318
    token = kms.encrypt("r", b"m" * 318)
    assert len(body_of(token)) == 384
    assert kms.decrypt("r", token).plaintext == b"m" * 318
    with pytest.raises(MessageTooLong, match="318"):
        kms.encrypt("r", b"m" * 319)
    with pytest.raises(MessageTooLong):
        kms.encrypt_asymmetric("r", "é" * 160)  # 320 bytes of UTF-8
    public = serialization.load_pem_public_key(kms.public_key_pem("r"))
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 3072
    body = body_of(token)
    with pytest.raises(InvalidCiphertext):
        kms.decrypt("r", retoken(token, body=body[:-1] + bytes([body[-1] ^ 1])))
    with pytest.raises(InvalidCiphertext):
        kms.decrypt("r", retoken(token, body=body[:-1]))


def test_rsa_oaep_wrapper_round_trip_at_2048() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    message = os.urandom(190)
    ciphertext = rsa_oaep_encrypt(private.public_key(), message, b"label")
    assert rsa_oaep_decrypt(private, ciphertext, b"label") == message
    with pytest.raises(InvalidCiphertext):
        rsa_oaep_decrypt(private, ciphertext, b"other label")
    with pytest.raises(MessageTooLong):
        rsa_oaep_encrypt(private.public_key(), message + b"!", b"")


def rsa_oaep_vectors() -> list[tuple[bytes, dict[str, str]]]:
    data = json.loads((VECTORS / "rsa_oaep_2048_sha256_mgf1sha256_test.json").read_text())
    out = []
    for group in data["testGroups"]:
        assert (group["keySize"], group["sha"], group["mgf"], group["mgfSha"]) == (2048, "SHA-256", "MGF1", "SHA-256")
        out += [(bytes.fromhex(group["privateKeyPkcs8"]), test) for test in group["tests"]]
    return out


RSA_OAEP_VECTORS = rsa_oaep_vectors()


def test_wycheproof_rsa_oaep_selection_is_complete() -> None:
    results = [t["result"] for _, t in RSA_OAEP_VECTORS]
    assert (len(results), results.count("valid"), results.count("invalid")) == (37, 18, 19)


@pytest.mark.parametrize(("pkcs8", "vector"), RSA_OAEP_VECTORS, ids=[f"tc{t['tcId']}" for _, t in RSA_OAEP_VECTORS])
def test_wycheproof_rsa_oaep(pkcs8: bytes, vector: dict[str, str]) -> None:
    private = serialization.load_der_private_key(pkcs8, password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    ciphertext, label = bytes.fromhex(vector["ct"]), bytes.fromhex(vector["label"])
    if vector["result"] == "valid":
        assert rsa_oaep_decrypt(private, ciphertext, label) == bytes.fromhex(vector["msg"])
    else:
        with pytest.raises(InvalidCiphertext):
            rsa_oaep_decrypt(private, ciphertext, label)


# --- X25519 ---------------------------------------------------------------------------------------


def test_diffie_hellman_is_hkdf_over_x25519(kms: KeyManagementSystem) -> None:
    private_a, public_a = kms.generate_diffie_hellman_keys()
    private_b, public_b = kms.generate_diffie_hellman_keys()
    secret = kms.derive_shared_secret(private_a, public_b)
    expected = HKDF(hashes.SHA256(), 32, salt=None, info=DH_INFO).derive(private_a.exchange(public_b))
    assert secret == expected and len(secret) == 32
    raw_private = private_b.private_bytes_raw()
    assert kms.derive_shared_secret(raw_private, public_a.public_bytes_raw()) == secret
    assert raw_private.hex() not in repr(private_b)


LOW_ORDER_POINTS = [
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order 8
]


@pytest.mark.parametrize("low_order", LOW_ORDER_POINTS)
def test_low_order_public_keys_are_refused(kms: KeyManagementSystem, low_order: bytes) -> None:
    with pytest.raises(WeakPeerKey):
        kms.derive_shared_secret(X25519PrivateKey.generate(), low_order)
    assert last_audit(kms)["error"] == "weak_peer_key"


def test_malformed_x25519_keys(kms: KeyManagementSystem) -> None:
    with pytest.raises(InvalidRequest):
        kms.derive_shared_secret(b"short", bytes(32))


# --- persistence, sealing at rest -----------------------------------------------------------------


def test_keys_persist_across_process_restarts(tmp_path: Path) -> None:
    with KeyManagementSystem(tmp_path, PASS, argon2=ARGON2_TEST) as kms:
        kms.generate_symmetric_key("s")
        token = kms.encrypt_data_symmetric("s", "survives a restart")
    script = (
        "import os, sys\n"
        "from node.kms import KeyManagementSystem\n"
        "kms = KeyManagementSystem(sys.argv[1], os.environ['TEST_PASSPHRASE'], create=False)\n"
        "print(kms.decrypt_data_symmetric('s', sys.argv[2]))\n"
        "kms.rotate('s')\n"
        "print(kms.encrypt_data_symmetric('s', 'from the child'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), token],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
        env={**os.environ, "TEST_PASSPHRASE": PASS},
    )
    assert done.returncode == 0, done.stderr
    first, child_token = done.stdout.splitlines()
    assert first == "survives a restart"
    with KeyManagementSystem(tmp_path, PASS, create=False) as kms:
        assert kms.describe("s").primary_version == 2
        assert kms.decrypt_data_symmetric("s", child_token) == "from the child"
        assert kms.audit.verify() == 6  # create, encrypt | decrypt, rotate, encrypt | decrypt


def test_missing_keystore_and_wrong_passphrase(tmp_path: Path) -> None:
    with pytest.raises(KeystoreNotFound):
        KeyManagementSystem(tmp_path / "nowhere", PASS, create=False)
    assert not (tmp_path / "nowhere").exists()
    with KeyManagementSystem(tmp_path, PASS, argon2=ARGON2_TEST) as kms:
        kms.create_key("k")
    path = tmp_path / KEYSTORE_FILE
    before = path.read_bytes()
    with pytest.raises(WrongPassphrase):
        KeyManagementSystem(tmp_path, "not the passphrase")
    assert path.read_bytes() == before


def test_keystore_file_holds_no_key_bytes(tmp_path: Path) -> None:
    with KeyManagementSystem(tmp_path, PASS, argon2=ARGON2_TEST) as kms:
        kms.create_key("aes")
        kms.rotate("aes")
        kms.create_key("rsa", KeyType.RSA_3072)
        kms.create_key("sig", KeyType.ED25519)
        kms.encrypt("aes", b"a plaintext that must not be stored")
    path = tmp_path / KEYSTORE_FILE
    on_disk = disk_bytes(path)
    with Keystore.open(path, passphrase=PASS) as store:
        names = store.names("kms", "material/")
        assert len(names) == 4
        secrets = [store.get("kms", name) for name in names] + [store.get("kms", "audit-signing-key")]
        data_key = store._data_key
    rsa_der = next(s for s, n in zip(secrets, names, strict=False) if n.startswith("material/rsa/"))
    rsa_key = serialization.load_der_private_key(rsa_der, password=None)  # type: ignore[arg-type]
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    d = rsa_key.private_numbers().d
    secrets += [d.to_bytes((d.bit_length() + 7) // 8, "big"), data_key]
    assert b"material/aes/1" in on_disk  # labels are in clear: the search does find things
    for secret in secrets:
        assert secret is not None and len(secret) >= 32
        assert secret not in on_disk
        assert secret[:16] not in on_disk
    assert b"a plaintext that must not be stored" not in on_disk


def test_destroyed_material_leaves_no_trace_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / KEYSTORE_FILE
    with KeyManagementSystem(tmp_path, PASS, argon2=ARGON2_TEST) as kms:
        kms.create_key("k")
        kms.rotate("k")
        kms.create_key("kept")
        raw = sqlite3.connect(path)
        sealed = [row[0] for row in raw.execute("SELECT sealed FROM records WHERE name LIKE 'material/k/%'")]
        raw.close()
        assert len(sealed) == 2 and all(s in disk_bytes(path) for s in sealed)
        kms.destroy("k")
        assert all(s not in disk_bytes(path) for s in sealed)
        assert kms.describe("k").state == X
        assert kms.encrypt("kept", b"still fine")
    with Keystore.open(path, passphrase=PASS) as store:
        assert store.names("kms", "material/") == ["material/kept/1"]


# --- audit ----------------------------------------------------------------------------------------


def test_every_operation_is_audited_without_material(tmp_path: Path, clock: Clock) -> None:
    with KeyManagementSystem(tmp_path, PASS, argon2=ARGON2_TEST, clock=clock, actor="alice") as kms:
        kms.create_key("k")
        token = kms.encrypt("k", b"plaintext-marker")
        kms.decrypt("k", token)
        kms.rotate("k")
        kms.rewrap("k", token)
        with pytest.raises(InvalidCiphertext):
            kms.decrypt("k", token[:-4] + "AAAA")
        kms.create_key("s", KeyType.ED25519)
        kms.verify("s", b"m", kms.sign("s", b"m"))
        kms.disable("k")
        entries = list(kms.audit.entries())
        assert kms.audit.verify() == len(entries)
        assert all(e.signature is not None for e in entries)
        entries_json = json.dumps([e.to_json() for e in entries])
    assert [(e.action, e.fields.get("key_id"), e.fields.get("version"), e.fields["outcome"]) for e in entries] == [
        ("create", "k", 1, "ok"),
        ("encrypt", "k", 1, "ok"),
        ("decrypt", "k", 1, "ok"),
        ("rotate", "k", 2, "ok"),
        ("rewrap", "k", 2, "ok"),
        ("decrypt", "k", 1, "refused"),
        ("create", "s", 1, "ok"),
        ("sign", "s", 1, "ok"),
        ("verify", "s", 1, "ok"),
        ("disable", "k", None, "ok"),
    ]
    assert {e.actor for e in entries} == {"alice"}
    assert entries[0].time == T0.isoformat(timespec="microseconds")
    assert entries[5].fields["error"] == "invalid_ciphertext"
    with Keystore.open(tmp_path / KEYSTORE_FILE, passphrase=PASS) as store:
        materials = [store.get("kms", name) for name in store.names("kms", "material/")]
    assert "plaintext-marker" not in entries_json
    for material in materials:
        assert material is not None
        assert material.hex() not in entries_json
        assert base64.b64encode(material).decode() not in entries_json


def test_repr_shows_no_secrets(tmp_path: Path) -> None:
    with KeyManagementSystem(tmp_path, PASS, argon2=ARGON2_TEST) as kms:
        info = kms.create_key("k")
        assert repr(kms) == f"<KeyManagementSystem {tmp_path / KEYSTORE_FILE}>"
        with Keystore.open(tmp_path / KEYSTORE_FILE, passphrase=PASS) as store:
            material = store.get("kms", "material/k/1")
        assert material is not None
        for text in (repr(kms), repr(info), repr(kms.decrypt("k", kms.encrypt("k", b"hidden"))), repr(kms.audit)):
            assert material.hex() not in text and "hidden" not in text


def test_key_info_json_summary(kms: KeyManagementSystem, clock: Clock) -> None:
    kms.create_key("k", rotation_period=timedelta(hours=2))
    kms.rotate("k")
    kms.mark_compromised("k", 1)
    assert kms.schedule_deletion("k", 7).to_json() == {
        "key": "k",
        "type": "aes256-gcm",
        "state": "pending_deletion",
        "primary_version": 2,
        "versions": 2,
        "min_decryption_version": 1,
        "compromised_versions": [1],
        "created_at": "2030-01-01T00:00:00+00:00",
        "rotation_period_seconds": 7200,
        "deletion_date": "2030-01-08T00:00:00+00:00",
    }


def test_key_state_values_are_the_documented_names() -> None:
    assert [s.value for s in KeyState] == [E, D, P, X]
    assert [t.value for t in KeyType] == ["aes256-gcm", "rsa-3072", "ed25519"]
