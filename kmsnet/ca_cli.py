"""`kmsnet ca ...`: create and run the certificate authority, and administer it.

Parsing and printing only: every decision is the CA package's (ca/, docs/CA.md).

Admin actions (token, revoke, list, audit, admin, relay-cert) run in an admin session: the one
`kmsnet ca login` opened (15 minutes), or a one-shot session opened with `--otp CODE` (or
KMSNET_OTP) and ended when the command ends, or, in a terminal, one opened with a code typed at
a prompt. Without any of these the CA refuses the action (exit 4) and audits the attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from ca import DEFAULT_PORT, AdminSession, CertificateAuthority
from ca import serve as serve_ca
from ca.admin import ROLES
from ca.authority import (
    CA_PEM,
    DEFAULT_TOKEN_TTL,
    FIRST_ADMIN,
    CaPolicy,
    IssuedCertificate,
    require_ca,
    require_no_ca,
)
from kmsnet import logs
from kmsnet.exits import BAD_INPUT, EPILOG, USAGE, CliFailure
from kmsnet.options import (
    ENVIRONMENT_HELP,
    Output,
    StoreOptions,
    _have_terminal,
    duration,
    json_option,
    node_failures,
    store_options,
)
from kmsnet.passphrases import CA_ROOT
from kmsnet.pkcs11_options import PKCS11_ENVIRONMENT_HELP, PinSource, token_options
from node.home import write_new_files
from node.pkcs11 import TokenSlot
from protocol import certs
from protocol.revocation import REASONS

F = TypeVar("F", bound=Callable[..., Any])

OTP_ENV = "KMSNET_OTP"
ADMIN_ENV = "KMSNET_ADMIN"
_TTL_TEXT = f"{int(DEFAULT_TOKEN_TTL.total_seconds() // 3600)}h"
_DEFAULTS = CaPolicy()

CA_ENVIRONMENT_HELP = (
    f"{ENVIRONMENT_HELP} {OTP_ENV} (a TOTP code, instead of --otp), {ADMIN_ENV} (instead of --admin). "
    f"{PKCS11_ENVIRONMENT_HELP}"
)


def _epilog(*examples: str) -> str:
    # "\b" keeps click from re-flowing the example lines into one paragraph.
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in examples) + "\n\n" + EPILOG


def _host_port(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    """Click callback: HOST:PORT (an IPv6 host in brackets) -> (host, port)."""
    host, colon, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (port 0..65535; 0 picks a free one)", ctx, param)
    return host, int(port)


def _duration_text(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@contextlib.contextmanager
def _open(store: StoreOptions) -> Iterator[CertificateAuthority]:
    """The CA in `store.home`, with node errors mapped to exit codes."""
    with node_failures():
        # Before the passphrase prompt: no passphrase can help a home without a CA.
        require_ca(store.home)
        authority = store.open_with(functools.partial(CertificateAuthority.open, store.home, pin=PinSource()))
        try:
            yield authority
        finally:
            authority.close()


@dataclass(frozen=True)
class AdminOptions:
    """Who acts, and with which code, as given on the command line."""

    admin: str | None
    code: str | None


def admin_options(command: F) -> F:
    """Add --admin and --otp; pass them on as `auth: AdminOptions`."""

    @functools.wraps(command)
    def wrapper(*args: Any, admin: str | None, otp: str | None, **kwargs: Any) -> Any:
        return command(*args, auth=AdminOptions(admin, otp), **kwargs)

    options = [
        click.option(
            "--admin",
            envvar=ADMIN_ENV,
            metavar="NAME",
            help=f"Administrator acting (default: the logged-in one, else {FIRST_ADMIN!r}). Env: {ADMIN_ENV}.",
        ),
        click.option(
            "--otp",
            envvar=OTP_ENV,
            metavar="CODE",
            help=f"A current TOTP code: act in a one-shot session instead of the `ca login` one. Env: {OTP_ENV}.",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


def _prompt_code(admin: str) -> str | None:
    """A code typed at the terminal, or None without one."""
    if not _have_terminal():
        return None
    code: str = click.prompt(f"TOTP code for {admin!r}", hide_input=True, err=True)
    return code.strip()


@contextlib.contextmanager
def _session(authority: CertificateAuthority, auth: AdminOptions) -> Iterator[AdminSession | None]:
    """The session an admin action runs in (module docstring); None when there is none, which the
    CA refuses and audits."""
    if auth.code is None:
        remembered = authority.remembered_session()
        if remembered is not None and auth.admin in (None, remembered.admin):
            yield remembered
            return
    admin = auth.admin or FIRST_ADMIN
    code = auth.code if auth.code is not None else _prompt_code(admin)
    if code is None:
        yield None
        return
    session = authority.login(admin, code)
    try:
        yield session
    finally:
        authority.logout(session)


@contextlib.contextmanager
def _admin_action(
    store: StoreOptions, auth: AdminOptions
) -> Iterator[tuple[CertificateAuthority, AdminSession | None]]:
    """Open the CA and the session an admin action runs in; node errors become exit codes."""
    with _open(store) as authority, node_failures(), _session(authority, auth) as session:
        yield authority, session


@click.group(epilog=f"{CA_ENVIRONMENT_HELP}\n\n{EPILOG}")
def ca() -> None:
    """The certificate authority: root key, administrators, tokens, certificates, revocation.

    A CA lives in HOME (--home or KMSNET_HOME): ca.db holds the root key and the CA's state,
    sealed under the CA passphrase (KMSNET_PASSPHRASE, --passphrase-file or a prompt); ca.pem
    is the root certificate, public, which the relay is given and every node pins. Admin
    actions also need an administrator's TOTP code: `kmsnet ca login` (a 15-minute session)
    or --otp on the action. See docs/CA.md.
    """


@ca.command(
    epilog=_epilog(
        "kmsnet ca init --home ~/kmsnet/ca",
        "KMSNET_PASSPHRASE_FILE=ca.pass kmsnet ca init --home ca --json",
        "kmsnet ca init --home ca --crl-lifetime 6h --cert-validity 2d",
        "kmsnet ca init --home ca --pkcs11 /usr/lib/softhsm/libsofthsm2.so --token kmsnet --pin-file ca.pin",
    )
)
@click.option("--name", default="kmsnet-ca", show_default=True, help="Common name of the root certificate.")
@click.option(
    "--crl-lifetime",
    default=_duration_text(_DEFAULTS.crl_lifetime),
    show_default=True,
    callback=duration,
    metavar="DURATION",
    help="CRL validity (nextUpdate - thisUpdate); a new CRL is issued after 2/3 of it and at every revocation.",
)
@click.option(
    "--cert-validity",
    default=_duration_text(_DEFAULTS.certificate_validity),
    show_default=True,
    callback=duration,
    metavar="DURATION",
    help="Validity of node certificates; nodes renew them after 2/3 of it.",
)
@token_options()
@store_options
@json_option
def init(
    name: str,
    crl_lifetime: timedelta,
    cert_validity: timedelta,
    key_token: TokenSlot | None,
    pin: PinSource,
    store: StoreOptions,
    out: Output,
) -> None:
    """Create a new CA in HOME.

    Makes an Ed25519 root key and a self-signed root certificate (valid ten years), the CA's
    own node identity for the relay, the first administrator "admin" (role admin) and an
    empty CRL state. Refuses a HOME that holds a CA already: key files are never
    overwritten. With --pkcs11 and --token, the root key and the CA node's key are generated
    in that PKCS#11 token and never leave it: ca.db records only where they are, and every
    command on this CA needs the token and its PIN (docs/CA.md).

    Prints the root's SHA-256 fingerprint, which nodes check with `kmsnet node init
    --ca-fingerprint`, and, ONCE, the administrator's TOTP provisioning URI (otpauth://...):
    add it to an authenticator app (on stderr; in the JSON with --json).
    """
    with node_failures():
        require_no_ca(store.home)
        policy = CaPolicy(crl_lifetime=crl_lifetime, certificate_validity=cert_validity)
        created = CertificateAuthority.init(
            store.home,
            store.passphrase(confirm=True, policy=CA_ROOT),
            name=name,
            argon2=store.argon2,
            policy=policy,
            token=key_token,
            pin=pin if key_token else None,
        )
    admin = created.admin
    if not out.as_json:
        click.echo(f"CA created in {store.home}; its root is {store.home / CA_PEM}.", err=True)
        click.echo(
            f"Administrator {admin.name!r} (role {admin.role}): add this to an authenticator app now, "
            f"it is not shown again:\n  {admin.otpauth}",
            err=True,
        )
        click.echo("Root fingerprint:", err=True)
    record: dict[str, object] = {
        "home": str(store.home),
        "root": str(store.home / CA_PEM),
        "fingerprint": created.fingerprint,
        "admin": {"name": admin.name, "role": admin.role, "otpauth": admin.otpauth},
        "pkcs11_token": None if key_token is None else key_token.token,
    }
    out.emit(record, created.fingerprint)


@ca.command(
    epilog=_epilog(
        "kmsnet ca serve --home ca",
        "kmsnet ca serve --home ca --http 127.0.0.1:0 --relay ws://127.0.0.1:8765",
    )
)
@click.option(
    "--http",
    "listen",
    default=f"127.0.0.1:{DEFAULT_PORT}",
    show_default=True,
    callback=_host_port,
    metavar="HOST:PORT",
    help="Where the HTTP API listens (port 0: any free port). Keep it on loopback: the admin API is plain HTTP.",
)
@click.option(
    "--relay",
    "relay_url",
    metavar="URL",
    help="Relay (ws:// or wss://) to publish the CRL to, connecting as node 'ca'.",
)
@store_options
def serve(listen: tuple[str, int], relay_url: str | None, store: StoreOptions) -> None:
    """Run the CA until SIGINT or SIGTERM.

    Serves GET /ca.pem, GET /crl, POST /enrol (alias /enroll), POST /renew, OCSP (POST / and /ocsp, GET
    /ocsp/<request>), the admin API (/admin/...) and GET /healthz over HTTP, and with --relay
    publishes the CRL to the relay's feed on connect and whenever it changes: re-issued after
    2/3 of its lifetime, or by a revocation (from `kmsnet ca revoke` in another process too,
    noticed within a second). Prints the API's URL on stdout once it listens; logs go to stderr.
    """
    with node_failures():
        require_ca(store.home)
        passphrase = store.passphrase()
    logs.configure()
    with node_failures():
        pin = PinSource()
        asyncio.run(serve_ca(store.home, passphrase, http=listen, relay_url=relay_url, on_ready=click.echo, pin=pin))


@ca.command(
    epilog=_epilog(
        "kmsnet ca login --home ca                  # prompts for the code",
        "kmsnet ca login --home ca --admin carol --otp 123456",
    )
)
@click.option("--admin", envvar=ADMIN_ENV, default=FIRST_ADMIN, show_default=True, metavar="NAME", help="Who logs in.")
@click.option("--otp", envvar=OTP_ENV, metavar="CODE", help=f"The current TOTP code (else {OTP_ENV}, else a prompt).")
@store_options
@json_option
def login(admin: str, otp: str | None, store: StoreOptions, out: Output) -> None:
    """Open an admin session (15 minutes) for the later admin commands.

    The session is bound to the administrator's role at login and stored, sealed, in ca.db;
    a new login replaces it. Each code opens one session only, and five wrong codes within
    five minutes lock the administrator out for five minutes. Every attempt is audited.
    """
    with _open(store) as authority, node_failures():
        # The passphrase first, then the code: a code asked first could expire while the passphrase is typed.
        code = otp if otp is not None else _prompt_code(admin)
        if code is None:
            raise CliFailure(f"no TOTP code: give --otp, set {OTP_ENV}, or run in a terminal", USAGE)
        session = authority.login(admin, code, remember=True)
    expires = session.expires_at.isoformat(timespec="seconds")
    record: dict[str, object] = {"admin": session.admin, "role": session.role, "expires_at": expires}
    out.emit(record, f"admin session for {session.admin!r} (role {session.role}) until {expires}")


@ca.command(epilog=_epilog("kmsnet ca logout --home ca"))
@store_options
def logout(store: StoreOptions) -> None:
    """End the session `kmsnet ca login` opened (if any)."""
    with _open(store) as authority, node_failures():
        session = authority.remembered_session()
        if session is not None:
            authority.logout(session)
    click.echo("logged out" if session is not None else "no admin session was open")


@ca.command(
    epilog=_epilog(
        "kmsnet ca token --home ca alice",
        'kmsnet node init bob --home bob --token "$(kmsnet ca token --home ca bob --ttl 10m)" ...',
    )
)
@click.argument("name")
@click.option(
    "--ttl",
    default=_TTL_TEXT,
    show_default=True,
    callback=duration,
    metavar="DURATION",
    help="How long the token stays valid (90s, 30m, 12h, up to 7d).",
)
@admin_options
@store_options
@json_option
def token(name: str, ttl: timedelta, auth: AdminOptions, store: StoreOptions, out: Output) -> None:
    """Make a one-time enrolment token for node NAME (role operator or admin).

    Prints the token alone on stdout. It enrols NAME once (`kmsnet node init NAME --token ...`,
    or `kmsnet node rekey` after a compromise) before it expires; the CA keeps only its hash.
    Hand it to the node's operator over a channel you trust.
    """
    with _admin_action(store, auth) as (authority, session):
        issued = authority.token(name, ttl, session=session)
    record: dict[str, object] = {
        "name": issued.name,
        "token": issued.secret,
        "expires_at": issued.expires_at.isoformat(),
    }
    out.emit(record, issued.secret)


def _serial(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Click callback: a certificate serial in hex (as `ca list` prints it)."""
    if value is None:
        return None
    try:
        return int(value.removeprefix("0x"), 16)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a hexadecimal serial", ctx, param) from None


@ca.command(
    epilog=_epilog(
        "kmsnet ca revoke --home ca mallory --reason key-compromise",
        "kmsnet ca revoke --home ca --serial 5f3a9c0e12d4b7a1 --reason superseded",
    )
)
@click.argument("name", required=False)
@click.option("--serial", callback=_serial, metavar="HEX", help="Revoke this one certificate only.")
@click.option(
    "--reason",
    type=click.Choice(list(REASONS)),
    default="unspecified",
    show_default=True,
    help="The CRL reason code.",
)
@admin_options
@store_options
@json_option
def revoke(
    name: str | None, serial: int | None, reason: str, auth: AdminOptions, store: StoreOptions, out: Output
) -> None:
    """Revoke node NAME's certificates, or one certificate by --serial (role admin).

    Revokes every certificate issued for NAME's keys that could still back a session: the
    current one, the ones renewals replaced, and ones expired less than a day ago (a session
    lasts until its peer certificate's notAfter plus 5 minutes of clock skew; the day covers
    a slow clock). Each stays on the CRL until a day past its notAfter. A new CRL is issued at
    once; a running `kmsnet ca serve` publishes it to the relay within about a second, and
    the relay pushes it to every node. OCSP answers "revoked" from now on.
    """
    if name is None and serial is None:
        raise click.UsageError("give a node NAME or --serial")
    with _admin_action(store, auth) as (authority, session):
        revocation = authority.revoke(name, serial=serial, reason=reason, session=session)
        now = authority.clock()
    serials = [f"{c.serial:x}" for c in revocation.certificates]
    record: dict[str, object] = {
        "revoked": [c.to_json(now) for c in revocation.certificates],
        "crl_number": revocation.crl_number,
    }
    out.emit(record, f"revoked {', '.join(serials)} ({reason}); CRL {revocation.crl_number} issued")


def _status_text(record: IssuedCertificate, now: datetime) -> str:
    if record.revoked_at is not None:
        return f"revoked ({record.reason}, {record.revoked_at.isoformat(timespec='seconds')})"
    return record.status(now)


@ca.command("list", epilog=_epilog("kmsnet ca list --home ca", "kmsnet ca list --home ca --json | jq .status"))
@admin_options
@store_options
@json_option
def list_(auth: AdminOptions, store: StoreOptions, out: Output) -> None:
    """List the certificates this CA issued and their status (role auditor or admin).

    One per line, oldest first: serial, name, kind, notAfter, and valid, expired or
    revoked (reason, time).
    """
    with _admin_action(store, auth) as (authority, session):
        records = authority.list(session=session)
        now = authority.clock()
    for record in records:
        text = (
            f"{record.serial:016x}  {record.name:<24} {record.kind:<6} "
            f"{record.not_after.isoformat(timespec='seconds')}  {_status_text(record, now)}"
        )
        out.emit(record.to_json(now), text)


@ca.command(epilog=_epilog("kmsnet ca audit --home ca --verify", "kmsnet ca audit --home ca --json"))
@click.option(
    "--verify", is_flag=True, help="Check the hash chain, the signatures and the sealed head first (exit 4 if broken)."
)
@admin_options
@store_options
@json_option
def audit(verify: bool, auth: AdminOptions, store: StoreOptions, out: Output) -> None:
    """Print the CA's audit log (role auditor or admin).

    Every issuance, revocation, token, CRL, login, admin change and refused admin attempt,
    oldest first. Each entry is hash-chained to the previous one and signed by the root key;
    --verify checks all of it and names the first entry edited, removed or reordered.
    """
    with _admin_action(store, auth) as (authority, session):
        count = authority.verify_audit(session=session) if verify else None
        entries = authority.audit_entries(session=session)
    for entry in entries:
        fields = " ".join(f"{key}={value}" for key, value in sorted(entry.fields.items()))
        out.emit(entry.to_json(), f"{entry.seq:>6} {entry.time} {entry.actor} {entry.action} {fields}".rstrip())
    if count is not None:
        out.emit({"verified": count}, f"audit log verified: {count} entries, chained and signed by the CA root")


@ca.group(epilog=f"{CA_ENVIRONMENT_HELP}\n\n{EPILOG}")
def admin() -> None:
    """Administrators: add, list, remove (role admin).

    Roles: admin (everything), operator (enrolment tokens), auditor (the certificate list and
    the audit log). Each administrator has a TOTP secret, shown once when it is created.
    """


@admin.command(
    "add",
    epilog=_epilog(
        "kmsnet ca admin add --home ca carol --role operator", "kmsnet ca admin add --home ca dave --role auditor"
    ),
)
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), required=True, help="What the new administrator may do.")
@admin_options
@store_options
@json_option
def admin_add(name: str, role: str, auth: AdminOptions, store: StoreOptions, out: Output) -> None:
    """Create administrator NAME and print its TOTP provisioning URI (shown only now)."""
    with _admin_action(store, auth) as (authority, session):
        created = authority.add_admin(name, role, session=session)
    record: dict[str, object] = {"name": created.name, "role": created.role, "otpauth": created.otpauth}
    out.emit(record, created.otpauth)


@admin.command("list", epilog=_epilog("kmsnet ca admin list --home ca --json"))
@admin_options
@store_options
@json_option
def admin_list(auth: AdminOptions, store: StoreOptions, out: Output) -> None:
    """List the administrators and their roles."""
    with _admin_action(store, auth) as (authority, session):
        admins = authority.admins(session=session)
    for info in admins:
        locked = f"  locked until {info.locked_until.isoformat(timespec='seconds')}" if info.locked_until else ""
        out.emit(info.to_json(), f"{info.name:<24} {info.role}{locked}")


@admin.command("remove", epilog=_epilog("kmsnet ca admin remove --home ca carol"))
@click.argument("name")
@admin_options
@store_options
def admin_remove(name: str, auth: AdminOptions, store: StoreOptions) -> None:
    """Remove administrator NAME (its sessions end; the last admin-role administrator stays)."""
    with _admin_action(store, auth) as (authority, session):
        authority.remove_admin(name, session=session)
    click.echo(f"administrator {name!r} removed")


@ca.command(
    "relay-cert",
    epilog=_epilog(
        "kmsnet ca relay-cert --home ca --out-cert relay.pem --out-key relay.key",
        "kmsnet ca relay-cert --home ca --out-cert relay.pem --out-key relay.key --host relay.lab --host 10.0.0.5",
        "kmsnet relay --ca-cert ca/ca.pem --tls-cert relay.pem --tls-key relay.key",
    ),
)
@click.option("--out-cert", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Certificate file.")
@click.option("--out-key", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Key file (0600).")
@click.option(
    "--host",
    "hosts",
    multiple=True,
    default=("127.0.0.1",),
    show_default=True,
    help="DNS name or IP address the relay is reached at (repeat for several).",
)
@admin_options
@store_options
@json_option
def relay_cert(
    out_cert: Path, out_key: Path, hosts: tuple[str, ...], auth: AdminOptions, store: StoreOptions, out: Output
) -> None:
    """Issue the relay's TLS certificate and a new key for it (role admin).

    Writes a fresh ECDSA P-256 key to --out-key (mode 0600) and its certificate, signed by
    the CA for the --host names, to --out-cert; the relay serves wss:// with them and nodes
    check them against the root they pin. Existing files are never overwritten.
    """
    if out_cert.resolve() == out_key.resolve():
        raise click.UsageError("--out-cert and --out-key must be different files")
    for path in (out_cert, out_key):
        if path.exists():
            raise CliFailure(f"{path} exists: key and certificate files are never overwritten", BAD_INPUT)
    with _admin_action(store, auth) as (authority, session):
        cert, key_pem = authority.issue_relay_credentials(hosts, session=session)
        write_new_files([(out_key, key_pem, 0o600), (out_cert, certs.certificate_pem(cert), 0o644)])
    record: dict[str, object] = {
        "certificate": str(out_cert),
        "key": str(out_key),
        "hosts": list(hosts),
        "serial": f"{cert.serial_number:x}",
        "not_after": cert.not_valid_after_utc.isoformat(),
    }
    out.emit(record, f"relay certificate for {', '.join(hosts)} in {out_cert}, its key in {out_key}")
