"""The :class:`TaskSpec` record describing one registered task."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("classification", "regression", "multiple_choice", "token_classification")


@dataclass(frozen=True)
class SplitDerivation:
    """How derived splits are cut from one source split (deterministic, seeded).

    Each source record ``i`` (position in ``load_split(task, source)``) is ranked by
    ``sha256(f"{task}|{seed}|{i}")``; the ranked list is cut into consecutive chunks whose sizes
    are ``round(fraction * n)`` for every part but the first, which takes the remainder. With
    ``stratify=True`` this is done separately within each label. The returned index lists are
    sorted, so each derived split keeps file order. The rule uses only the standard library, so
    it gives the same indices on every platform and library version.
    """

    source: str
    parts: tuple[tuple[str, float], ...]
    seed: int = 0
    stratify: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p[0] for p in self.parts)


@dataclass(frozen=True)
class TaskSpec:
    """Static description of a task.

    Attributes:
        name: registry name, e.g. ``"glue/sst2"``.
        kind: one of ``"classification"``, ``"regression"``, ``"multiple_choice"``,
            ``"token_classification"``.
        label_names: class names (classification), the IOB2 tag list (token classification),
            choice names (multiple choice: the largest choice set), ``[]`` for regression.
        metric: name of the main metric (a key of :func:`compute_metrics`' result).
        splits: every split :func:`load` accepts (aliases in ``split_aliases`` are accepted too).
        reader: ``reader(data_dir, split) -> ParseResult`` for the splits stored as files
            (derived splits are cut by :func:`load` from ``derivation.source``). ``None`` for tasks
            that cannot be re-read.
        train_split / eval_split / test_split: which split to train on, to select/evaluate on
            during training, and to report final numbers on (always a labelled split; may equal
            ``eval_split`` where no separate labelled test split exists, e.g. GLUE).
        description: one paragraph, including how any derived split is made.
        metrics: every metric :func:`compute_metrics` reports for this task.
        unlabeled_splits: splits whose examples have ``label`` None.
        split_aliases: other accepted names, e.g. ``{"validation": "dev"}``.
        derivation: how derived splits are made, or None.
        files: relative path(s) under the data directory of each stored split.
        hub: ``(dataset id, config or None, {our split: hub split})`` used when no local data is found.
    """

    name: str
    kind: str
    label_names: list[str]
    metric: str
    splits: tuple[str, ...]
    reader: Callable[[Path, str], Any] | None
    train_split: str | None
    eval_split: str | None
    test_split: str | None
    description: str
    metrics: tuple[str, ...] = ()
    unlabeled_splits: tuple[str, ...] = ()
    split_aliases: Mapping[str, str] = field(default_factory=dict)
    derivation: SplitDerivation | None = None
    files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    hub: tuple[str, str | None, Mapping[str, str]] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def num_labels(self) -> int:
        """Output size of a head: 1 for regression, else ``len(label_names)``."""
        return 1 if self.kind == "regression" else len(self.label_names)

    @property
    def derived_splits(self) -> tuple[str, ...]:
        """Names of the splits cut deterministically from ``derivation.source``."""
        return self.derivation.names if self.derivation else ()

    def canonical_split(self, split: str) -> str:
        """Map an alias (``validation``, ``val``, ...) to the split name used in ``splits``.

        Raises:
            UnknownSplitError: if the split is neither a split nor an alias.
        """
        from .errors import UnknownSplitError

        s = str(split).strip()
        if s in self.splits:
            return s
        low = s.lower()
        if low in self.splits:
            return low
        if low in self.split_aliases:
            return self.split_aliases[low]
        aliases = [f"{a} (={t})" for a, t in self.split_aliases.items()]
        raise UnknownSplitError(self.name, split, list(self.splits) + aliases)
