"""The task registry: names, specs, :func:`load`, derived splits and a printable overview."""
from __future__ import annotations

import difflib
import functools
import json
import os
from pathlib import Path
from typing import Any

from . import readers_commonsense as rc
from . import readers_glue as rg
from . import readers_other as ro
from . import readers_superglue as rs
from ._io import finish
from .datadir import resolve_data_dir
from .errors import UnknownTaskError
from .spec import SplitDerivation, TaskSpec
from .splits import derive_indices

_GLUE_ALIASES = {"validation": "dev", "val": "dev"}
_GLUE_HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
_CLS_BIN = ("accuracy", "f1", "matthews_correlation")
_CLS_MULTI = ("accuracy", "macro_f1", "matthews_correlation")

_REGISTRY: dict[str, TaskSpec] = {}


def _register(spec: TaskSpec) -> None:
    _REGISTRY[spec.name] = spec


def _glue(task: str, title: str, counts: str, metric: str, metrics: tuple[str, ...]) -> None:
    cfg = rg.GLUE[task]
    regression = cfg.label_map is None
    _register(TaskSpec(
        name=f"glue/{task}", kind="regression" if regression else "classification",
        label_names=list(cfg.label_names), metric=metric, splits=("train", "dev", "test"),
        reader=rg.make_reader(task), train_split="train", eval_split="dev", test_split="dev",
        description=(f"GLUE {title}. glue/{cfg.folder}/{{train,dev,test}}.tsv: {counts}. "
                     "The test split is unlabeled (label None), so final numbers are reported on dev."),
        metrics=metrics, unlabeled_splits=("test",), split_aliases=dict(_GLUE_ALIASES),
        files={s: (f"glue/{cfg.folder}/{s}.tsv",) for s in ("train", "dev", "test")},
        hub=("nyu-mll/glue", task, dict(_GLUE_HUB_SPLITS)),
    ))


_glue("cola", "CoLA: single-sentence acceptability (unacceptable/acceptable)",
      "train 8,551 / dev 1,043 / test 1,063", "matthews_correlation", _CLS_BIN)
_glue("sst2", "SST-2: sentence sentiment (negative/positive); train holds phrases and sentences",
      "train 67,349 / dev 872 / test 1,821", "accuracy", _CLS_BIN)
_glue("mrpc", "MRPC: paraphrase pairs (not_equivalent/equivalent); main metric = mean of accuracy and F1",
      "train 3,667 (official 3,668) / dev 408 / test 1,725", "accuracy_f1_mean", ("accuracy", "f1", "accuracy_f1_mean"))
_glue("rte", "RTE: entailment pairs (entailment/not_entailment)", "train 2,490 / dev 277 / test 3,000",
      "accuracy", _CLS_BIN)
_glue("stsb", "STS-B: sentence-pair similarity, float score in [0, 5] (regression)",
      "train 5,749 / dev 1,500 / test 1,379", "pearson", ("pearson", "spearman", "pearson_spearman_mean", "mse"))
_glue("wnli", "WNLI: pronoun-resolution entailment pairs (not_entailment/entailment)",
      "train 635 / dev 71 / test 146", "accuracy", _CLS_BIN)


def _superglue(task: str, title: str, full: bool, metric: str = "accuracy", metrics: tuple[str, ...] = ("accuracy",),
               kind: str = "classification", note: str = "") -> None:
    folder = rs.FOLDERS[task]
    if full:
        splits = ("train", "val", "test", "train32", "dev32")
        train, ev, test = "train", "val", "val"
        aliases = {"dev": "val", "validation": "val"}
        hub_splits = {"train": "train", "val": "validation", "test": "test"}
        layout = (f"superglue/{folder}/{{train,val,test,train32,dev32}}.jsonl: full SuperGLUE train / val (dev) / "
                  "test (unlabeled: label None), plus the FewGLUE 32-shot train32 / dev32 (subsets of train)")
        unlabeled: tuple[str, ...] = ("test",)
    else:
        splits = ("train32", "dev32", "val")
        train, ev, test = "train32", "dev32", "val"
        aliases = {"train": "train32", "dev": "dev32", "validation": "val"}
        hub_splits = {"val": "validation"}
        layout = (f"superglue/{folder}/{{train32,dev32,val}}.jsonl: FewGLUE protocol: train on train32 (32), "
                  "select on dev32 (32), report on val (the SuperGLUE dev set); no full train split here")
        unlabeled = ()
    _register(TaskSpec(
        name=f"superglue/{task}", kind=kind, label_names=list(rs.LABEL_NAMES[task]), metric=metric, splits=splits,
        reader=rs.make_reader(task), train_split=train, eval_split=ev, test_split=test,
        description=f"SuperGLUE {title}. {layout}.{(' ' + note) if note else ''}",
        metrics=metrics, unlabeled_splits=unlabeled, split_aliases=aliases,
        files={s: (f"superglue/{folder}/{s}.jsonl",) for s in splits},
        hub=("aps/super_glue", "wsc.fixed" if task == "wsc" else task, hub_splits),
    ))


