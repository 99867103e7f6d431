"""Exit codes of the kmsnet command line (README, every --help epilog)."""

from __future__ import annotations

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
    "5 a scenario's outcome was not as asserted."
)


class CliFailure(click.ClickException):
    """One line on stderr and a documented exit code; never a traceback."""

    def __init__(self, message: str, code: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = code

    def show(self, file: object = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)
