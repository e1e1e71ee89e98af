"""Readers for the GLUE tsv files (official ``download_glue_data.py`` layout).

Rows are split on tab only, with no quote handling (the equivalent of ``csv.QUOTE_NONE``);
files are decoded as UTF-8 with an optional BOM stripped (MRPC train/dev start with one).
CoLA train/dev have no header: ``source, label, author mark, sentence``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._io import Collector, ParseResult, RowProblem, cached_parse, iter_lines
from .errors import MalformedRowError


@dataclass(frozen=True)
class GlueTask:
    folder: str
    text: str
    pair: str | None
    label: str
    label_names: tuple[str, ...]          # () for regression
    label_map: dict[str, int] | None       # raw string -> id; None for regression
    headerless: tuple[str, ...] = ()       # splits whose file has no header
    headerless_columns: tuple[str, ...] = ()


GLUE: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", "sentence", None, "label", ("unacceptable", "acceptable"), {"0": 0, "1": 1},
                     headerless=("train", "dev"), headerless_columns=("source", "label", "author_mark", "sentence")),
    "sst2": GlueTask("SST-2", "sentence", None, "label", ("negative", "positive"), {"0": 0, "1": 1}),
    "mrpc": GlueTask("MRPC", "#1 String", "#2 String", "Quality", ("not_equivalent", "equivalent"), {"0": 0, "1": 1}),
    "rte": GlueTask("RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"),
                    {"entailment": 0, "not_entailment": 1}),
    "stsb": GlueTask("STS-B", "sentence1", "sentence2", "score", (), None),
    "wnli": GlueTask("WNLI", "sentence1", "sentence2", "label", ("not_entailment", "entailment"), {"0": 0, "1": 1}),
}


def parse_tsv_file(path: Path, task: str, split: str) -> ParseResult:
    """Parse one GLUE tsv file into ``{"idx", "text", "text_pair", "label"}`` records."""
    cfg = GLUE[task]
    col = Collector(path)
    lines = iter_lines(path, col)
    if split in cfg.headerless:
        columns = list(cfg.headerless_columns)
    else:
        first = next(lines, None)
        if first is None:
            raise MalformedRowError(path, 1, "empty file (expected a header line)")
        columns = first[1].split("\t")
    pos = {c: i for i, c in enumerate(columns)}
    for needed in (cfg.text, cfg.pair):
        if needed is not None and needed not in pos:
            raise MalformedRowError(path, 1, f"header has no column {needed!r} (columns: {columns})")
    labeled = cfg.label in pos
    ti, pi, li = pos[cfg.text], (pos[cfg.pair] if cfg.pair else None), (pos[cfg.label] if labeled else None)
    ii = pos.get("index")
    ncols = len(columns)
    row_no = -1
    for line_no, line in lines:
        row_no += 1
        try:
            fields = line.split("\t")
            if len(fields) != ncols:
                raise RowProblem(f"expected {ncols} tab-separated columns, found {len(fields)}")
            text = fields[ti]
            if not text.strip():
                raise RowProblem(f"empty {cfg.text!r}")
            pair = fields[pi] if pi is not None else None
            label: Any = None
            if li is not None:
                raw = fields[li].strip()
                if cfg.label_map is None:
                    try:
                        label = float(raw)
                    except ValueError:
                        raise RowProblem(f"score {raw!r} is not a number") from None
                    if not math.isfinite(label) or not 0.0 <= label <= 5.0:
                        raise RowProblem(f"score {raw!r} outside [0, 5]")
                else:
                    if raw not in cfg.label_map:
                        raise RowProblem(f"label {raw!r} not in {sorted(cfg.label_map)}")
                    label = cfg.label_map[raw]
            idx: Any = row_no
            if ii is not None:
                try:
                    idx = int(fields[ii])
                except ValueError:
                    raise RowProblem(f"index {fields[ii]!r} is not an integer") from None
        except RowProblem as exc:
            col.bad(line_no, str(exc))
            continue
        col.add({"idx": idx, "text": text, "text_pair": pair, "label": label})
    return col.result()


def make_reader(task: str):
    """Return ``reader(data_dir, split) -> ParseResult`` for GLUE task ``task`` (e.g. ``"sst2"``)."""
    cfg = GLUE[task]

    def reader(data_dir: Path, split: str) -> ParseResult:
        path = Path(data_dir) / "glue" / cfg.folder / f"{split}.tsv"
        return cached_parse(parse_tsv_file, path, args=(task, split))

    reader.__name__ = f"read_glue_{task}"
    reader.__doc__ = f"Read ``glue/{cfg.folder}/<split>.tsv`` (splits train, dev, test)."
    return reader
