"""Exceptions and warnings raised by :mod:`softprompt.tasks`."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class TaskError(Exception):
    """Base class of every error raised by :mod:`softprompt.tasks`."""


class UnknownTaskError(TaskError, ValueError):
    """A task name that is not in the registry.

    Attributes:
        name: the name that was asked for.
        suggestions: close matches among the registered names (may be empty).
    """

    def __init__(self, name: str, suggestions: Sequence[str] = (), known: Sequence[str] = ()) -> None:
        self.name = name
        self.suggestions = list(suggestions)
        msg = f"unknown task {name!r}"
        if self.suggestions:
            msg += "; did you mean " + ", ".join(repr(s) for s in self.suggestions) + "?"
        elif known:
            msg += "; known tasks: " + ", ".join(known)
        super().__init__(msg)


class UnknownSplitError(TaskError, ValueError):
    """A split name that the task does not have."""

    def __init__(self, task: str, split: str, available: Sequence[str]) -> None:
        self.task = task
        self.split = split
        self.available = list(available)
        super().__init__(f"task {task!r} has no split {split!r}; available splits: {', '.join(available)}")


class MalformedRowError(TaskError, ValueError):
    """A row of a data file that cannot be parsed (raised with ``strict=True``).

    Attributes:
        path: the file.
        line: 1-based line number (for JSON-array files: 1-based item number, see ``unit``).
        problem: what is wrong with the row.
        unit: ``"line"`` or ``"item"``.
    """

    def __init__(self, path: str | Path, line: int, problem: str, unit: str = "line") -> None:
        self.path = str(path)
        self.line = int(line)
        self.problem = problem
        self.unit = unit
        super().__init__(f"{self.path}, {unit} {self.line}: {problem}")


class MalformedRowWarning(UserWarning):
    """Emitted (once per load) when malformed rows were skipped."""


class MissingColumnError(TaskError, ValueError):
    """A column asked for (e.g. ``text_column``) is not in a user's file."""

    def __init__(self, path: str | Path, column: str, role: str, available: Sequence[str]) -> None:
        self.path = str(path)
        self.column = column
        self.role = role
        self.available = list(available)
        super().__init__(
            f"{self.path}: {role} {column!r} not found; available columns: "
            + (", ".join(repr(c) for c in self.available) if self.available else "(none)")
        )


class LabelError(TaskError, ValueError):
    """The labels of a user's file cannot make a task: mixed kinds of values, or fewer than two classes."""


class NoDataError(TaskError, ValueError):
    """A data file without a single usable example (only a header, or every row malformed)."""


class DataNotFoundError(TaskError, FileNotFoundError):
    """A data directory or data file that does not exist."""


class HubUnavailableError(TaskError, RuntimeError):
    """Loading from the Hugging Face Hub is impossible (``datasets`` missing, offline, no such split)."""
