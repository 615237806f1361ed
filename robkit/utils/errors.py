"""The base of every error a user can act on.

A :class:`RobkitError` carries a complete, actionable message (what was wrong, the value seen, what to
do). The command line prints it as one line and exits non-zero; anything else is a bug and keeps its
traceback. Each concrete error also derives from the builtin it refines (``ValueError``, ``KeyError``...),
so library callers can keep catching those.
"""

from __future__ import annotations


class RobkitError(Exception):
    """An error caused by the input (a path, a file, a name, a setting), with a message that says what to do."""


class RecipeError(RobkitError, ValueError):
    """A recipe or a ``--set`` override names a field that does not exist, or holds a value it cannot take."""


class RunExistsError(RobkitError, FileExistsError):
    """The output folder already holds a run."""


class ResumeMismatch(RobkitError, ValueError):
    """``--resume`` was asked to continue a run under settings that differ from the stored ones."""
