"""The one error type for bad configuration, and the message for a value outside its choices.

Every start-up check in titan_cp raises :class:`ConfigError` with a message that
names the offending field (``section.field``) and a fix that works. It is a
``ValueError``, so callers that caught ``ValueError`` keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A job configuration problem, found at start-up; the message names the field and the fix."""


def suggest(word: Any, choices: Iterable[Any]) -> str:
    """`` Did you mean 'x'?`` for the closest choice (case-insensitive match first), else ``''``."""
    options = [str(c) for c in choices]
    same_case = [c for c in options if c.lower() == str(word).lower()]
    close = same_case or difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_choice_message(field: str, value: Any, choices: Iterable[Any]) -> str:
    """The error text for a config value outside its valid choices."""
    options = list(choices)
    return f"{field} = {str(value)!r} is not one of {sorted(map(str, options))}.{suggest(value, options)}"
