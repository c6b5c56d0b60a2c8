"""One error type for bad user input, raised before any expensive work starts."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """Bad user input: the message names the field, the bad value and what is allowed."""


# Long or usual names of things lit_moral spells shortly: only used to suggest the right spelling.
ALIASES = {"tit_for_tat": "tft", "titfortat": "tft", "tit-for-tat": "tft", "grim": "grim_trigger",
           "wsls": "pavlov", "win_stay_lose_shift": "pavlov", "cooperate": "always_cooperate",
           "defect": "always_defect", "always_c": "always_cooperate", "always_d": "always_defect",
           "selfish": "game", "prisoners_dilemma": "IPD", "stag_hunt": "ISH", "chicken": "ICN",
           "deontology": "deontological", "utilitarianism": "utilitarian", "self_play": "llm", "selfplay": "llm"}


def suggest(value: str, allowed: list[str]) -> str | None:
    """The allowed value a user most likely meant: a known alias, a close spelling, or the one containing it."""
    key = value.lower().replace(" ", "_")
    if ALIASES.get(key) in allowed:
        return ALIASES[key]
    close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6) or difflib.get_close_matches(
        key, [a.lower() for a in allowed], n=1, cutoff=0.6)
    if close:
        return next(a for a in allowed if a.lower() == close[0].lower())
    containing = [a for a in allowed if key and (key in a.lower() or a.lower() in key)]
    return containing[0] if len(containing) == 1 else None


def check_choice(field: str, value: object, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ConfigError naming the field (and the allowed
    value it most likely meant)."""
    allowed = list(allowed)
    if not isinstance(value, str) or value not in allowed:
        hint = suggest(str(value), allowed)
        did_you_mean = f" (did you mean {hint!r}?)" if hint else ""
        raise ConfigError(f"{field}: unknown value {value!r}{did_you_mean}; allowed: {', '.join(allowed)}")
    return value


def check_positive(field: str, value: object, *, allow_zero: bool = False) -> None:
    """Raise a ConfigError unless ``value`` is a positive (or, with allow_zero, non-negative) number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        need = "a number >= 0" if allow_zero else "a number > 0"
        raise ConfigError(f"{field}: got {value!r}; must be {need}")
