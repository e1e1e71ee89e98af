"""Loading a user's own labelled (or unlabelled) file: CSV, TSV, JSONL/JSON or TXT."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._io import (
    Collector,
    ParseResult,
    RowProblem,
    finish,
    iter_jsonl,
    iter_lines,
    read_bytes,
    require_file,
)
from .errors import MalformedRowError, MissingColumnError, NoDataError
from .labels import apply_label_map, check_one_label_type, check_two_classes, label_key, normalise_label_map
from .spec import TaskSpec

_MISSING = object()


def _read_table(path: Path, col: Collector, delimiter: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    data = read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise MalformedRowError(path, line, f"not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                                f"re-save the file as UTF-8 (e.g. from Latin-1)") from None
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        raise MalformedRowError(path, 1, "empty file (expected a header line)") from None
    header = [h.strip() for h in header]
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            col.bad(start, f"csv error: {exc}")
            continue
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) != len(header):
            col.bad(start, f"expected {len(header)} columns, found {len(fields)}")
            continue
        rows.append((start, dict(zip(header, fields))))
    return header, rows


def _read_json(path: Path, col: Collector) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    rows: list[tuple[int, Any]] = []
    head = read_bytes(path)[:4096].decode("utf-8-sig", errors="replace").lstrip()
    if path.suffix.lower() == ".json" and head.startswith("["):
        try:
            items = json.loads(read_bytes(path).decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # incl. JSONDecodeError, too deep
            raise MalformedRowError(path, getattr(exc, "lineno", 1), f"invalid JSON: {str(exc)[:200]}") from None
        col.unit = "item"
        rows = list(enumerate(items, start=1))
    else:
        rows = list(iter_jsonl(path, col))
    columns: dict[str, None] = {}
    good = []
    for n, obj in rows:
        if not isinstance(obj, dict):
            col.bad(n, f"expected a JSON object, got {type(obj).__name__}")
            continue
        for k in obj:
            columns.setdefault(str(k), None)
        good.append((n, obj))
    return list(columns), good


def _as_text(value: Any, column: str, required: bool) -> str | None:
    if value is _MISSING or value is None:
        if required:
            raise RowProblem(f"missing value in column {column!r}")
        return None
    if isinstance(value, (dict, list)):
        raise RowProblem(f"column {column!r} holds a {type(value).__name__}, not text")
    s = value if isinstance(value, str) else str(value)
    if required and not s.strip():
        raise RowProblem(f"empty value in column {column!r}")
    return s


def _numeric(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v).strip())
    except ValueError:
        return None


def parse_user_file(path: Path, text_column: str, text_pair_column: str | None, label_column: str | None,
                    label_names: Sequence[str] | None,
                    label_map: Mapping[Any, Any] | None = None) -> tuple[ParseResult, list[str], str]:
    """Parse a user file; returns ``(result, label_names, kind)``. See :func:`load_file`."""
    path = require_file(Path(path))
    lmap = normalise_label_map(label_map, label_column)
    suffix = path.suffix.lower()
    col = Collector(path)
    if suffix == ".txt":
        if label_column is not None or text_pair_column is not None:
            raise ValueError(f"{path}: a .txt file holds one text per line; it has no label or pair columns")
        for line_no, line in iter_lines(path, col):
            if line.strip():
                col.add({"idx": line_no - 1, "text": line, "text_pair": None, "label": None})
        return col.result(), [], "classification"
    if suffix == ".csv":
        columns, rows = _read_table(path, col, ",")
    elif suffix in (".tsv", ".tab"):
        columns, rows = _read_table(path, col, "\t")
    elif suffix in (".jsonl", ".ndjson", ".json"):
        columns, rows = _read_json(path, col)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv, .jsonl, .json or .txt)")
    roles = ((text_column, "text_column"), (text_pair_column, "text_pair_column"), (label_column, "label_column"))
    for c, role in roles:
        # A JSON file without a single object has no columns at all: that is "no data", reported by load_file.
        if c is not None and c not in columns and (columns or rows):
            raise MissingColumnError(path, c, role, columns)

    staged: list[tuple[int, dict[str, Any], Any]] = []
    for n, row in rows:
        try:
            text = _as_text(row.get(text_column, _MISSING), text_column, True)
            pair = _as_text(row.get(text_pair_column, _MISSING), text_pair_column, True) if text_pair_column else None
            raw: Any = None
            if label_column is not None:
                raw = row.get(label_column, _MISSING)
                if raw is _MISSING or raw is None or (isinstance(raw, str) and not raw.strip()):
                    raise RowProblem(f"missing label in column {label_column!r}")
                if isinstance(raw, (dict, list)):
                    raise RowProblem(f"label is a {type(raw).__name__}")
                raw = apply_label_map(raw, lmap)
        except RowProblem as exc:
            col.bad(n, str(exc))
            continue
        staged.append((n, {"idx": n - 1 if col.unit == "item" else len(staged), "text": text, "text_pair": pair}, raw))

    kind = "classification"
    names: list[str] = []
    if label_column is None:
        for _, rec, _ in staged:
            rec["label"] = None
            col.add(rec)
        return col.result(), names, kind

    if label_names is not None:
        names = [str(x) for x in label_names]
        index = {nm: i for i, nm in enumerate(names)}
        for n, rec, raw in staged:
            key = label_key(raw)
            if key in index:
                rec["label"] = index[key]
            else:
                num = _numeric(raw)
                if num is not None and num.is_integer() and 0 <= int(num) < len(names):
                    rec["label"] = int(num)
                else:
                    col.bad(n, f"label {raw!r} not in label_names {names}")
                    continue
            col.add(rec)
        return col.result(), names, kind

    # Inferred labels: one kind of value per column, else "1", "1.0", "True" and "pos" become 4 classes.
    check_one_label_type(path, label_column, [raw for _, _, raw in staged])
    nums = [_numeric(raw) for _, _, raw in staged]
    if staged and all(v is not None for v in nums):
        finite = [v for v in nums if v is not None and math.isfinite(v)]
        if any(not v.is_integer() for v in finite):  # regression
            kind = "regression"
            for (n, rec, raw), v in zip(staged, nums):
                if v is None or not math.isfinite(v):
                    col.bad(n, f"label {raw!r} is not a finite number")
                    continue
                rec["label"] = float(v)
                col.add(rec)
            return col.result(), names, kind
        values = sorted({int(v) for v in finite})
        names = [str(v) for v in values]
        check_two_classes(path, label_column, [str(int(v)) for v in finite])
        index_i = {v: i for i, v in enumerate(values)}
        for (n, rec, raw), v in zip(staged, nums):
            if v is None or not math.isfinite(v):
                col.bad(n, f"label {raw!r} is not a finite number")
                continue
            rec["label"] = index_i[int(v)]
            col.add(rec)
        return col.result(), names, kind
    check_two_classes(path, label_column, [label_key(raw) for _, _, raw in staged])
    names = sorted({label_key(raw) for _, _, raw in staged})
    index = {nm: i for i, nm in enumerate(names)}
    for _, rec, raw in staged:
        rec["label"] = index[label_key(raw)]
        col.add(rec)
    return col.result(), names, kind


def _no_data_message(path: Path, result: ParseResult) -> str:
    if result.n_bad:
        line, problem = result.first_bad or (0, "?")
        return (f"{path}: no usable example: all {result.n_bad} row(s) are malformed (first at {result.unit} "
                f"{line}: {problem}); fix the rows (--strict stops at the first)")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".tab"):
        return f"{path}: no data rows, only a header line; add one example per row below the header"
    if suffix == ".txt":
        return f"{path}: no example: the file has no non-blank line; write one text per line"
    return f"{path}: no example: the file holds no JSON object; write one object per line (JSONL)"


def load_file(path: str | os.PathLike[str], *, text_column: str = "text", text_pair_column: str | None = None,
              label_column: str | None = None, label_names: Sequence[str] | None = None,
              label_map: Mapping[Any, Any] | None = None,
              strict: bool = False) -> tuple[list[dict[str, Any]], TaskSpec]:
    """Load a user's CSV / TSV / JSONL (or JSON array) / TXT file as classification or regression records.

    Args:
        path: the file; the type comes from the suffix. CSV: comma-separated with standard quoting
            and a header. TSV: tab-separated, no quoting (like GLUE), with a header. JSONL: one object
            per line (``.json``: one array of objects, or JSONL). TXT: one text per line, no labels.
        text_column / text_pair_column / label_column: column (key) names.
        label_names: fix the label vocabulary; labels are matched by name, else read as integer
            ids into it. Without it, string labels become ids of their sorted unique values;
            integer-valued numbers are sorted numerically (names ``"0"``, ``"1"``...); if any
            numeric label is not an integer, the task is a regression with float labels. Without it, a
            label column must hold one kind of value (numbers, booleans or text) and at least 2 classes.
        label_map: rename label values before anything else, e.g. ``{"1.0": "1", "True": "1", "pos": "1"}``
            (CLI: ``--label-map``). Keys are matched as the file spells the value (stripped; JSON ``true`` is
            ``"True"``, JSON ``1.0`` is ``"1.0"``); values not in the map stay as they are.
        strict: raise :class:`MalformedRowError` on the first malformed row instead of skipping
            malformed rows with one warning.

    Returns:
        ``(records, spec)``; records are ``{idx, text, text_pair, label}`` (label None without a
        label column); spec is a :class:`TaskSpec` named ``file:<name>`` with one split ``"all"``.

    Raises:
        MissingColumnError: a named column is not in the file (the message lists the columns).
        NoDataError: the file holds no usable example (only a header, or every row malformed).
        LabelError: inferred labels mix numbers, booleans and text, or hold fewer than 2 classes (the
            message lists the distinct values and names the fix).
    """
    p = Path(path)
    result, names, kind = parse_user_file(p, text_column, text_pair_column, label_column, label_names, label_map)
    if not result.records and not (strict and result.n_bad):  # strict: the first malformed row is the error
        raise NoDataError(_no_data_message(p, result))
    records = finish(result, strict=strict, what=str(p.name), stacklevel=3)
    labeled = label_column is not None
    if kind == "regression":
        metric, metrics = "pearson", ("pearson", "spearman", "pearson_spearman_mean", "mse")
    elif len(names) == 2:
        metric, metrics = "accuracy", ("accuracy", "f1", "matthews_correlation")
    else:
        metric, metrics = "accuracy", ("accuracy", "macro_f1", "matthews_correlation")

    def reader(data_dir: Any = None, split: str = "all") -> ParseResult:
        return parse_user_file(p, text_column, text_pair_column, label_column, label_names, label_map)[0]

    desc = (f"User file {p} ({len(records)} examples"
            + (f", {result.n_bad} malformed row(s) skipped" if result.n_bad else "") + "); "
            + (f"label column {label_column!r}: " + ("float scores (regression)" if kind == "regression"
                                                      else f"labels {names} -> ids 0..{len(names) - 1}")
               if labeled else "no labels (label None)") + ".")
    spec = TaskSpec(
        name=f"file:{p.name}", kind=kind, label_names=names, metric=metric, splits=("all",), reader=reader,
        train_split=None, eval_split="all", test_split="all", description=desc, metrics=metrics,
        unlabeled_splits=() if labeled else ("all",), files={"all": (str(p),)},
    )
    return records, spec
