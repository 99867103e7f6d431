"""The `kmsnet` command line: parses arguments and calls the layers below, nothing more."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import click
from click.shell_completion import get_completion_class

from kmsnet import __version__
from kmsnet.ca_cli import ca
from kmsnet.cert_cli import cert
from kmsnet.chat_cli import chat
from kmsnet.demo_cli import demo
from kmsnet.exits import BAD_INPUT, EPILOG, INTERRUPTED, OK, USAGE, CliFailure, Invocation
from kmsnet.history_cli import history
from kmsnet.home_cli import lock, profiles, unlock
from kmsnet.kms_cli import kms
from kmsnet.messaging_cli import receive, send, status
from kmsnet.node_cli import node
from kmsnet.relay_cli import relay
from kmsnet.scenario_cli import scenario
from kmsnet.trust_cli import trust

COMPLETION_EXAMPLES = """
Examples:

\b
  echo 'eval "$(kmsnet completion bash)"' >> ~/.bashrc
  echo 'eval "$(kmsnet completion zsh)"' >> ~/.zshrc
  kmsnet completion fish > ~/.config/fish/completions/kmsnet.fish
"""


class ClosedPipe(Exception):
    """Whoever read stdout closed it; raised past click, whose own handling of it exits 1."""


class Kmsnet(click.Group):
    """The root group: lets a closed stdout reach `main` (to end quietly) instead of click's exit 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            raise ClosedPipe from exc


@click.group(
    cls=Kmsnet,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "KMSNET"},
)
@click.version_option(__version__, prog_name="kmsnet")
def cli() -> None:
    """kmsnet: a secure-messaging lab.

    End-to-end encrypted nodes, an untrusted relay, a CA with revocation,
    and scripted attacks that show what each defence stops.
    """


@cli.command(epilog=COMPLETION_EXAMPLES + "\n" + EPILOG)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (bash, zsh or fish).

    Completes commands, options and choices (click's completion); load it from your shell's
    start-up file as the examples show.
    """
    complete = get_completion_class(shell)
    if complete is None:  # click ships all three; a Choice keeps out the rest
        raise CliFailure(f"no completion for {shell}", USAGE)
    click.echo(complete(cli, {}, "kmsnet", "_KMSNET_COMPLETE").source())


cli.add_command(kms)
cli.add_command(ca)
cli.add_command(node)
cli.add_command(cert)
cli.add_command(relay)
cli.add_command(chat)
cli.add_command(demo)
cli.add_command(scenario)
for command in (send, receive, status, history, trust, unlock, lock, profiles):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code instead of raising SystemExit.

    Every failure ends here as one line on stderr (a JSON record once `--json` was parsed) with
    its documented exit code; Ctrl-C exits 130, also at a prompt; a reader that closed the pipe
    (`kmsnet kms audit | head`) ends the command quietly with 0.
    """
    invocation = Invocation()
    try:
        cli.main(
            args=list(argv) if argv is not None else None, prog_name="kmsnet", standalone_mode=False, obj=invocation
        )
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt, click.ClickException, ClosedPipe) as exc:
        if _closed_pipe(exc):
            _silence_stdout()
            return OK
        failure = _failure(exc)
        if invocation.json_errors:
            click.echo(json.dumps(failure.record(), sort_keys=True), err=True)
        elif isinstance(exc, click.UsageError):
            exc.show()  # the usage line, then the error
        else:
            failure.show()
        return failure.exit_code
    return OK


def _failure(exc: BaseException) -> CliFailure:
    """Any way a command can fail, as a CliFailure with its exit code and `--json` code."""
    if isinstance(exc, CliFailure):
        return exc
    if isinstance(exc, KeyboardInterrupt) or isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
        return CliFailure("interrupted", INTERRUPTED)
    if isinstance(exc, click.exceptions.Abort):
        why = "no answer at the prompt (end of input): " if isinstance(exc.__context__, EOFError) else ""
        return CliFailure(f"{why}aborted", BAD_INPUT, name="aborted")
    if isinstance(exc, click.UsageError):
        return CliFailure(exc.format_message(), USAGE)
    if isinstance(exc, click.ClickException):
        return CliFailure(exc.format_message(), exc.exit_code)
    raise AssertionError(exc)


def _closed_pipe(exc: BaseException) -> bool:
    """Whether the failure is only that whoever read our stdout stopped reading."""
    return isinstance(exc, ClosedPipe) or isinstance(exc.__cause__, BrokenPipeError)


def _silence_stdout() -> None:
    # Python flushes stdout at exit: into a closed pipe that would print "Exception ignored ...".
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
