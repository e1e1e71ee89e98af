"""Readers for SuperGLUE jsonl files: the full CB/RTE splits and the FewGLUE 32-shot files.

Record layouts (all tasks also carry ``idx``, the source ``idx``):

* CB, RTE: ``text`` = premise, ``text_pair`` = hypothesis.
* BoolQ: ``text`` = passage, ``text_pair`` = question; label 0 False / 1 True.
* COPA (multiple choice): ``text`` = ``"{premise} What was the {cause|effect}?"``,
  ``choices`` = [choice1, choice2]; extra fields ``premise`` and ``question``.
* MultiRC: one record per answer option: ``text`` = passage, ``text_pair`` = ``"{question} {answer}"``,
  label 0/1; ``idx`` = ``"{passage}-{question}-{answer}"``, ``group`` = ``"{passage}-{question}"``
  (for exact match per question).
* WiC: ``text`` = ``"{word}: {sentence1}"``, ``text_pair`` = sentence2; extra field ``word``.
* WSC: ``text`` = the passage, ``text_pair`` = ``'"{span2_text}" refers to "{span1_text}"'``;
  extra fields ``span1_text``, ``span1_index``, ``span2_text``, ``span2_index``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ._io import Collector, ParseResult, RowProblem, cached_parse, get_field, iter_jsonl

FOLDERS = {"cb": "CB", "rte": "RTE", "boolq": "BoolQ", "copa": "COPA", "multirc": "MultiRC", "wic": "WiC", "wsc": "WSC"}

LABEL_NAMES: dict[str, list[str]] = {
    "cb": ["entailment", "contradiction", "neutral"],
    "rte": ["entailment", "not_entailment"],
    "boolq": ["False", "True"],
    "copa": ["choice1", "choice2"],
    "multirc": ["False", "True"],
    "wic": ["False", "True"],
    "wsc": ["False", "True"],
}


def _str_label(obj: dict, names: list[str], labeled: bool) -> int | None:
    if not labeled and "label" not in obj:
        return None
    raw = get_field(obj, "label")
    if raw not in names:
        raise RowProblem(f"label {raw!r} not in {names}")
    return names.index(raw)


def _bool_label(obj: dict, labeled: bool) -> int | None:
    if not labeled and "label" not in obj:
        return None
    raw = get_field(obj, "label")
    if isinstance(raw, bool):
        return int(raw)
    if raw in (0, 1) and not isinstance(raw, float):
        return int(raw)
    if isinstance(raw, str) and raw.lower() in ("true", "false"):
        return int(raw.lower() == "true")
    raise RowProblem(f"label {raw!r} is not a boolean")


def _text(obj: dict, key: str) -> str:
    val = get_field(obj, key, str)
    if not val.strip():
        raise RowProblem(f"empty {key!r}")
    return val


def _nli(task: str) -> Callable[[dict, bool], list[dict]]:
    def rec(obj: dict, labeled: bool) -> list[dict]:
        return [{"idx": obj.get("idx"), "text": _text(obj, "premise"), "text_pair": _text(obj, "hypothesis"),
                 "label": _str_label(obj, LABEL_NAMES[task], labeled)}]
    return rec


def _boolq(obj: dict, labeled: bool) -> list[dict]:
    return [{"idx": obj.get("idx"), "text": _text(obj, "passage"), "text_pair": _text(obj, "question"),
             "label": _bool_label(obj, labeled)}]


def _copa(obj: dict, labeled: bool) -> list[dict]:
    q = get_field(obj, "question", str)
    if q not in ("cause", "effect"):
        raise RowProblem(f"question {q!r} is neither 'cause' nor 'effect'")
    premise = _text(obj, "premise")
    label = None
    if labeled or "label" in obj:
        label = get_field(obj, "label", int)
        if label not in (0, 1):
            raise RowProblem(f"label {label!r} not in [0, 1]")
    return [{"idx": obj.get("idx"), "text": f"{premise} What was the {q}?",
             "choices": [_text(obj, "choice1"), _text(obj, "choice2")], "label": label,
             "premise": premise, "question": q}]


def _multirc(obj: dict, labeled: bool) -> list[dict]:
    passage = get_field(obj, "passage", dict)
    text = _text(passage, "text")
    pidx = obj.get("idx")
    out = []
    questions = get_field(passage, "questions", list)
    if not questions:
        raise RowProblem("passage has no questions")
    for qi, q in enumerate(questions):
        question = _text(q, "question")
        qidx = q.get("idx", qi)
        answers = get_field(q, "answers", list)
        if not answers:
            raise RowProblem(f"question {qidx} has no answers")
        for ai, a in enumerate(answers):
            answer = get_field(a, "text", str)
            aidx = a.get("idx", ai)
            out.append({"idx": f"{pidx}-{qidx}-{aidx}", "group": f"{pidx}-{qidx}", "text": text,
                        "text_pair": f"{question} {answer}", "label": _bool_label(a, labeled)})
    return out


def _wic(obj: dict, labeled: bool) -> list[dict]:
    word = _text(obj, "word")
    return [{"idx": obj.get("idx"), "text": f"{word}: {_text(obj, 'sentence1')}", "text_pair": _text(obj, "sentence2"),
             "label": _bool_label(obj, labeled), "word": word}]


def _wsc(obj: dict, labeled: bool) -> list[dict]:
    tgt = get_field(obj, "target", dict)
    s1, s2 = _text(tgt, "span1_text"), _text(tgt, "span2_text")
    return [{"idx": obj.get("idx"), "text": _text(obj, "text"), "text_pair": f'"{s2}" refers to "{s1}"',
             "label": _bool_label(obj, labeled), "span1_text": s1, "span1_index": tgt.get("span1_index"),
             "span2_text": s2, "span2_index": tgt.get("span2_index")}]


ROW_FNS: dict[str, Callable[[dict, bool], list[dict]]] = {
    "cb": _nli("cb"), "rte": _nli("rte"), "boolq": _boolq, "copa": _copa, "multirc": _multirc, "wic": _wic, "wsc": _wsc,
}


def parse_jsonl_file(path: Path, task: str, labeled: bool) -> ParseResult:
    """Parse one SuperGLUE jsonl file; ``labeled=False`` allows a missing ``label`` (-> None)."""
    col = Collector(path)
    fn = ROW_FNS[task]
    for line_no, obj in iter_jsonl(path, col):
        try:
            recs = fn(obj, labeled)
        except RowProblem as exc:
            col.bad(line_no, str(exc))
            continue
        for r in recs:
            col.add(r)
    return col.result()


def make_reader(task: str):
    """Return ``reader(data_dir, split) -> ParseResult`` reading ``superglue/<Task>/<split>.jsonl``."""
    folder = FOLDERS[task]

    def reader(data_dir: Path, split: str) -> ParseResult:
        path = Path(data_dir) / "superglue" / folder / f"{split}.jsonl"
        return cached_parse(parse_jsonl_file, path, args=(task, split != "test"))

    reader.__name__ = f"read_superglue_{task}"
    return reader
