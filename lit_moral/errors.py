"""One error type for bad user input, raised before any expensive work starts."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """Bad user input: the message names the field, the bad value and what is allowed."""


def check_choice(field: str, value: object, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ConfigError naming the field."""
    allowed = list(allowed)
    if not isinstance(value, str) or value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{field}: unknown value {value!r}{did_you_mean}; allowed: {', '.join(allowed)}")
    return value


def check_positive(field: str, value: object, *, allow_zero: bool = False) -> None:
    """Raise a ConfigError unless ``value`` is a positive (or, with allow_zero, non-negative) number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        need = "a number >= 0" if allow_zero else "a number > 0"
        raise ConfigError(f"{field}: got {value!r}; must be {need}")
