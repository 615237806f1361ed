"""Did-you-mean suggestions for misspelt names (recipes, students, teachers, keys)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(name: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.5) -> list[str]:
    """Up to ``n`` of ``choices`` that look like ``name`` (difflib's ratio >= ``cutoff``), best first."""
    return difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=cutoff)


def did_you_mean(name: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.5) -> str:
    """``" Did you mean 'a' or 'b'?"`` (with its leading space), or ``""`` when nothing is close."""
    close = close_matches(name, choices, n=n, cutoff=cutoff)
    if not close:
        return ""
    quoted = [repr(c) for c in close]
    joined = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f" Did you mean {joined}?"
