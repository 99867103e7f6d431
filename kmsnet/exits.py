"""Exit codes of the kmsnet command line (README, every --help epilog)."""

from __future__ import annotations

from dataclasses import dataclass

import click

OK = 0
BAD_INPUT = 1
USAGE = 2
UNREACHABLE = 3
TRUST = 4
SCENARIO_FAILED = 5

EPILOG = (
    "Exit codes: 0 ok, 1 bad input or state, 2 usage, 3 relay or CA unreachable / I/O, "
    "4 trust failure (revoked, stale feed, untrusted CA, bad signature, identity changed), "
    "5 a scenario's outcome was not as asserted, 130 interrupted (Ctrl-C). With --json an error is a JSON "
    "object on stderr."
)


INTERRUPTED = 130  # the shell's convention for a command ended by Ctrl-C (128 + SIGINT)

# The `code` of a `--json` error when the failure names none: one word per exit code.
CODE_NAMES = {
    BAD_INPUT: "bad_input",
    USAGE: "usage",
    UNREACHABLE: "unreachable",
    TRUST: "trust",
    SCENARIO_FAILED: "scenario_failed",
    INTERRUPTED: "interrupted",
}


def error_record(message: str, exit_code: int, code: str | None = None) -> dict[str, object]:
    """A failure as `--json` prints it: `{"type": "error", "code", "message", "exit"}`."""
    return {"type": "error", "code": code or CODE_NAMES.get(exit_code, "error"), "message": message, "exit": exit_code}


class CliFailure(click.ClickException):
    """One line on stderr and a documented exit code; never a traceback.

    `name` is the stable word a `--json` error carries as its `code` (default: one per exit code).
    """

    def __init__(self, message: str, code: int = BAD_INPUT, *, name: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = code
        self.name = name

    # click declares `exit_code` class-wide (a ClassVar) and mypy refuses to assign one per instance;
    # ours differs per failure, hence a property over an instance attribute.
    @property
    def exit_code(self) -> int:
        """The documented exit code this failure ends the command with."""
        return self._exit_code

    @exit_code.setter
    def exit_code(self, code: int) -> None:
        self._exit_code = code

    def record(self) -> dict[str, object]:
        """This failure as a `--json` error record."""
        return error_record(self.format_message(), self.exit_code, self.name)

    def show(self, file: object = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


@dataclass
class Invocation:
    """What one run of `kmsnet` learns that its error handler needs (click's `obj`, set by main)."""

    json_errors: bool = False


def json_errors(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """Click callback of every `--json` flag: from here on, a failure is printed as a JSON record."""
    invocation = ctx.find_object(Invocation)
    if value and invocation is not None:
        invocation.json_errors = True
    return value
