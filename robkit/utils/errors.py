"""The base of every error a user can act on.

A :class:`RobkitError` carries a complete, actionable message (what was wrong, the value seen, what to
do). The command line prints it as one line and exits non-zero; anything else is a bug and keeps its
traceback. Each concrete error also derives from the builtin it refines (``ValueError``, ``KeyError``...),
so library callers can keep catching those.
"""

from __future__ import annotations

from typing import Any


class RobkitError(Exception):
    """An error caused by the input (a path, a file, a name, a setting), with a message that says what to do."""


class RecipeError(RobkitError, ValueError):
    """A recipe or a ``--set`` override names a field that does not exist, or holds a value it cannot take."""


class RunExistsError(RobkitError, FileExistsError):
    """The output folder already holds a run."""


class ResumeMismatch(RobkitError, ValueError):
    """``--resume`` was asked to continue a run under settings that differ from the stored ones."""


def leaf_diff(stored: Any, now: Any, path: str = "") -> list[str]:
    """``["optim.base_lr: 0.002 -> 0.004", ...]``: every leaf where two nested dicts differ, the
    "what changed" a :class:`ResumeMismatch` names.
    """
    if isinstance(stored, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(stored) | set(now), key=str):
            here = f"{path}.{k}" if path else str(k)
            if k not in stored:
                out.append(f"{here}: (absent) -> {now[k]!r}")
            elif k not in now:
                out.append(f"{here}: {stored[k]!r} -> (absent)")
            else:
                out += leaf_diff(stored[k], now[k], here)
        return out
    if isinstance(stored, (list, tuple)) and isinstance(now, (list, tuple)):
        stored, now = list(stored), list(now)
    return [] if stored == now else [f"{path}: {stored!r} -> {now!r}"]