_superglue("cb", "CommitmentBank (entailment/contradiction/neutral): train 250 / val 56 / test 250", True,
           metrics=("accuracy", "macro_f1"))
_superglue("rte", "RTE (entailment/not_entailment): train 2,490 / val 277 / test 3,000; same examples as glue/rte",
           True, metrics=("accuracy", "f1"))
_superglue("boolq", "BoolQ yes/no questions (text = passage, text_pair = question): val 3,270", False,
           metrics=("accuracy", "f1"))
_superglue("copa", "COPA (multiple choice between 2 alternatives; text = premise + 'What was the cause/effect?'): "
           "val 100", False, kind="multiple_choice")
_superglue("multirc", "MultiRC flattened to one binary example per answer option (text = passage, text_pair = "
           "question + answer; `group` = passage-question id): val 83 passages / 953 questions / 4,848 options; "
           "main metric = answer-level F1 (F1a), exact match per question when groups are given", False,
           metric="f1", metrics=("f1", "accuracy", "exact_match"))
_superglue("wic", "WiC word sense (text = 'word: sentence1', text_pair = sentence2): val 638", False,
           metrics=("accuracy", "f1"))
_superglue("wsc", "WSC coreference (text = passage, text_pair = '\"span2\" refers to \"span1\"'): val 104",
           False, metrics=("accuracy", "f1"), note="FewGLUE train32 for WSC holds only true examples.")

_MC = ("accuracy",)

_register(TaskSpec(
    name="agnews", kind="classification", label_names=list(ro.AGNEWS_LABELS), metric="accuracy",
    splits=("train", "dev", "test", "full"), reader=ro.read_agnews,
    train_split="train", eval_split="dev", test_split="test",
    description=("AG News topic classification (World/Sports/Business/Sci/Tech); text = title + ' ' + description. "
                 "Only the official test set (agnews/test.csv, 7,600, 1,900 per class) is available, as split "
                 "`full`; train/dev/test are derived from it: stratified 80/10/10 by class, seed 0 "
                 "(1,520/190/190 per class = 6,080/760/760). Indices: derived_split_indices('agnews')."),
    metrics=("accuracy", "macro_f1"), split_aliases={"validation": "dev", "val": "dev"},
    derivation=SplitDerivation("full", (("train", 0.8), ("dev", 0.1), ("test", 0.1)), seed=0, stratify=True),
    files={"full": ("agnews/test.csv",)}, hub=("fancyzhx/ag_news", None, {"full": "test"}),
))

_register(TaskSpec(
    name="conll2003", kind="token_classification", label_names=list(ro.CONLL_TAGS), metric="f1",
    splits=("train", "dev", "test"), reader=ro.read_conll, train_split="train", eval_split="dev", test_split="test",
    description=("CoNLL-2003 English NER, IOB2 tags (PER/ORG/LOC/MISC, HF conll2003 tag order); records "
                 "{tokens, tags}; -DOCSTART- lines skipped. conll2003/{train,valid,test}.txt: 14,041 / 3,250 / "
                 "3,453 sentences. Main metric: entity-level micro F1 (conlleval chunking)."),
    metrics=("f1", "precision", "recall", "accuracy"),
    split_aliases={"valid": "dev", "validation": "dev", "val": "dev"},
    files={"train": ("conll2003/train.txt",), "dev": ("conll2003/valid.txt",), "test": ("conll2003/test.txt",)},
    hub=("eriktks/conll2003", None, {"train": "train", "dev": "validation", "test": "test"}),
))

