"""`kmsnet kms ...`: the seed's key-management system on the command line."""

from __future__ import annotations

import click

from kmsnet.exits import EPILOG


@click.group(epilog=EPILOG)
def kms() -> None:
    """The seed's KeyManagementSystem: versioned keys, rotation, rewrap, states, signatures."""
