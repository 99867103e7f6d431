"""The tests, one room per package of the code (tests/<room>/), support code in tests/support/."""

import pytest

# Asserts in shared helpers explain themselves like asserts in test modules.
pytest.register_assert_rewrite("tests.support")
