"""Label checks of user files: one kind of value per label column, at least two classes, an optional label map."""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import LabelError

_SHOWN = 20  # distinct values listed in an error message before "... (N more)"
_BOOL_WORDS = {"true", "false"}


def label_key(value: Any) -> str:
    """The text a label is matched by: ``str`` of the value, stripped (JSON ``true`` -> ``'True'``)."""
    return str(value) if isinstance(value, bool) else str(value).strip()


def label_type(value: Any) -> str:
    """``'boolean'``, ``'number'`` or ``'text'``: what a label value looks like, in a CSV cell or in JSON."""
    if isinstance(value, bool) or label_key(value).lower() in _BOOL_WORDS:
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    try:
        float(label_key(value))
    except ValueError:
        return "text"
    return "number"


def normalise_label_map(label_map: Mapping[Any, Any] | None, label_column: str | None) -> dict[str, Any] | None:
    """Check ``label_map`` and key it by :func:`label_key`, so ``{1: 'pos'}`` matches the CSV cell ``1``."""
    if label_map is None:
        return None
    if label_column is None:
        raise LabelError("label_map needs a label column: pass label_column= (CLI: --label-column) as well")
    if not isinstance(label_map, Mapping):
        raise LabelError(f"label_map must be a dict from file values to class names, got {type(label_map).__name__}")
    out: dict[str, Any] = {}
    for key, value in label_map.items():
        if isinstance(value, (dict, list, tuple, set)) or value is None:
            raise LabelError(f"label_map[{key!r}] = {value!r}: each value must be a class name (text or a number)")
        out[label_key(key)] = value
    return out


def apply_label_map(raw: Any, label_map: dict[str, Any] | None) -> Any:
    """``raw`` renamed by the map; values the map does not name stay as they are (they may be class names)."""
    if label_map is None:
        return raw
    return label_map.get(label_key(raw), raw)


def _listing(counts: Counter[str], limit: int) -> str:
    """``'1' (4), 'pos' (2), ...``: distinct values with their row counts, most frequent first."""
    shown = [f"{v!r} ({c})" for v, c in sorted(counts.items(), key=lambda vc: (-vc[1], vc[0]))[:limit]]
    more = f", ... ({len(counts) - limit} more)" if len(counts) > limit else ""
    return ", ".join(shown) + more


def check_one_label_type(path: Path, column: str, raws: list[Any]) -> None:
    """Refuse a label column that mixes numbers, booleans and text (``1``, ``1.0``, ``True``, ``pos``).

    Such a column would silently become one class per spelling. The error lists every distinct value by type,
    with its row count, and names the fix: a label map.
    """
    by_type: dict[str, Counter[str]] = {}
    for raw in raws:
        by_type.setdefault(label_type(raw), Counter())[label_key(raw)] += 1
    if len(by_type) < 2:
        return
    plural = {"number": "numbers", "boolean": "booleans", "text": "text"}
    kinds = [plural[t] for t in ("number", "boolean", "text") if t in by_type]
    n_values = sum(len(c) for c in by_type.values())
    parts = "; ".join(f"{plural[t]} {_listing(c, _SHOWN)}" for t, c in by_type.items())
    raise LabelError(
        f"{path}: label column {column!r} mixes {', '.join(kinds[:-1])} and {kinds[-1]} ({n_values} distinct "
        f"values that would become unrelated classes; value (rows): {parts}); name one class per value with "
        f"--label-map (Python: label_map={{'<value>': '<class>', ...}})"
    )


def check_two_classes(path: Path, column: str, classes: list[str]) -> None:
    """Refuse a classification file whose rows (``classes``: the class name of each) hold fewer than two classes.

    A model trained on one class learns nothing and scores accuracy 1.0 on its own data.
    """
    counts = Counter(classes)
    if len(counts) >= 2 or not classes:
        return
    (value, rows), = counts.items()
    raise LabelError(
        f"{path}: label column {column!r} has 1 distinct value ({value!r} in {rows} row(s)), but classification "
        f"needs at least 2 classes; add examples of the other classes, or, to score this file with a trained "
        f"model, pass its label set (Python: label_names=[...])"
    )