_register(TaskSpec(
    name="commonsense/arc_easy", kind="multiple_choice", label_names=list("ABCDE"), metric="accuracy",
    splits=("train", "dev", "test"), reader=rc.read_arc_easy, train_split="train", eval_split="dev", test_split="test",
    description=("ARC-Easy science questions, 3-5 choices; numeric choice labels 1-4 mapped to A-D. "
                 "commonsense/arc_easy/{train,validation,test}.json: 2,251 / 570 / 2,376 (all labeled)."),
    metrics=_MC, split_aliases={"validation": "dev", "val": "dev"},
    files={"train": ("commonsense/arc_easy/train.json",), "dev": ("commonsense/arc_easy/validation.json",),
           "test": ("commonsense/arc_easy/test.json",)},
    hub=("allenai/ai2_arc", "ARC-Easy", {"train": "train", "dev": "validation", "test": "test"}),
))

_register(TaskSpec(
    name="commonsense/arc_challenge", kind="multiple_choice", label_names=list("ABCDE"), metric="accuracy",
    splits=("train", "dev", "test", "train_full"), reader=rc.read_arc_challenge,
    train_split="train", eval_split="dev", test_split="test",
    description=("ARC-Challenge science questions, 3-5 choices (extra `answer`/`response` fields ignored). "
                 "commonsense/arc_challenge/{train,test}.jsonl: train_full 1,056 (filtered from 1,119) / test 1,172; "
                 "no dev split, so train/dev are derived from train_full: 90/10, seed 0 (950 / 106)."),
    metrics=_MC, split_aliases={"validation": "dev", "val": "dev"},
    derivation=SplitDerivation("train_full", (("train", 0.9), ("dev", 0.1)), seed=0),
    files={"train_full": ("commonsense/arc_challenge/train.jsonl",), "test": ("commonsense/arc_challenge/test.jsonl",)},
    hub=("allenai/ai2_arc", "ARC-Challenge", {"train_full": "train", "test": "test"}),
))

_register(TaskSpec(
    name="commonsense/openbookqa", kind="multiple_choice", label_names=list("ABCD"), metric="accuracy",
    splits=("train", "dev", "test"), reader=rc.read_openbookqa, train_split="train", eval_split="dev",
    test_split="test",
    description=("OpenBookQA (Main), 4 choices parsed from '(A) .. (B) .. (C) .. (D) ..'; text = question stem; "
                 "open book not included. commonsense/openbookqa/{train,dev,test}.tsv: 4,957 / 500 / 500 "
                 "(all labeled)."),
    metrics=_MC, split_aliases={"validation": "dev", "val": "dev"},
    files={s: (f"commonsense/openbookqa/{s}.tsv",) for s in ("train", "dev", "test")},
    hub=("allenai/openbookqa", "main", {"train": "train", "dev": "validation", "test": "test"}),
))

_register(TaskSpec(
    name="commonsense/piqa", kind="multiple_choice", label_names=["sol1", "sol2"], metric="accuracy",
    splits=("train", "test", "full"), reader=rc.read_piqa, train_split="train", eval_split="test", test_split="test",
    description=("PIQA physical commonsense, 2 choices; text = goal. Only the validation set (valid.jsonl + "
                 "valid-labels.lst, 1,838) is available, as split `full`; train / test are derived from it: "
                 "50/50, seed 0 (919 / 919). There is no separate dev split (eval_split = test): "
                 "do no model selection on it."),
    metrics=_MC, split_aliases={"validation": "full", "val": "full"},
    derivation=SplitDerivation("full", (("train", 0.5), ("test", 0.5)), seed=0),
    files={"full": ("commonsense/piqa/valid.jsonl", "commonsense/piqa/valid-labels.lst")},
    hub=("ybisk/piqa", None, {"full": "validation"}),
))

