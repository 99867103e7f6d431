"""`kmsnet unlock`, `kmsnet lock` and `kmsnet profiles`: where a node's state lives, and typing its
passphrase once for a while (kmsnet/unlock.py says what is kept, and where)."""

from __future__ import annotations

from datetime import timedelta

import click

from kmsnet import unlock as unlocking
from kmsnet.exits import BAD_INPUT, EPILOG, CliFailure
from kmsnet.options import (
    ENVIRONMENT_HELP,
    Output,
    StoreOptions,
    duration,
    json_option,
    node_failures,
    profile_home,
    store_options,
)
from node.clock import utcnow


@click.command(
    epilog="\b\nExamples:\n"
    "  kmsnet unlock --profile alice            # 15 minutes\n"
    "  kmsnet unlock --home ca --for 1h\n\n" + f"{ENVIRONMENT_HELP}\n\n{EPILOG}"
)
@click.option(
    "--for",
    "lifetime",
    default="15m",
    show_default=True,
    callback=duration,
    metavar="DURATION",
    help=f"How long the keys are kept (at most {unlocking.MAX_LIFETIME.total_seconds() / 3600:.0f}h).",
)
@store_options
@json_option
def unlock(lifetime: timedelta, store: StoreOptions, out: Output) -> None:
    """Ask for the passphrase once; the next commands on this home need none until it expires.

    Keeps each keystore's derived key (never the passphrase) sealed in HOME/.unlocked under a
    secret that lives in the per-login runtime directory; `kmsnet lock` forgets it at once.
    """
    with node_failures():
        try:
            expires = store.open_with(lambda p: unlocking.unlock(store.home, p, lifetime, utcnow()))
        except unlocking.UnlockError as exc:
            raise CliFailure(str(exc), BAD_INPUT) from exc
    when = expires.isoformat(timespec="seconds").replace("+00:00", "Z")
    out.emit({"home": str(store.home), "expires_at": when}, f"unlocked {store.home} until {when}")


@click.command(epilog="\b\nExamples:\n  kmsnet lock --profile alice\n\n" + EPILOG)
@store_options
@json_option
def lock(store: StoreOptions, out: Output) -> None:
    """Forget what `kmsnet unlock` kept for this home, now."""
    was = unlocking.lock(store.home)
    out.emit({"home": str(store.home), "was_unlocked": was}, f"locked {store.home}" if was else "it was not unlocked")


@click.command(epilog="\b\nExamples:\n  kmsnet profiles\n  kmsnet profiles --json\n\n" + EPILOG)
@json_option
def profiles(out: Output) -> None:
    """The named profiles (homes in your user data directory) and where they are."""
    root = profile_home("default").parent
    found = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not found and not out.as_json:
        click.echo(f"no profiles yet in {root} (`kmsnet node init NAME --profile NAME` makes one)")
    for home in found:
        out.emit({"profile": home.name, "home": str(home)}, f"{home.name:<16} {home}")
