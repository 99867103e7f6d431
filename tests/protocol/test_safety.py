"""Safety numbers (PROTOCOL.md §11): deterministic, order-independent, short, key-sensitive."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import LocalError
from protocol.safety import safety_number

KEY = st.binary(min_size=32, max_size=32)


def test_known_answer() -> None:
    a, b = bytes(range(32)), bytes(range(1, 33))
    assert safety_number(a, b) == "03770 31570 70632 00141 27846 21758 76725 05401"


@given(KEY, KEY)
def test_order_independent_and_readable(a: bytes, b: bytes) -> None:
    number = safety_number(a, b)
    assert number == safety_number(b, a)
    assert re.fullmatch(r"\d{5}( \d{5}){7}", number)


@given(KEY, KEY, st.integers(0, 255))
def test_any_changed_bit_changes_the_number(a: bytes, b: bytes, bit: int) -> None:
    flipped = bytearray(a)
    flipped[bit // 8] ^= 1 << (bit % 8)
    if bytes(flipped) != b:  # swapping the pair is the one change that must not show
        assert safety_number(bytes(flipped), b) != safety_number(a, b)


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33])
def test_refuses_keys_of_the_wrong_length(bad: bytes) -> None:
    with pytest.raises(LocalError):
        safety_number(bad, bytes(32))