_register(TaskSpec(
    name="commonsense/hellaswag", kind="multiple_choice", label_names=["0", "1", "2", "3"], metric="accuracy",
    splits=("train", "dev", "test", "full"), reader=rc.read_hellaswag, train_split="train", eval_split="dev",
    test_split="test",
    description=("HellaSwag sentence completion, 4 endings; text = 'activity_label: ctx' (WikiHow markers stripped). "
                 "Only the validation set (10,042 items, bz2 text) is available, as split `full`; train/dev/test "
                 "are derived from it: 80/10/10, seed 0 (8,034 / 1,004 / 1,004)."),
    metrics=_MC, split_aliases={"validation": "dev", "val": "dev"},
    derivation=SplitDerivation("full", (("train", 0.8), ("dev", 0.1), ("test", 0.1)), seed=0),
    files={"full": ("commonsense/hellaswag/hellaswag_val_full.txt.bz2",)},
    hub=("Rowan/hellaswag", None, {"full": "validation"}),
))

_register(TaskSpec(
    name="commonsense/winogrande", kind="multiple_choice", label_names=["option1", "option2"], metric="accuracy",
    splits=("train", "dev", "test", "full"), reader=rc.read_winogrande, train_split="train", eval_split="dev",
    test_split="test",
    description=("WinoGrande 1.1, 2 options; text = sentence with its '_' blank. Only the dev set (1,267) is "
                 "available, as split `full`; train/dev/test are derived from it: 80/10/10, seed 0 "
                 "(1,013 / 127 / 127)."),
    metrics=_MC, split_aliases={"validation": "dev", "val": "dev"},
    derivation=SplitDerivation("full", (("train", 0.8), ("dev", 0.1), ("test", 0.1)), seed=0),
    files={"full": ("commonsense/winogrande/dev.json",)},
    hub=("allenai/winogrande", "winogrande_xl", {"full": "validation"}),
))


# ---------------------------------------------------------------- lookup
def _normalize(name: str) -> str:
    s = str(name).strip().lower().replace("\\", "/")
    s = s.replace("super_glue/", "superglue/").replace("ag_news", "agnews")
    family, sep, task = s.rpartition("/")
    task = task.replace("-", "")
    return f"{family}{sep}{task}"


def get_task(name: str) -> TaskSpec:
    """Return the :class:`TaskSpec` registered as ``name``.

    Case, dashes (``glue/sst-2``) and a missing family prefix (``sst2``, when unambiguous) are
    tolerated.

    Raises:
        UnknownTaskError: listing close matches.
    """
    if isinstance(name, TaskSpec):
        return name
    if name in _REGISTRY:
        return _REGISTRY[name]
    s = _normalize(name)
    if s in _REGISTRY:
        return _REGISTRY[s]
    short = [n for n in _REGISTRY if n.rpartition("/")[2] == s]
    if "/" not in s and len(short) == 1:
        return _REGISTRY[short[0]]
    close = short + [m for m in difflib.get_close_matches(s, list(_REGISTRY), n=5, cutoff=0.6) if m not in short]
    if not close:
        close = [n for n in _REGISTRY if s and (s in n or n.rpartition("/")[2] in s)][:5]
    raise UnknownTaskError(str(name), close, known=list(_REGISTRY))


def list_tasks() -> list[TaskSpec]:
    """Every registered task, in registry order."""
    return list(_REGISTRY.values())


def describe_tasks() -> str:
    """A printable table of the registry: name, kind, #labels, splits, main metric.

    Splits marked ``*`` are unlabeled (label None); ``+`` marks splits derived deterministically
    from another split (see each spec's description).
    """
    rows = [("name", "kind", "#labels", "splits", "metric")]
    for spec in _REGISTRY.values():
        marks = []
        for s in spec.splits:
            m = s + ("*" if s in spec.unlabeled_splits else "") + ("+" if s in spec.derived_splits else "")
            marks.append(m)
        rows.append((spec.name, spec.kind, str(spec.num_labels), ", ".join(marks), spec.metric))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("* unlabeled (label None)   + derived deterministically (seed 0) from another split")
    return "\n".join(lines)


