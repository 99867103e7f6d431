"""Passphrases for new keystores: a policy (length and a strength estimate, the CA root stricter), a
generated passphrase when the prompt is left empty (as age does), confirmation, and three tries.

The estimate is deliberately simple and conservative: the size of the character pools a passphrase
draws from, times the characters that are not a repeat or the next step of a run ("aaaa", "1234",
"abcd"), and nothing for a handful of passphrases everyone tries first. It refuses the weak ones a
person types in a hurry (`abc`, `password123`), not a well-chosen sentence.
"""

from __future__ import annotations

import math
import secrets
import string
from dataclasses import dataclass

import click

#: How many times a prompt asks before the command gives up.
TRIES = 3

#: Passphrases too common to count for anything, whatever their length.
_COMMON = {"password", "passphrase", "letmein", "qwerty", "qwertyuiop", "iloveyou", "kmsnet", "changeme", "secret"}

#: Letters and digits without the easily confused ones, for generated passphrases: 32 symbols, 5 bits each.
_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


@dataclass(frozen=True)
class Policy:
    """What a new keystore's passphrase must reach."""

    what: str  # what the passphrase protects, for the prompt
    min_length: int
    min_bits: float


NODE = Policy("keystore", min_length=12, min_bits=50)
CA_ROOT = Policy("CA root key", min_length=16, min_bits=70)


def strength_bits(passphrase: str) -> float:
    """A conservative estimate of a passphrase's strength in bits (see the module docstring)."""
    if passphrase.lower().rstrip(string.digits + string.punctuation) in _COMMON:
        return 0.0
    pools = [
        (string.ascii_lowercase, 26),
        (string.ascii_uppercase, 26),
        (string.digits, 10),
        (" ", 1),
    ]
    size = sum(n for chars, n in pools if any(c in chars for c in passphrase))
    if any(not (c.isascii() and (c.isalnum() or c == " ")) for c in passphrase):
        size += 33  # punctuation, or letters beyond ASCII
    counted = sum(
        1 for previous, c in zip(" " + passphrase, passphrase, strict=False) if abs(ord(c) - ord(previous)) > 1
    )
    return counted * math.log2(max(size, 2))


def weakness(passphrase: str, policy: Policy) -> str | None:
    """Why `passphrase` does not meet `policy`, in words; None when it does."""
    if len(passphrase) < policy.min_length:
        return f"it is {len(passphrase)} characters long; a {policy.what} passphrase needs {policy.min_length} or more"
    if strength_bits(passphrase) < policy.min_bits:
        return "it is too easy to guess (repeats, runs or a common word): try a few unrelated words"
    return None


def generate() -> str:
    """A new passphrase: six groups of five letters and digits, about 150 bits."""
    return "-".join("".join(secrets.choice(_ALPHABET) for _ in range(5)) for _ in range(6))


def ask_new(policy: Policy) -> str:
    """Ask for a new passphrase on the terminal, twice, up to TRIES times; an empty answer takes a
    generated one, shown once. Raises click.Abort-like CLI failures through the caller."""
    for attempt in range(1, TRIES + 1):
        entered: str = click.prompt(
            f"New {policy.what} passphrase (empty: generate one)",
            hide_input=True,
            default="",
            show_default=False,
            err=True,
        )
        if not entered:
            made = generate()
            click.echo(f"Using a generated passphrase; write it down, it is not shown again:\n  {made}", err=True)
            return made
        why = weakness(entered, policy)
        if why is None:
            again: str = click.prompt("Repeat it", hide_input=True, err=True)
            if secrets.compare_digest(again.encode(), entered.encode()):
                return entered
            why = "the two entries differ"
        left = TRIES - attempt
        more = f" {left} more {'try' if left == 1 else 'tries'}." if left else ""
        click.echo(f"Not this one: {why}.{more}", err=True)
    raise PassphraseRefused(f"no acceptable {policy.what} passphrase after {TRIES} tries")


class PassphraseRefused(Exception):
    """Every try at a prompt failed (a weak or mismatched new passphrase, or a wrong one)."""
