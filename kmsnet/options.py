"""Options and helpers shared by kmsnet commands: --home, the passphrase, --json, input, errors.

Any command that opens a node's keystore takes `@store_options` and receives one `store:
StoreOptions` argument; `@json_option` adds `--json` and an `out: Output` argument. Secrets never
come from argv: the passphrase is read from `--passphrase-file`, else `KMSNET_PASSPHRASE`, else
what `kmsnet unlock` keeps for the home, else a prompt on the terminal.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import platformdirs

from kmsnet import passphrases, unlock
from kmsnet.exits import BAD_INPUT, TRUST, UNREACHABLE, USAGE, CliFailure, json_errors
from node.clock import utcnow
from node.errors import NodeError, TrustError, Unavailable, WrongPassphrase, code_of, network_words
from node.keystore import ARGON2_PROFILES, Argon2Params

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

PASSPHRASE_ENV = "KMSNET_PASSPHRASE"  # noqa: S105 - the variable's name, not a passphrase

ENVIRONMENT_HELP = (
    "Environment: KMSNET_HOME (instead of --home), KMSNET_PROFILE (instead of --profile), "
    "KMSNET_PASSPHRASE (the keystore passphrase), "
    "KMSNET_PASSPHRASE_FILE, KMSNET_ARGON2_PROFILE=test (cheap key derivation for new keystores in test "
    "suites; never for real keys)."
)


@dataclass(frozen=True)
class StoreOptions:
    """Where the keystore is and how to unlock it, as given on the command line."""

    home: Path
    passphrase_file: Path | None
    argon2_profile: str

    @property
    def argon2(self) -> Argon2Params:
        """Argon2id cost for a keystore created now (existing keystores keep their own)."""
        return ARGON2_PROFILES[self.argon2_profile]

    def passphrase(self, *, confirm: bool = False, policy: passphrases.Policy = passphrases.NODE) -> str:
        """The passphrase from --passphrase-file, KMSNET_PASSPHRASE or a prompt.

        `confirm` is for a new keystore: at a prompt it is asked twice and must meet `policy` (an
        empty answer takes a generated passphrase), three tries in all; from a file or the
        environment a weak one is taken with a warning (scripts and test suites choose their own).
        """
        if self.passphrase_file is not None:
            try:
                text = self.passphrase_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CliFailure(f"cannot read passphrase file {self.passphrase_file}: {exc}", UNREACHABLE) from exc
            # One trailing newline is the file's, not the passphrase's.
            passphrase = text.removesuffix("\n").removesuffix("\r")
        elif PASSPHRASE_ENV in os.environ:
            passphrase = os.environ[PASSPHRASE_ENV]
        elif not confirm and (held := unlock.unlocked(self.home, utcnow())) is not None:
            return held  # `kmsnet unlock` holds this home's keys: no prompt
        elif _have_terminal():
            if not confirm:
                return str(click.prompt("Keystore passphrase", hide_input=True, err=True))
            try:
                return passphrases.ask_new(policy)
            except passphrases.PassphraseRefused as exc:
                raise CliFailure(str(exc), BAD_INPUT) from exc
        else:
            raise CliFailure(
                f"no passphrase: set {PASSPHRASE_ENV}, pass --passphrase-file, or run in a terminal", USAGE
            )
        if not passphrase:
            raise CliFailure("the passphrase is empty", BAD_INPUT)
        weak = passphrases.weakness(passphrase, policy) if confirm else None
        if weak is not None:
            Output.warn(f"a weak passphrase for a new {policy.what}: {weak}")
        return passphrase

    def open_with(self, opener: Callable[[str], T]) -> T:
        """`opener(passphrase)`, asking again when a passphrase typed at the prompt is wrong (three
        tries in all; a wrong one from a file or the environment fails at once)."""
        prompted = self.passphrase_file is None and PASSPHRASE_ENV not in os.environ
        tries = 1
        while True:
            try:
                return opener(self.passphrase())
            except WrongPassphrase:
                if prompted and unlock.lock(self.home):
                    continue  # the keystore changed since `kmsnet unlock`: forget it, ask for the passphrase
                if not prompted or tries == passphrases.TRIES:
                    raise
                tries += 1
                click.echo("Wrong passphrase, try again.", err=True)


def _have_terminal() -> bool:
    # The prompt reads /dev/tty, so that data piped on stdin is not taken for the passphrase.
    try:
        fd = os.open("/dev/tty", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


DEFAULT_PROFILE = "default"
_PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def profile_home(profile: str) -> Path:
    """A named profile's home: the per-user data directory (platformdirs; on Linux
    $XDG_DATA_HOME/kmsnet, by default ~/.local/share/kmsnet), then profiles/NAME."""
    return platformdirs.user_data_path("kmsnet", appauthor=False) / "profiles" / profile


def _home(home: Path | None, profile: str | None) -> Path:
    """--home if given, else --profile's home; a --home and a --profile both on the command line
    contradict each other, but a flag beats the other one's environment variable."""
    ctx = click.get_current_context()
    given = {name: ctx.get_parameter_source(name) for name in ("home", "profile")}
    on_line = click.core.ParameterSource.COMMANDLINE
    if home is not None and profile is not None:
        if given["home"] == on_line == given["profile"]:
            raise click.UsageError("give --home or --profile, not both")
        if given["profile"] == on_line:
            home = None
    if home is not None:
        return home
    name = profile or DEFAULT_PROFILE
    if not _PROFILE_NAME.fullmatch(name):
        raise click.BadParameter(f"{name!r} is not a profile name (1-64 of a-z 0-9 . _ -)", ctx, param_hint="--profile")
    return profile_home(name)


