"""`kmsnet kms ...`: the seed's key-management system on the command line.

Parsing and printing only: every decision is node.kms's (docs/KMS.md).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import sys
from collections.abc import Iterator
from datetime import timedelta

import click

from kmsnet.exits import BAD_INPUT, EPILOG, CliFailure
from kmsnet.options import (
    ENVIRONMENT_HELP,
    Output,
    StoreOptions,
    duration,
    json_option,
    node_failures,
    read_input,
    store_options,
)
from kmsnet.pkcs11_options import PKCS11_ENVIRONMENT_HELP, PinSource, token_options
from kmsnet.writer import exclusive
from node.home import KEYSTORE_FILE
from node.keystore import Keystore
from node.kms import DEFAULT_WAITING_DAYS, KeyInfo, KeyManagementSystem, KeyType
from node.pkcs11 import TokenSlot

ACTOR = "cli"


def _epilog(*examples: str) -> str:
    # "\b" keeps click from re-flowing the example lines into one paragraph.
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in examples) + "\n\n" + EPILOG


@contextlib.contextmanager
def _open(
    store: StoreOptions, *, create: bool = False, pin: PinSource | None = None, keystore_token: TokenSlot | None = None
) -> Iterator[KeyManagementSystem]:
    """The KMS in `store.home`, with node errors mapped to exit codes (the token PIN is asked for
    only when a key kept in a token is used, or when a token key unlocks the keystore; a new
    keystore is made so with `keystore_token`)."""
    path = store.home / KEYSTORE_FILE
    if not create and not path.exists():
        # Say so before asking for a passphrase that could not help.
        raise CliFailure(f"no keystore at {path} (create a key first: kmsnet kms create NAME)", BAD_INPUT)
    with exclusive(store), node_failures():
        by_token = Keystore.unlocked_by(path) == "pkcs11" if path.exists() else keystore_token is not None
        make = functools.partial(
            KeyManagementSystem,
            store.home,
            create=create,
            argon2=store.argon2,
            actor=ACTOR,
            pin=pin or PinSource(),
            keystore_token=keystore_token,
        )
        if by_token:
            kms = make(None)
        elif path.exists():
            kms = store.open_with(make)
        else:
            kms = make(store.passphrase(confirm=True))
        try:
            yield kms
        finally:
            kms.close()


def _state_line(info: KeyInfo) -> str:
    line = f"{info.key_id}: {info.state}, {info.key_type}, primary version {info.primary_version}"
    if info.deletion_date is not None:
        line += f", deletion on {info.deletion_date.isoformat(timespec='seconds')}"
    return line


def _show(out: Output, info: KeyInfo) -> None:
    out.emit(info.to_json(), _state_line(info))


@click.group(epilog=f"{ENVIRONMENT_HELP} {PKCS11_ENVIRONMENT_HELP}\n\n{EPILOG}")
def kms() -> None:
    """The seed's KeyManagementSystem: versioned keys, rotation, rewrap, states, signatures.

    Keys live in HOME/keystore.db, sealed under a passphrase (Argon2id + AES-256-GCM). Every
    command takes --home (or KMSNET_HOME) and reads the passphrase from KMSNET_PASSPHRASE,
    --passphrase-file or a prompt. Data comes from the argument, or from stdin when the
    argument is '-' or left out. Every operation lands in the keystore's audit log.
    """


@kms.command(
    epilog=_epilog(
        "kmsnet kms create session1 --home ~/.kmsnet",
        "kmsnet kms create user1 --type rsa-3072",
        "kmsnet kms create releases --type ed25519 --rotation-period 90d",
        "kmsnet kms create vault1 --pkcs11 /usr/lib/softhsm/libsofthsm2.so --token kmsnet --pin-file kms.pin",
        "kmsnet kms create first --pkcs11 /usr/lib/softhsm/libsofthsm2.so --token kmsnet --keystore-in-token",
    )
)
@click.argument("name")
@click.option(
    "--type",
    "key_type",
    type=click.Choice([t.value for t in KeyType]),
    default=KeyType.AES256_GCM.value,
    show_default=True,
    help="aes256-gcm encrypts any data; rsa-3072 encrypts up to 318 bytes (OAEP-SHA256); ed25519 signs.",
)
@click.option(
    "--rotation-period",
    callback=duration,
    metavar="DURATION",
    help="Rotate automatically once the primary is this old (90s, 12h, 30d, 2w).",
)
@click.option(
    "--keystore-in-token",
    is_flag=True,
    help="With --pkcs11 and --token, for a NEW keystore: its data key is wrapped by a key in that token "
    "instead of a passphrase (every later command needs the token's PIN, not a passphrase).",
)
@token_options()
@store_options
@json_option
def create(
    name: str,
    key_type: str,
    rotation_period: timedelta | None,
    keystore_in_token: bool,
    key_token: TokenSlot | None,
    pin: PinSource,
    store: StoreOptions,
    out: Output,
) -> None:
    """Create a key.

    NAME gets version 1 and starts enabled. The first key also creates the keystore
    (you are asked for a new passphrase twice unless KMSNET_PASSPHRASE is set). With
    --pkcs11 and --token, an aes256-gcm or ed25519 key is generated in that PKCS#11 token,
    non-extractable, and encrypts, decrypts and signs there; its later versions too.
    """
    if keystore_in_token and key_token is None:
        raise click.UsageError("--keystore-in-token needs --pkcs11 and --token")
    if keystore_in_token and (store.home / KEYSTORE_FILE).exists():
        raise CliFailure("--keystore-in-token is for a new keystore: this one exists already", BAD_INPUT)
    with _open(store, create=True, pin=pin, keystore_token=key_token if keystore_in_token else None) as k:
        _show(out, k.create_key(name, key_type, rotation_period=rotation_period, token=key_token))


@kms.command(
    epilog=_epilog(
        "kmsnet kms encrypt session1 'Hello World'",
        "kmsnet kms encrypt session1 < notes.txt > notes.kms",
    )
)
@click.argument("name")
@click.argument("data", required=False)
@store_options
@json_option
def encrypt(name: str, data: str | None, store: StoreOptions, out: Output) -> None:
    """Encrypt data under a key's primary version.

    Encrypts DATA (or stdin) with aes256-gcm or rsa-3072 key NAME and prints the ciphertext,
    kmsnet:v1:NAME:VERSION:BASE64.
    """
    plaintext = read_input(data)
    with _open(store) as k:
        ciphertext = k.encrypt(name, plaintext)
    out.emit({"key": name, "ciphertext": ciphertext}, ciphertext)


@kms.command(
    epilog=_epilog(
        "kmsnet kms decrypt session1 kmsnet:v1:session1:1:3q2+7w...",
        "kmsnet kms decrypt session1 < notes.kms > notes.txt",
    )
)
@click.argument("name")
@click.argument("ciphertext", required=False)
@click.option(
    "--allow-compromised", is_flag=True, help="Decrypt even under a version flagged compromised (with a warning)."
)
@store_options
@json_option
def decrypt(name: str, ciphertext: str | None, allow_compromised: bool, store: StoreOptions, out: Output) -> None:
    """Decrypt a ciphertext.

    Decrypts CIPHERTEXT (or stdin) with key NAME and prints the plaintext exactly as it was
    encrypted (plus a newline on a terminal). A tampered ciphertext exits 4, as does one under a
    compromised version unless --allow-compromised is given; one older than the key's minimum version exits 1.
    """
    token = read_input(ciphertext).strip()
    with _open(store) as k:
        result = k.decrypt(name, token, allow_compromised=allow_compromised)
    if result.compromised:
        out.warn(f"version {result.version} of {name} is compromised: rewrap this ciphertext")
    if not out.as_json:
        # The bytes exactly as encrypted into a pipe or file; on a terminal, a newline so that the
        # shell's prompt does not run on after the text.
        end = sys.stdout.isatty() and not result.plaintext.endswith(b"\n")
        click.echo(result.plaintext, nl=end)
        return
    try:
        text: str | None = result.plaintext.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    record = {"key": name, "version": result.version, "compromised": result.compromised, "plaintext": text}
    out.emit({**record, "plaintext_base64": base64.b64encode(result.plaintext).decode("ascii")}, "")


@kms.command(epilog=_epilog("kmsnet kms rotate session1"))
@click.argument("name")
@store_options
@json_option
def rotate(name: str, store: StoreOptions, out: Output) -> None:
    """Add a key version and make it primary.

    New ciphertexts and signatures use the new version; older ones still decrypt and verify
    (unless set-min-version says otherwise).
    """
    with _open(store) as k:
        _show(out, k.rotate(name))


@kms.command(epilog=_epilog("kmsnet kms rewrap session1 < notes.kms > notes.v2.kms"))
@click.argument("name")
@click.argument("ciphertext", required=False)
@store_options
@json_option
def rewrap(name: str, ciphertext: str | None, store: StoreOptions, out: Output) -> None:
    """Re-encrypt a ciphertext under the primary version.

    Takes CIPHERTEXT (or stdin), made under any readable version of NAME, and prints it
    re-encrypted under the primary version; the plaintext is never shown.
    """
    token = read_input(ciphertext).strip()
    with _open(store) as k:
        new = k.rewrap(name, token)
    out.emit({"key": name, "ciphertext": new}, new)


@kms.command(epilog=_epilog("kmsnet kms disable session1", "kmsnet kms enable session1"))
@click.argument("name")
@store_options
@json_option
def disable(name: str, store: StoreOptions, out: Output) -> None:
    """Disable a key: no cryptographic use until it is enabled again."""
    with _open(store) as k:
        _show(out, k.disable(name))


@kms.command(epilog=_epilog("kmsnet kms enable session1"))
@click.argument("name")
@store_options
@json_option
def enable(name: str, store: StoreOptions, out: Output) -> None:
    """Enable a disabled key (also after cancel-deletion)."""
    with _open(store) as k:
        _show(out, k.enable(name))


@kms.command(
    epilog=_epilog(
        "kmsnet kms destroy session1               # deleted in 30 days unless cancelled",
        "kmsnet kms destroy session1 --days 7",
        "kmsnet kms destroy session1 --now --yes   # immediately, for good",
    )
)
@click.argument("name")
@click.option(
    "--days",
    type=click.IntRange(7, 30),
    default=DEFAULT_WAITING_DAYS,
    show_default=True,
    help="Waiting period before the material is deleted.",
)
@click.option("--now", "immediately", is_flag=True, help="Destroy immediately instead of scheduling.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation with --now.")
@store_options
@json_option
def destroy(name: str, days: int, immediately: bool, yes: bool, store: StoreOptions, out: Output) -> None:
    """Schedule a key's deletion, or destroy it now.

    By default NAME goes to pending_deletion and is destroyed after --days (cancel-deletion
    stops that). With --now it is destroyed at once. A destroyed key's material is deleted from
    the keystore and cannot be recovered: everything encrypted under it becomes unreadable.
    """
    if immediately and not yes:
        click.confirm(f"Destroy {name} now? Everything encrypted under it becomes unreadable.", abort=True)
    with _open(store) as k:
        info = k.destroy(name) if immediately else k.schedule_deletion(name, days)
    _show(out, info)


@kms.command("cancel-deletion", epilog=_epilog("kmsnet kms cancel-deletion session1"))
@click.argument("name")
@store_options
@json_option
def cancel_deletion(name: str, store: StoreOptions, out: Output) -> None:
    """Cancel a scheduled deletion.

    The key comes back disabled, as in AWS KMS: enable it to use it again.
    """
    with _open(store) as k:
        _show(out, k.cancel_deletion(name))


@kms.command(epilog=_epilog("kmsnet kms compromise session1 2", "kmsnet kms rotate session1"))
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
@store_options
@json_option
def compromise(name: str, version: int, store: StoreOptions, out: Output) -> None:
    """Flag a key version as compromised.

    For good: VERSION of NAME no longer encrypts or signs (rotate if it is the primary), and
    decrypt/verify under it exit 4 unless --allow-compromised is given. rewrap moves data off it.
    """
    with _open(store) as k:
        _show(out, k.mark_compromised(name, version))


@kms.command("set-min-version", epilog=_epilog("kmsnet kms set-min-version session1 3"))
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
@store_options
@json_option
def set_min_version(name: str, version: int, store: StoreOptions, out: Output) -> None:
    """Refuse ciphertexts older than a version.

    NAME's ciphertexts and signatures made under versions older than VERSION are refused from
    now on (like Vault's min_decryption_version). Lowering it again is allowed.
    """
    with _open(store) as k:
        _show(out, k.set_min_decryption_version(name, version))


@kms.command("list", epilog=_epilog("kmsnet kms list", "kmsnet kms list --json | jq .state"))
@store_options
@json_option
def list_keys(store: StoreOptions, out: Output) -> None:
    """List keys with their type, state and versions (destroyed ones too)."""
    with _open(store) as k:
        infos = k.list_keys()
    for info in infos:
        _show(out, info)


@kms.command(epilog=_epilog("kmsnet kms sign releases < app.tar.gz > app.sig"))
@click.argument("name")
@click.argument("data", required=False)
@store_options
@json_option
def sign(name: str, data: str | None, store: StoreOptions, out: Output) -> None:
    """Sign data with an ed25519 key.

    Signs DATA (or stdin) with the primary version of NAME and prints the signature,
    kmsnet:v1:NAME:VERSION:BASE64.
    """
    payload = read_input(data)
    with _open(store) as k:
        signature = k.sign(name, payload)
    out.emit({"key": name, "signature": signature}, signature)


@kms.command(epilog=_epilog('kmsnet kms verify releases "$(cat app.sig)" < app.tar.gz'))
@click.argument("name")
@click.argument("signature")
@click.argument("data", required=False)
@click.option("--allow-compromised", is_flag=True, help="Accept a signature by a version flagged compromised.")
@store_options
@json_option
def verify(
    name: str, signature: str, data: str | None, allow_compromised: bool, store: StoreOptions, out: Output
) -> None:
    """Verify a signature made by sign.

    Checks SIGNATURE over DATA (or stdin) with key NAME: exit 0 if it verifies, 4 if not.
    """
    payload = read_input(data)
    with _open(store) as k:
        result = k.verify(name, payload, signature.strip(), allow_compromised=allow_compromised)
    if result.compromised:
        out.warn(f"version {result.version} of {name} is compromised: this signature proves little")
    out.emit(
        {"key": name, "version": result.version, "valid": True, "compromised": result.compromised},
        f"signature OK ({name} version {result.version})",
    )


@kms.command("public-key", epilog=_epilog("kmsnet kms public-key releases > releases.pem"))
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), help="Key version (default: the primary).")
@store_options
@json_option
def public_key(name: str, version: int | None, store: StoreOptions, out: Output) -> None:
    """Print a key's public key (PEM).

    For rsa-3072 and ed25519 keys, so that others can encrypt to NAME or check its signatures.
    """
    with _open(store) as k:
        pem = k.public_key_pem(name, version).decode("ascii")
    out.emit({"key": name, "public_key_pem": pem}, pem.rstrip("\n"))


@kms.command(epilog=_epilog("kmsnet kms audit", "kmsnet kms audit --verify"))
@click.option("--verify", "check", is_flag=True, help="Check the hash chain and signatures; exit 4 if broken.")
@store_options
@json_option
def audit(check: bool, store: StoreOptions, out: Output) -> None:
    """Show or verify the audit log.

    One line per operation: who did what to which key and version, and whether it was refused;
    never key material or data. --verify checks the hash chain and signatures (exit 4 if broken).
    """
    with _open(store) as k:
        if check:
            count = k.audit.verify()
            out.emit({"intact": True, "entries": count}, f"audit log intact: {count} entries")
            return
        for entry in k.audit.entries():
            details = " ".join(f"{name}={value}" for name, value in sorted(entry.fields.items()))
            out.emit(entry.to_json(), f"{entry.seq} {entry.time} {entry.actor} {entry.action} {details}")