# ---------------------------------------------------------------- loading
def _load_stored(spec: TaskSpec, split: str, root: Path | None, strict: bool) -> list[dict[str, Any]]:
    if root is None:
        from .hub import load_from_hub

        return load_from_hub(spec, split)
    if spec.reader is None:
        raise ValueError(f"task {spec.name!r} has no reader")
    return finish(spec.reader(root, split), strict=strict, what=f"{spec.name} [{split}]")


@functools.lru_cache(maxsize=64)
def _derived_cached(name: str, n: int, labels: tuple | None, seed: int | None) -> dict[str, tuple[int, ...]]:
    spec = _REGISTRY[name]
    assert spec.derivation is not None
    out = derive_indices(name, n, spec.derivation, labels=labels, seed=seed)
    return {k: tuple(v) for k, v in out.items()}


def _derive(spec: TaskSpec, source: list[dict[str, Any]], seed: int | None = None) -> dict[str, list[int]]:
    assert spec.derivation is not None
    labels = tuple(r["label"] for r in source) if spec.derivation.stratify else None
    return {k: list(v) for k, v in _derived_cached(spec.name, len(source), labels, seed).items()}


def load_split(name: str, split: str, data_dir: str | os.PathLike[str] | None = None, *, strict: bool = False,
         limit: int | None = None) -> list[dict[str, Any]]:
    """Load one split of a registered task as a list of record dicts.

    Args:
        name: task name, e.g. ``"glue/sst2"`` (see :func:`list_tasks`).
        split: a split of the task (``spec.splits``) or an alias (``"validation"`` ...).
        data_dir: data folder; default: ``SOFTPROMPT_DATA_DIR``, else ``shared/data`` found beside
            the repository, else the Hugging Face Hub (``"hub"`` forces the Hub).
        strict: raise :class:`MalformedRowError` on the first malformed row instead of skipping
            malformed rows with one warning.
        limit: keep only the first ``limit`` records.

    Returns:
        Fresh record dicts (safe to mutate): classification ``{idx, text, text_pair, label}``,
        multiple choice ``{idx, text, choices, label}``, token classification ``{idx, tokens, tags}``;
        ``label`` is None on unlabeled splits.
    """
    spec = get_task(name)
    split = spec.canonical_split(split)
    root = resolve_data_dir(data_dir)
    if split in spec.derived_splits:
        assert spec.derivation is not None
        source = _load_stored(spec, spec.derivation.source, root, strict)
        records = [source[i] for i in _derive(spec, source)[split]]
    else:
        records = _load_stored(spec, split, root, strict)
    if limit is not None:
        records = records[: max(0, int(limit))]
    return records


def derived_split_indices(name: str, data_dir: str | os.PathLike[str] | None = None, *,
                          seed: int | None = None) -> dict[str, list[int]]:
    """Indices into ``load_split(name, spec.derivation.source)`` of each derived split (sorted ascending).

    ``seed`` overrides the registered seed (0); :func:`load` always uses the registered one.
    Tasks without derived splits return ``{}``.
    """
    spec = get_task(name)
    if spec.derivation is None:
        return {}
    source = _load_stored(spec, spec.derivation.source, resolve_data_dir(data_dir), False)
    return _derive(spec, source, seed)


def save_split_indices(name: str, path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the derived-split indices of ``name`` as JSON (to ``path``, or into it if it is a directory).

    Returns the file written. The JSON holds the task, source split, source size, seed, rule and indices.
    """
    spec = get_task(name)
    p = Path(path)
    if p.is_dir():
        p = p / f"split_indices_{spec.name.replace('/', '_')}.json"
    idx = derived_split_indices(spec.name, data_dir)
    d = spec.derivation
    payload = {
        "task": spec.name,
        "source_split": d.source if d else None,
        "n_source": sum(len(v) for v in idx.values()),
        "seed": d.seed if d else None,
        "stratify": d.stratify if d else None,
        "parts": dict(d.parts) if d else {},
        "rule": "rank source index i by sha256(f'{task}|{seed}|{i}'); cut consecutive chunks "
                "(held-out parts first, round(fraction*n) each; first part takes the rest); per label if stratified",
        "splits": idx,
    }
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=1))
    return p
