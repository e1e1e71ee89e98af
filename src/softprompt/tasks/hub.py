"""Fallback loading from the Hugging Face Hub through ``datasets`` (optional dependency).

``datasets`` is imported only when a Hub load is actually attempted. Rows are mapped onto the
same record layout as the offline readers. Known differences from the offline copies: the
FewGLUE ``train32``/``dev32`` files are not on the Hub (error); ARC-Challenge ``train`` on the Hub
has all 1,119 items (offline copy: 1,056), so its derived train/dev differ; HellaSwag contexts
keep the WikiHow markers the offline converter stripped.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import HubUnavailableError
from .readers_commonsense import arc_record
from .spec import TaskSpec


def _lab(x: Any) -> int | None:
    if x is None:
        return None
    x = int(x)
    return None if x < 0 else x


def _single(row: dict) -> dict:
    return {"idx": row.get("idx"), "text": row["sentence"], "text_pair": None, "label": _lab(row.get("label"))}


def _pair(a: str, b: str) -> Callable[[dict], dict]:
    return lambda row: {"idx": row.get("idx"), "text": row[a], "text_pair": row[b], "label": _lab(row.get("label"))}


def _stsb(row: dict) -> dict:
    lab = row.get("label")
    return {"idx": row.get("idx"), "text": row["sentence1"], "text_pair": row["sentence2"],
            "label": None if lab is None or float(lab) < 0 else float(lab)}


def _copa(row: dict) -> dict:
    return {"idx": row.get("idx"), "text": f"{row['premise']} What was the {row['question']}?",
            "choices": [row["choice1"], row["choice2"]], "label": _lab(row.get("label")),
            "premise": row["premise"], "question": row["question"]}


def _multirc(row: dict) -> dict:
    ix = row.get("idx") or {}
    p, q, a = ix.get("paragraph"), ix.get("question"), ix.get("answer")
    return {"idx": f"{p}-{q}-{a}", "group": f"{p}-{q}", "text": row["paragraph"],
            "text_pair": f"{row['question']} {row['answer']}", "label": _lab(row.get("label"))}


def _wic(row: dict) -> dict:
    return {"idx": row.get("idx"), "text": f"{row['word']}: {row['sentence1']}", "text_pair": row["sentence2"],
            "label": _lab(row.get("label")), "word": row["word"]}


def _wsc(row: dict) -> dict:
    s1, s2 = row["span1_text"], row["span2_text"]
    return {"idx": row.get("idx"), "text": row["text"], "text_pair": f'"{s2}" refers to "{s1}"',
            "label": _lab(row.get("label")), "span1_text": s1, "span1_index": row.get("span1_index"),
            "span2_text": s2, "span2_index": row.get("span2_index")}


def _agnews(row: dict) -> dict:
    return {"idx": None, "text": row["text"], "text_pair": None, "label": _lab(row["label"])}


def _conll(row: dict) -> dict:
    return {"idx": None, "tokens": list(row["tokens"]), "tags": [int(t) for t in row["ner_tags"]]}


def _arc(row: dict) -> dict:
    return arc_record(row)


def _obqa(row: dict) -> dict:
    labels = list(row["choices"]["label"])
    return {"idx": row.get("id"), "text": row["question_stem"], "choices": list(row["choices"]["text"]),
            "label": labels.index(row["answerKey"])}


def _piqa(row: dict) -> dict:
    return {"idx": None, "text": row["goal"], "choices": [row["sol1"], row["sol2"]], "label": _lab(row["label"])}


def _hellaswag(row: dict) -> dict:
    lab = row.get("label")
    return {"idx": row.get("ind"), "text": f"{row['activity_label']}: {row['ctx']}", "choices": list(row["endings"]),
            "label": None if lab in (None, "") else int(lab)}


def _winogrande(row: dict) -> dict:
    ans = str(row.get("answer", "")).strip()
    return {"idx": None, "text": row["sentence"], "choices": [row["option1"], row["option2"]],
            "label": int(ans) - 1 if ans in ("1", "2") else None}


MAPPERS: dict[str, Callable[[dict], dict]] = {
    "glue/cola": _single, "glue/sst2": _single, "glue/mrpc": _pair("sentence1", "sentence2"),
    "glue/rte": _pair("sentence1", "sentence2"), "glue/stsb": _stsb, "glue/wnli": _pair("sentence1", "sentence2"),
    "superglue/cb": _pair("premise", "hypothesis"), "superglue/rte": _pair("premise", "hypothesis"),
    "superglue/boolq": _pair("passage", "question"), "superglue/copa": _copa, "superglue/multirc": _multirc,
    "superglue/wic": _wic, "superglue/wsc": _wsc, "agnews": _agnews, "conll2003": _conll,
    "commonsense/arc_easy": _arc, "commonsense/arc_challenge": _arc, "commonsense/openbookqa": _obqa,
    "commonsense/piqa": _piqa, "commonsense/hellaswag": _hellaswag, "commonsense/winogrande": _winogrande,
}


def load_from_hub(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
    """Load one stored (non-derived) split of ``spec`` with ``datasets.load_dataset``.

    Raises:
        HubUnavailableError: ``datasets`` is not installed, the split has no Hub counterpart,
            or the download fails (e.g. offline).
    """
    if spec.hub is None or spec.name not in MAPPERS:
        raise HubUnavailableError(f"task {spec.name!r} has no Hugging Face Hub source")
    repo, config, split_map = spec.hub
    if split not in split_map:
        raise HubUnavailableError(
            f"split {split!r} of {spec.name!r} exists only in the offline data (no Hub counterpart); "
            "pass data_dir=... or set SOFTPROMPT_DATA_DIR to the shared data folder")
    try:
        import datasets  # noqa: F401  (optional dependency)
        from datasets import load_dataset
    except ImportError:
        raise HubUnavailableError(
            f"no local data found for {spec.name!r} and the optional dependency 'datasets' is not installed; "
            "pass data_dir=..., set SOFTPROMPT_DATA_DIR, or `pip install softprompt[hub]`") from None
    args = (repo,) if config is None else (repo, config)
    try:
        ds = load_dataset(*args, split=split_map[split])
    except Exception as exc:  # network errors, missing configs, ...
        raise HubUnavailableError(
            f"could not load {repo}{'/' + config if config else ''} split {split_map[split]!r} from the Hub "
            f"(offline? set HF_DATASETS_OFFLINE=0 and check the network, or use local data): {exc}") from exc
    fn = MAPPERS[spec.name]
    out = []
    for i, row in enumerate(ds):
        rec = fn(dict(row))
        if rec.get("idx") is None:
            rec["idx"] = i
        out.append(rec)
    return out


__all__ = ["MAPPERS", "load_from_hub"]