def store_options(command: F) -> F:
    """Add --home, --profile, --passphrase-file and --argon2-profile; pass them on as `store: StoreOptions`."""

    @functools.wraps(command)
    def wrapper(
        *args: Any, home: Path | None, profile: str | None, passphrase_file: Path | None, argon2_profile: str, **kw: Any
    ) -> Any:
        return command(*args, store=StoreOptions(_home(home, profile), passphrase_file, argon2_profile), **kw)

    options = [
        click.option(
            "--home",
            envvar="KMSNET_HOME",
            type=click.Path(file_okay=False, path_type=Path),
            help="State directory (the keystore is HOME/keystore.db). Env: KMSNET_HOME. Default: the profile's.",
        ),
        click.option(
            "--profile",
            envvar="KMSNET_PROFILE",
            metavar="NAME",
            help=f"Use the named profile's home in your user data directory ({DEFAULT_PROFILE!r} when neither "
            "--home nor --profile is given; `kmsnet profiles` lists them). Env: KMSNET_PROFILE.",
        ),
        click.option(
            "--passphrase-file",
            envvar="KMSNET_PASSPHRASE_FILE",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Read the keystore passphrase from this file (else KMSNET_PASSPHRASE, else a prompt).",
        ),
        click.option(
            "--argon2-profile",
            envvar="KMSNET_ARGON2_PROFILE",
            type=click.Choice(sorted(ARGON2_PROFILES)),
            default="interactive",
            show_default=True,
            help="Key-derivation cost for a NEW keystore; 'test' is fast and weak, for test suites only.",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


class Output:
    """Print results as text for people, or as one JSON object per line with --json."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, record: dict[str, object], text: str) -> None:
        """Print `record` (with --json) or `text`."""
        click.echo(json.dumps(record, sort_keys=True) if self.as_json else text)

    @staticmethod
    def warn(message: str) -> None:
        """One warning line on stderr (never on stdout, which scripts read)."""
        click.echo(f"warning: {message}", err=True)


def json_option(command: F) -> F:
    """Add --json; pass on `out: Output`."""

    @functools.wraps(command)
    def wrapper(*args: Any, as_json: bool, **kwargs: Any) -> Any:
        return command(*args, out=Output(as_json), **kwargs)

    return json_flag()(wrapper)  # type: ignore[return-value]


def json_flag(help: str = "Print one JSON object per line.") -> Callable[[F], F]:
    """The `--json` flag as `as_json: bool`; from the moment it is parsed, errors are JSON too."""
    return click.option("--json", "as_json", is_flag=True, is_eager=True, callback=json_errors, help=help)


def read_input(value: str | None) -> bytes:
    """The argument's bytes, or all of stdin when the argument is '-' or left out."""
    if value is None or value == "-":
        return sys.stdin.buffer.read()
    return value.encode("utf-8")


_DURATION = re.compile(r"(?P<count>[1-9][0-9]*)(?P<unit>[smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def duration(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    """Click callback: parse a duration such as 90s, 30m, 12h, 30d or 2w (None stays None)."""
    if value is None:
        return None
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise click.BadParameter(f"{value!r} is not a duration like 90s, 30m, 12h, 30d or 2w", ctx, param)
    return timedelta(**{_UNITS[match["unit"]]: int(match["count"])})


@contextlib.contextmanager
def node_failures() -> Iterator[None]:
    """Turn node errors into one-line failures with the documented exit codes.

    Trust failures (tampered input, bad signature, compromised key) exit 4; storage, relay and
    I/O failures exit 3; any other refusal (unknown key, wrong passphrase, wrong state) exits 1.
    """
    try:
        yield
    except TrustError as exc:
        raise CliFailure(str(exc), TRUST, name=code_of(exc)) from exc
    except Unavailable as exc:
        raise CliFailure(str(exc), UNREACHABLE, name=code_of(exc)) from exc
    except NodeError as exc:
        raise CliFailure(str(exc), BAD_INPUT, name=code_of(exc)) from exc
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise CliFailure(f"{where}{network_words(exc)}", UNREACHABLE, name="io_error") from exc
