"""Shared parsing machinery: per-row problem collection, file reading, caching, strict/warn handling."""
from __future__ import annotations

import bz2
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataNotFoundError, MalformedRowError, MalformedRowWarning


class RowProblem(Exception):
    """Raised inside a row parser to mark the current row as malformed (message = the problem)."""


@dataclass(frozen=True)
class ParseResult:
    """What a reader found in one file (or one set of files for one split).

    Attributes:
        path: the (main) file that was read.
        records: the well-formed records, in file order.
        n_bad: how many malformed rows were skipped.
        first_bad: ``(line_or_item_number, problem)`` of the first malformed row, or None.
        unit: ``"line"`` (1-based physical line) or ``"item"`` (1-based element of a JSON array).
        bad_lines: the line (or item) numbers of every malformed row, ascending.
    """

    path: str
    records: tuple[dict[str, Any], ...]
    n_bad: int = 0
    first_bad: tuple[int, str] | None = None
    unit: str = "line"
    bad_lines: tuple[int, ...] = ()


class Collector:
    """Accumulates records and malformed-row reports while a file is parsed."""

    def __init__(self, path: Path, unit: str = "line") -> None:
        self.path = path
        self.unit = unit
        self.records: list[dict[str, Any]] = []
        self.n_bad = 0
        self.first_bad: tuple[int, str] | None = None
        self.bad_lines: list[int] = []

    def bad(self, line: int, problem: str) -> None:
        self.n_bad += 1
        self.bad_lines.append(int(line))
        if self.first_bad is None or int(line) < self.first_bad[0]:
            self.first_bad = (int(line), problem)  # the earliest in the file, whatever the detection order

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def result(self) -> ParseResult:
        return ParseResult(str(self.path), tuple(self.records), self.n_bad, self.first_bad, self.unit,
                           tuple(sorted(self.bad_lines)))


def require_file(path: Path) -> Path:
    """Return ``path`` if it is a file, else raise :class:`DataNotFoundError`."""
    if not path.is_file():
        raise DataNotFoundError(
            f"data file not found: {path} (check data_dir / SOFTPROMPT_DATA_DIR; "
            "see ../shared/data/README.md for the expected layout)"
        )
    return path


def read_bytes(path: Path) -> bytes:
    """Read a file, transparently decompressing ``.bz2``."""
    require_file(path)
    if path.suffix == ".bz2":
        with bz2.open(path, "rb") as fh:
            return fh.read()
    return path.read_bytes()


def iter_lines(path: Path, col: Collector) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for every physical line of a UTF-8 file (BOM stripped).

    Lines are split on ``\\n`` only (never on other Unicode line breaks, which may occur inside
    text), a trailing ``\\r`` is removed, and a final empty line after the last newline is
    dropped. Lines that are not valid UTF-8 are reported to ``col`` as malformed and skipped.
    """
    data = read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
        raw_lines: list[Any] = text.split("\n")
        decoded = True
    except UnicodeDecodeError:
        raw_lines = data.split(b"\n")
        decoded = False
    if raw_lines and (raw_lines[-1] == "" or raw_lines[-1] == b""):
        raw_lines.pop()
    for i, line in enumerate(raw_lines, start=1):
        if not decoded:
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                col.bad(i, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
        line = line.removesuffix("\r")
        yield i, line


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = require_file(path).stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _cached(parser: Callable[..., ParseResult], keys: tuple[tuple[str, int, int], ...], args: tuple) -> ParseResult:
    return parser(*(Path(k[0]) for k in keys), *args)


def cached_parse(parser: Callable[..., ParseResult], *paths: Path, args: tuple = ()) -> ParseResult:
    """Run ``parser(*paths, *args)`` once per (paths, mtimes, sizes, args); later calls hit an LRU cache."""
    return _cached(parser, tuple(_stat_key(Path(p)) for p in paths), tuple(args))


def clear_cache() -> None:
    """Forget every cached parse (files are re-read on next load)."""
    _cached.cache_clear()


def copy_record(rec: dict[str, Any]) -> dict[str, Any]:
    """Copy a cached record so that callers may mutate what they get (lists are copied too)."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in rec.items()}


def _list_lines(result: ParseResult, limit: int = 20) -> str:
    lines = result.bad_lines
    if not lines:
        return ""
    more = f", ... ({len(lines) - limit} more)" if len(lines) > limit else ""
    shown = ", ".join(str(n) for n in lines[:limit]) + more
    return f"; malformed {result.unit}s: {shown}"


def finish(result: ParseResult, *, strict: bool, what: str = "", stacklevel: int = 4) -> list[dict[str, Any]]:
    """Turn a parse result into a fresh list of records; raise (strict) or warn about malformed rows."""
    if result.n_bad:
        line, problem = result.first_bad or (0, "?")
        if strict:
            raise MalformedRowError(result.path, line, problem, unit=result.unit)
        warnings.warn(
            f"{result.path}: skipped {result.n_bad} malformed row(s)"
            + (f" while loading {what}" if what else "")
            + f"; first at {result.unit} {line}: {problem}"
            + _list_lines(result)
            + " (to fail instead: --strict, Python: strict=True)",
            MalformedRowWarning,
            stacklevel=stacklevel,
        )
    return [copy_record(r) for r in result.records]


def get_field(obj: dict[str, Any], key: str, types: type | tuple[type, ...] | None = None) -> Any:
    """``obj[key]`` with a :class:`RowProblem` if it is missing (or not of ``types``)."""
    if not isinstance(obj, dict):
        raise RowProblem(f"expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise RowProblem(f"missing field {key!r}")
    val = obj[key]
    if types is not None:
        allowed = types if isinstance(types, tuple) else (types,)
        if not isinstance(val, allowed) or (isinstance(val, bool) and bool not in allowed):
            raise RowProblem(f"field {key!r} has type {type(val).__name__}")
    return val


def iter_jsonl(path: Path, col: Collector) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed JSON)`` per non-blank line; undecodable lines go to ``col``."""
    import json

    for line_no, line in iter_lines(path, col):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as exc:
            col.bad(line_no, f"invalid JSON ({exc.msg} at column {exc.colno})")
        except (ValueError, RecursionError) as exc:  # too deeply nested, integer with too many digits
            col.bad(line_no, f"invalid JSON ({type(exc).__name__}: {str(exc)[:100]})")


def load_json_array(path: Path) -> list[Any]:
    """Parse a file holding one JSON array (a structural error raises :class:`MalformedRowError`)."""
    import json

    data = read_bytes(path)
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise MalformedRowError(path, 1, f"not valid UTF-8 ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise MalformedRowError(path, exc.lineno, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # too deeply nested, integer with too many digits
        raise MalformedRowError(path, 1, f"invalid JSON ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not isinstance(obj, list):
        raise MalformedRowError(path, 1, f"expected a JSON array, got {type(obj).__name__}")
    return obj
