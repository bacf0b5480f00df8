"""The shared integer check: what it accepts and what its error says."""

from __future__ import annotations

import pytest

from frostline.core.checks import require_int


@pytest.mark.parametrize("value", [True, 1.0, "2", None, -1])
def test_require_int_refuses_and_names_the_value(value) -> None:
    with pytest.raises(ValueError, match=rf"^steps must be an int >= 0, got {value!r}$"):
        require_int("steps", value)


def test_require_int_returns_the_value_at_or_above_the_minimum() -> None:
    assert require_int("n", 0) == 0
    assert require_int("n", 1, minimum=1) == 1
    with pytest.raises(ValueError, match=">= 1, got 0"):
        require_int("n", 0, minimum=1)
