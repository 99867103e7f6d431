"""Command-line options for keys in a PKCS#11 token: `--pkcs11 MODULE --token LABEL`, and the PIN.

The PIN is never an argument (argv is visible to every user of the machine): it comes from
`--pin-file` (init commands) or KMSNET_PKCS11_PIN_FILE, else KMSNET_PKCS11_PIN, else a prompt on
the terminal. It is read only when a token is actually opened, so commands on a file-backed home
never ask for one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from kmsnet.exits import BAD_INPUT, UNREACHABLE, USAGE, CliFailure
from kmsnet.options import _have_terminal
from node.pkcs11 import PIN_ENV, PIN_FILE_ENV, TokenSlot, environment_pin

F = TypeVar("F", bound=Callable[..., Any])

PKCS11_ENVIRONMENT_HELP = (
    f"A home whose keys are in a PKCS#11 token asks for the token's PIN: {PIN_FILE_ENV} (a file holding it), "
    f"{PIN_ENV} (the PIN), else a prompt; never on the command line."
)


@dataclass
class PinSource:
    """Where the PIN comes from; calling it reads the PIN (`node.pkcs11.Pin` accepts it as is), once:
    a command that opens the token twice (the keystore, then a key) asks once."""

    file: Path | None = None
    _pin: str | None = field(default=None, init=False, repr=False)

    def __call__(self) -> str:
        """The PIN from the file, KMSNET_PKCS11_PIN_FILE, KMSNET_PKCS11_PIN or a prompt (in that order)."""
        if self._pin is None:
            self._pin = self._read()
        return self._pin

    def _read(self) -> str:
        if self.file is not None:
            try:
                pin = self.file.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
            except (OSError, UnicodeDecodeError) as exc:
                raise CliFailure(f"cannot read the PIN file {self.file}", UNREACHABLE) from exc
        else:
            pin = environment_pin()
            if not pin and not _have_terminal():
                raise CliFailure(f"no token PIN: set {PIN_ENV} or {PIN_FILE_ENV}, or run in a terminal", USAGE)
            if not pin:
                pin = click.prompt("PKCS#11 token PIN", hide_input=True, err=True)
        if not pin:
            raise CliFailure("the token PIN is empty", BAD_INPUT)
        return pin


def token_options(label_flag: str = "--token") -> Callable[[F], F]:
    """Add --pkcs11, `label_flag` (the token's label) and --pin-file; pass them on as
    `key_token: TokenSlot | None` and `pin: PinSource`. (`node init` has a --token already: the
    enrolment token; there the label is --pkcs11-token.)"""

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(
            *args: Any, pkcs11: str | None, pkcs11_label: str | None, pin_file: Path | None, **kwargs: Any
        ) -> Any:
            if (pkcs11 is None) != (pkcs11_label is None):
                raise click.UsageError(f"--pkcs11 and {label_flag} go together")
            slot = None if pkcs11 is None or pkcs11_label is None else TokenSlot(pkcs11, pkcs11_label)
            return command(*args, key_token=slot, pin=PinSource(pin_file), **kwargs)

        options = [
            click.option(
                "--pkcs11",
                metavar="MODULE",
                type=click.Path(exists=True, dir_okay=False),
                help="Generate the key(s) in a PKCS#11 token: its module (e.g. /usr/lib/softhsm/libsofthsm2.so).",
            ),
            click.option(
                label_flag, "pkcs11_label", metavar="LABEL", help="The PKCS#11 token's label (with --pkcs11)."
            ),
            click.option(
                "--pin-file",
                envvar=PIN_FILE_ENV,
                type=click.Path(exists=True, dir_okay=False, path_type=Path),
                help=f"Read the token PIN from this file (else {PIN_ENV}, else a prompt). Env: {PIN_FILE_ENV}.",
            ),
        ]
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorate
