"""Readers for the commonsense multiple-choice sets (ARC, OpenBookQA, PIQA, HellaSwag, WinoGrande).

Every record is ``{"idx", "text", "choices": [str, ...], "label": int}``:

* ARC-Easy / ARC-Challenge: ``text`` = question; numeric choice labels ``1``-``5`` are mapped to
  ``A``-``E`` (the answer key too) and ``label`` is the position of the answer key; the extra
  ``answer`` / ``response`` fields of the ARC-Challenge copy are ignored.
* OpenBookQA: ``text`` = question stem; ``Choices`` ``"(A) .. (B) .. (C) .. (D) .."`` is split at
  the first ``" (B) "``, then the first ``" (C) "`` after it, and so on.
* PIQA: ``text`` = goal, ``choices`` = [sol1, sol2], label from line i of ``valid-labels.lst``.
* HellaSwag: ``text`` = ``"{activity_label}: {ctx}"`` (the first line of each 6-line item),
  ``choices`` = the four endings, label = the gold index on the second line.
* WinoGrande: ``text`` = the sentence with its ``_`` blank, ``choices`` = [option1, option2],
  label = ``correct_option - 1``.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from ._io import (
    Collector,
    ParseResult,
    RowProblem,
    cached_parse,
    get_field,
    iter_jsonl,
    iter_lines,
    load_json_array,
)
from .errors import MalformedRowError

LETTERS = "ABCDEFGH"


# ---------------------------------------------------------------- ARC
def arc_record(obj: Any) -> dict[str, Any]:
    """Map one ARC item (HF ``ai2_arc`` schema) to a multiple-choice record."""
    question = get_field(obj, "question", str)
    choices = get_field(obj, "choices", dict)
    texts = get_field(choices, "text", list)
    labels = [str(x).strip() for x in get_field(choices, "label", list)]
    if len(texts) != len(labels):
        raise RowProblem(f"{len(texts)} choice texts but {len(labels)} choice labels")
    if len(texts) < 2:
        raise RowProblem(f"only {len(texts)} choice(s)")
    if not all(isinstance(t, str) for t in texts):
        raise RowProblem("a choice text is not a string")

    def norm(lab: str) -> str:
        if lab.isdigit() and 1 <= int(lab) <= len(LETTERS):
            return LETTERS[int(lab) - 1]
        return lab.upper()

    labels = [norm(x) for x in labels]
    key = norm(str(get_field(obj, "answerKey")).strip())
    if key not in labels:
        raise RowProblem(f"answerKey {key!r} not among choice labels {labels}")
    return {"idx": obj.get("id"), "text": question, "choices": list(texts), "label": labels.index(key)}


def parse_arc_json(path: Path) -> ParseResult:
    """Parse an ARC JSON-array file (ARC-Easy copy); malformed items are counted by item number."""
    col = Collector(path, unit="item")
    for i, obj in enumerate(load_json_array(path), start=1):
        try:
            col.add(arc_record(obj))
        except RowProblem as exc:
            col.bad(i, str(exc))
    return col.result()


def parse_arc_jsonl(path: Path) -> ParseResult:
    """Parse an ARC jsonl file (ARC-Challenge copy; ``answer``/``response`` ignored)."""
    col = Collector(path)
    for line_no, obj in iter_jsonl(path, col):
        try:
            col.add(arc_record(obj))
        except RowProblem as exc:
            col.bad(line_no, str(exc))
    return col.result()


# ---------------------------------------------------------------- OpenBookQA
def split_obqa_choices(s: str) -> list[str]:
    """Split ``"(A) x (B) y (C) z (D) w"`` into ``["x", "y", "z", "w"]`` (sequential markers)."""
    s = s.strip()
    if not s.startswith("(A)"):
        raise RowProblem(f"choices do not start with '(A)': {s[:40]!r}")
    out, pos = [], 3
    for letter in "BCD":
        nxt = s.find(f" ({letter}) ", pos)
        if nxt < 0:
            raise RowProblem(f"choice marker ({letter}) not found")
        out.append(s[pos:nxt].strip())
        pos = nxt + 4 + 1
    out.append(s[pos:].strip())
    return out


def parse_obqa_tsv(path: Path) -> ParseResult:
    """Parse an OpenBookQA ``Main`` tsv (header ``ID, Question Stem, Choices, Complete Question, Answer Key``)."""
    col = Collector(path)
    lines = iter_lines(path, col)
    first = next(lines, None)
    if first is None:
        raise MalformedRowError(path, 1, "empty file (expected a header line)")
    cols = first[1].split("\t")
    need = ["ID", "Question Stem", "Choices", "Answer Key"]
    missing = [c for c in need if c not in cols]
    if missing:
        raise MalformedRowError(path, 1, f"header lacks {missing} (columns: {cols})")
    pos = {c: cols.index(c) for c in need}
    for line_no, line in lines:
        try:
            f = line.split("\t")
            if len(f) != len(cols):
                raise RowProblem(f"expected {len(cols)} tab-separated columns, found {len(f)}")
            choices = split_obqa_choices(f[pos["Choices"]])
            key = f[pos["Answer Key"]].strip()
            if key not in "ABCD" or len(key) != 1:
                raise RowProblem(f"answer key {key!r} not in A-D")
            stem = f[pos["Question Stem"]]
            if not stem.strip():
                raise RowProblem("empty question stem")
        except RowProblem as exc:
            col.bad(line_no, str(exc))
            continue
        col.add({"idx": f[pos["ID"]], "text": stem, "choices": choices, "label": "ABCD".index(key)})
    return col.result()


# ---------------------------------------------------------------- PIQA
def parse_piqa(path: Path, labels_path: Path) -> ParseResult:
    """Parse PIQA ``valid.jsonl`` with labels from line i of ``valid-labels.lst``."""
    lab_col = Collector(labels_path)
    labels = {n: s.strip() for n, s in iter_lines(labels_path, lab_col)}
    col = Collector(path)
    n_items = 0
    for line_no, obj in iter_jsonl(path, col):
        n_items += 1
        try:
            rec = {"idx": line_no - 1, "text": get_field(obj, "goal", str),
                   "choices": [get_field(obj, "sol1", str), get_field(obj, "sol2", str)]}
            raw = labels.get(line_no)
            if raw is None:
                raise RowProblem(f"no label on line {line_no} of {labels_path.name}")
            if raw not in ("0", "1"):
                raise RowProblem(f"label {raw!r} (line {line_no} of {labels_path.name}) not in 0/1")
            rec["label"] = int(raw)
        except RowProblem as exc:
            col.bad(line_no, str(exc))
            continue
        col.add(rec)
    extra = [n for n in labels if n > n_items and labels[n]]
    if extra:
        col.bad(extra[0], f"{len(extra)} extra label line(s) in {labels_path.name} without an example")
    return col.result()


# ---------------------------------------------------------------- HellaSwag
def parse_hellaswag(path: Path) -> ParseResult:
    """Parse the bz2 text file: items of 6 lines (context, gold index 0-3, four endings)."""
    col = Collector(path)
    lines = list(iter_lines(path, col))
    for k in range(0, len(lines), 6):
        group = lines[k:k + 6]
        line_no = group[0][0]
        try:
            if len(group) < 6:
                raise RowProblem(f"incomplete item: {len(group)} of 6 lines at end of file")
            if any(b[0] - a[0] != 1 for a, b in itertools.pairwise(group)):
                raise RowProblem("item lines are not consecutive (an undecodable line was dropped)")
            ctx, gold = group[0][1], group[1][1].strip()
            if gold not in ("0", "1", "2", "3"):
                raise RowProblem(f"gold ending index {gold!r} (line {line_no + 1}) not in 0-3")
            if not ctx.strip():
                raise RowProblem("empty context line")
        except RowProblem as exc:
            col.bad(line_no, str(exc))
            continue
        col.add({"idx": k // 6, "text": ctx, "choices": [g[1] for g in group[2:6]], "label": int(gold)})
    return col.result()


# ---------------------------------------------------------------- WinoGrande
def winogrande_record(obj: Any, idx: Any) -> dict[str, Any]:
    """Map one WinoGrande item to a two-choice record (``answer`` or ``correct_option`` = "1"/"2")."""
    sentence = get_field(obj, "sentence", str)
    if "_" not in sentence:
        raise RowProblem("sentence has no '_' blank")
    key = "correct_option" if "correct_option" in obj else "answer"
    raw = str(get_field(obj, key)).strip()
    if raw not in ("1", "2"):
        raise RowProblem(f"{key} {raw!r} not in '1'/'2'")
    return {"idx": obj.get("id", idx), "text": sentence,
            "choices": [get_field(obj, "option1", str), get_field(obj, "option2", str)], "label": int(raw) - 1}


def parse_winogrande(path: Path) -> ParseResult:
    """Parse the WinoGrande 1.1 dev JSON array."""
    col = Collector(path, unit="item")
    for i, obj in enumerate(load_json_array(path), start=1):
        try:
            col.add(winogrande_record(obj, i - 1))
        except RowProblem as exc:
            col.bad(i, str(exc))
    return col.result()


# ---------------------------------------------------------------- readers
def read_arc_easy(data_dir: Path, split: str) -> ParseResult:
    """``commonsense/arc_easy/{train,validation,test}.json`` (our ``dev`` = ``validation``)."""
    fname = {"train": "train", "dev": "validation", "test": "test"}[split]
    return cached_parse(parse_arc_json, Path(data_dir) / "commonsense" / "arc_easy" / f"{fname}.json")


def read_arc_challenge(data_dir: Path, split: str) -> ParseResult:
    """``commonsense/arc_challenge/{train,test}.jsonl`` (``train_full`` = ``train.jsonl``)."""
    fname = {"train_full": "train", "test": "test"}[split]
    return cached_parse(parse_arc_jsonl, Path(data_dir) / "commonsense" / "arc_challenge" / f"{fname}.jsonl")


def read_openbookqa(data_dir: Path, split: str) -> ParseResult:
    """``commonsense/openbookqa/{train,dev,test}.tsv``."""
    return cached_parse(parse_obqa_tsv, Path(data_dir) / "commonsense" / "openbookqa" / f"{split}.tsv")


def read_piqa(data_dir: Path, split: str) -> ParseResult:
    """``commonsense/piqa/valid.jsonl`` + ``valid-labels.lst`` (split ``full``)."""
    if split != "full":
        raise KeyError(split)
    d = Path(data_dir) / "commonsense" / "piqa"
    return cached_parse(parse_piqa, d / "valid.jsonl", d / "valid-labels.lst")


def read_hellaswag(data_dir: Path, split: str) -> ParseResult:
    """``commonsense/hellaswag/hellaswag_val_full.txt.bz2`` (split ``full``)."""
    if split != "full":
        raise KeyError(split)
    return cached_parse(parse_hellaswag, Path(data_dir) / "commonsense" / "hellaswag" / "hellaswag_val_full.txt.bz2")


def read_winogrande(data_dir: Path, split: str) -> ParseResult:
    """``commonsense/winogrande/dev.json`` (split ``full``)."""
    if split != "full":
        raise KeyError(split)
    return cached_parse(parse_winogrande, Path(data_dir) / "commonsense" / "winogrande" / "dev.json")
