"""Options and helpers shared by kmsnet commands: --home, the passphrase, --json, input, errors.

Any command that opens a node's keystore takes `@store_options` and receives one `store:
StoreOptions` argument; `@json_option` adds `--json` and an `out: Output` argument. Secrets never
come from argv: the passphrase is read from `--passphrase-file`, else `KMSNET_PASSPHRASE`, else
a prompt on the terminal.
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

from kmsnet.exits import BAD_INPUT, TRUST, UNREACHABLE, USAGE, CliFailure, json_errors
from node.errors import NodeError, TrustError, Unavailable, code_of, network_words
from node.keystore import ARGON2_PROFILES, Argon2Params

F = TypeVar("F", bound=Callable[..., Any])

PASSPHRASE_ENV = "KMSNET_PASSPHRASE"  # noqa: S105 - the variable's name, not a passphrase

ENVIRONMENT_HELP = (
    "Environment: KMSNET_HOME (instead of --home), KMSNET_PASSPHRASE (the keystore passphrase), "
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

    def passphrase(self, *, confirm: bool = False) -> str:
        """The passphrase from --passphrase-file, KMSNET_PASSPHRASE or a prompt (twice when `confirm`)."""
        if self.passphrase_file is not None:
            try:
                text = self.passphrase_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CliFailure(f"cannot read passphrase file {self.passphrase_file}: {exc}", UNREACHABLE) from exc
            # One trailing newline is the file's, not the passphrase's.
            passphrase = text.removesuffix("\n").removesuffix("\r")
        elif PASSPHRASE_ENV in os.environ:
            passphrase = os.environ[PASSPHRASE_ENV]
        elif _have_terminal():
            passphrase = click.prompt("Keystore passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
        else:
            raise CliFailure(
                f"no passphrase: set {PASSPHRASE_ENV}, pass --passphrase-file, or run in a terminal", USAGE
            )
        if not passphrase:
            raise CliFailure("the passphrase is empty", BAD_INPUT)
        return passphrase


def _have_terminal() -> bool:
    # The prompt reads /dev/tty, so that data piped on stdin is not taken for the passphrase.
    try:
        fd = os.open("/dev/tty", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def store_options(command: F) -> F:
    """Add --home, --passphrase-file and --argon2-profile; pass them on as `store: StoreOptions`."""

    @functools.wraps(command)
    def wrapper(*args: Any, home: Path, passphrase_file: Path | None, argon2_profile: str, **kwargs: Any) -> Any:
        return command(*args, store=StoreOptions(home, passphrase_file, argon2_profile), **kwargs)

    options = [
        click.option(
            "--home",
            envvar="KMSNET_HOME",
            required=True,
            type=click.Path(file_okay=False, path_type=Path),
            help="State directory (the keystore is HOME/keystore.db). Env: KMSNET_HOME.",
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
