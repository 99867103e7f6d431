"""The `kmsnet` command line: parses arguments and calls the layers below, nothing more."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from kmsnet import __version__
from kmsnet.ca_cli import ca
from kmsnet.chat_cli import chat
from kmsnet.demo_cli import demo
from kmsnet.exits import EPILOG, USAGE, CliFailure
from kmsnet.kms_cli import kms
from kmsnet.messaging_cli import receive, send, status
from kmsnet.node_cli import node
from kmsnet.relay_cli import relay
from kmsnet.scenario_cli import scenario


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "KMSNET"})
@click.version_option(__version__, prog_name="kmsnet")
def cli() -> None:
    """kmsnet: a secure-messaging lab.

    End-to-end encrypted nodes, an untrusted relay, a CA with revocation,
    and scripted attacks that show what each defence stops.
    """


cli.add_command(kms)
cli.add_command(ca)
cli.add_command(node)
cli.add_command(relay)
cli.add_command(chat)
cli.add_command(demo)
cli.add_command(scenario)
for command in (send, receive, status):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code instead of raising SystemExit."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="kmsnet", standalone_mode=False)
    except CliFailure as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 1
    except click.UsageError as exc:
        exc.show()
        return USAGE
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
