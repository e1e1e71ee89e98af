"""Readers for AG News (csv) and CoNLL-2003 (4-column text, IOB2 tags)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ._io import (
    Collector,
    ParseResult,
    RowProblem,
    cached_parse,
    iter_lines,
    read_bytes,
)
from .errors import MalformedRowError

AGNEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]

#: IOB2 tag list in the order of the Hugging Face ``conll2003`` ``ner_tags`` feature.
CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def parse_agnews_csv(path: Path) -> ParseResult:
    """Parse ``Class Index,Title,Description`` csv (standard quoting) into ``{"idx", "text", "text_pair", "label"}``.

    ``text`` = ``"{title} {description}"`` (as in the HF ``ag_news`` set), label = class index - 1.
    """
    col = Collector(path)
    data = read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MalformedRowError(path, text_line(data, exc.start), f"not valid UTF-8 ({exc.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise MalformedRowError(path, 1, "empty file (expected a header line)") from None
    if [h.strip() for h in header] != ["Class Index", "Title", "Description"]:
        raise MalformedRowError(path, 1, f"unexpected header {header} (expected Class Index, Title, Description)")
    row_no = -1
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            col.bad(start, f"csv error: {exc}")
            continue
        row_no += 1
        if not row:
            continue
        try:
            if len(row) != 3:
                raise RowProblem(f"expected 3 columns, found {len(row)}")
            raw = row[0].strip()
            if raw not in ("1", "2", "3", "4"):
                raise RowProblem(f"class index {raw!r} not in 1-4")
            if not (row[1].strip() or row[2].strip()):
                raise RowProblem("empty title and description")
        except RowProblem as exc:
            col.bad(start, str(exc))
            continue
        col.add({"idx": row_no, "text": f"{row[1]} {row[2]}", "text_pair": None, "label": int(raw) - 1})
    return col.result()


def text_line(data: bytes, offset: int) -> int:
    """1-based line number of byte ``offset`` in ``data``."""
    return data.count(b"\n", 0, offset) + 1


def parse_conll(path: Path) -> ParseResult:
    """Parse CoNLL-2003 ``token POS chunk NER`` lines into ``{"idx", "tokens", "tags"}`` sentences.

    ``-DOCSTART-`` lines are skipped; a blank line ends a sentence. A malformed line (wrong number
    of fields, unknown tag) drops its whole sentence and is counted once.
    """
    col = Collector(path)
    tag_id = {t: i for i, t in enumerate(CONLL_TAGS)}
    tokens: list[str] = []
    tags: list[int] = []
    bad: tuple[int, str] | None = None

    def flush() -> None:
        nonlocal tokens, tags, bad
        if bad is not None:
            col.bad(*bad)
        elif tokens:
            col.add({"idx": len(col.records), "tokens": tokens, "tags": tags})
        tokens, tags, bad = [], [], None

    for line_no, line in iter_lines(path, col):
        if not line.strip():
            flush()
            continue
        if line.startswith("-DOCSTART-"):
            flush()
            continue
        if bad is not None:
            continue
        parts = line.split()
        if len(parts) != 4:
            bad = (line_no, f"expected 4 space-separated fields (token POS chunk NER), found {len(parts)}")
            continue
        tag = parts[3]
        if tag not in tag_id:
            bad = (line_no, f"unknown NER tag {tag!r} (expected one of {CONLL_TAGS})")
            continue
        tokens.append(parts[0])
        tags.append(tag_id[tag])
    flush()
    return col.result()


def read_agnews(data_dir: Path, split: str) -> ParseResult:
    """``agnews/test.csv`` (our split ``full``; train/dev/test are derived from it)."""
    if split != "full":
        raise KeyError(split)
    return cached_parse(parse_agnews_csv, Path(data_dir) / "agnews" / "test.csv")


def read_conll(data_dir: Path, split: str) -> ParseResult:
    """``conll2003/{train,valid,test}.txt`` (our ``dev`` = ``valid.txt``)."""
    fname = {"train": "train", "dev": "valid", "test": "test"}[split]
    return cached_parse(parse_conll, Path(data_dir) / "conll2003" / f"{fname}.txt")
