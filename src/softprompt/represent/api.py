"""End-to-end entry points: represent a file, fit a probe on a target task, predict with a saved probe."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_json
from .features import FeatureSpec, Representer, save_features
from .probe import (
    ProbeConfig,
    Split,
    TaskInfo,
    _group_tensor,
    file_splits,
    fit_probe,
    load_probe,
    predictions,
    score,
    target_splits,
)


def read_texts(path: str | os.PathLike, text_column: str = "text",
               text_pair_column: str | None = None) -> list[tuple[str, str | None]]:
    """Texts of a .txt (one per line), .csv/.tsv or .jsonl/.json file."""
    from .. import tasks

    p = Path(path)
    if p.suffix.lower() == ".txt":
        with open(p, encoding="utf-8") as f:
            return [(line.rstrip("\n"), None) for line in f if line.strip()]
    recs, _ = tasks.load_file(p, text_column=text_column, text_pair_column=text_pair_column, label_column=None)
    return [(r["text"], r.get("text_pair")) for r in recs]


def represent_file(spec: FeatureSpec, input_path: str, out: str, *, text_column: str = "text",
                   text_pair_column: str | None = None, **representer_kw) -> dict[str, Any]:
    """Compute R(x) for every text of ``input_path`` and write ``out`` (safetensors). Returns a summary."""
    texts = read_texts(input_path, text_column, text_pair_column)
    rep = Representer(spec, **representer_kw)
    start = time.perf_counter()
    feats = rep.features(texts)
    save_features(out, feats, spec=spec, layout=rep.layout, texts=texts)
    return {"texts": len(texts), "dim": int(feats.shape[1]), "layout": rep.layout, "out": out,
            "seconds": round(time.perf_counter() - start, 2), "computed_blocks": rep.stats.blocks,
            "backbone_rows": rep.stats.rows, "backbone_calls": rep.stats.forward_calls}


def split_features(rep: Representer, splits: dict[str, Split]) -> dict[str, torch.Tensor]:
    """Features of every split in one request (one pass over the union; the cache dedupes repeats)."""
    names = list(splits)
    texts = [t for n in names for t in splits[n].texts]
    feats = rep.features(texts)
    out, at = {}, 0
    for n in names:
        k = len(splits[n].texts)
        out[n] = feats[at : at + k]
        at += k
    return out


def fit_and_score(info: TaskInfo, splits: dict[str, Split], feats: dict[str, torch.Tensor],
                  cfg: ProbeConfig) -> tuple[Any, dict[str, Any]]:
    """Fit on train (early stopping on dev) and report dev/test metrics."""
    tr, dv, te = splits["train"], splits["dev"], splits["test"]
    probe, hist = fit_probe(info, feats["train"], tr.labels, feats["dev"], dv.labels, cfg,
                            groups_train=tr.groups, groups_dev=dv.groups)
    xt, mt = _group_tensor(feats["test"], te.groups)
    xd, md = _group_tensor(feats["dev"], dv.groups)
    test = score(info, probe, xt, te.labels, mt)
    dev = score(info, probe, xd, dv.labels, md)
    metrics = {"task": info.name, "metric": info.metric, "main": test["main"], f"test_{info.metric}": test["main"],
               f"dev_{info.metric}": dev["main"], "test": test, "dev": dev, **hist}
    return probe, metrics


def run_probe(spec: FeatureSpec, output: str | None, *, task: str | None = None, file: str | None = None,
              eval_file: str | None = None, test_file: str | None = None, text_column: str = "text",
              text_pair_column: str | None = None, label_column: str = "label", data_dir: str | None = None,
              train_limit: int | None = None, dev_limit: int | None = None, test_limit: int | None = None,
              split_seed: int = 0, probe_cfg: ProbeConfig | None = None, representer: Representer | None = None,
              **representer_kw) -> dict[str, Any]:
    """Features for the target task's splits (cache first), a probe, ``metrics.json`` + the probe files."""
    from .probe import save_probe

    cfg = probe_cfg or ProbeConfig()
    if file:
        info, splits, how = file_splits(file, eval_file=eval_file, test_file=test_file, text_column=text_column,
                                        text_pair_column=text_pair_column, label_column=label_column,
                                        split_seed=split_seed)
    elif task:
        info, splits, how = target_splits(task, data_dir=data_dir, train_limit=train_limit, dev_limit=dev_limit,
                                          test_limit=test_limit, split_seed=split_seed)
    else:
        raise ValueError("give a registry task (--task) or a labelled file (--file)")
    rep = representer or Representer(spec, **representer_kw)
    start = time.perf_counter()
    feats = split_features(rep, splits)
    encode_seconds = time.perf_counter() - start
    probe, metrics = fit_and_score(info, splits, feats, cfg)
    entries = [e.task for e in rep.entries()] if spec.kind in ("concat", "joint") else []
    frozen_spec = dict(spec.to_dict(), entries=entries or spec.entries)
    metrics.update(features=frozen_spec, feature_dim=int(feats["train"].shape[1]), layout=rep.layout, splits=how,
                   classifier=cfg.classifier, seed=cfg.seed, encode_seconds=round(encode_seconds, 2),
                   computed_blocks=list(rep.stats.blocks))
    if output:
        # Pin the bank entries (and their hashes) the probe was fitted on: its input dimension depends on them.
        hashes = [e.sha256 for e in rep.entries()] if spec.kind in ("concat", "joint") else []
        save_probe(output, probe, info, cfg, frozen_spec, extra={"entry_sha256": hashes, "max_length": rep.max_length})
        atomic_write_json(Path(output) / "metrics.json", json.loads(json.dumps(metrics, default=float)))
    return metrics


def probe_predict(probe_dir: str, texts: Sequence[str], *, pairs: Sequence[str | None] | None = None,
                  choices: Sequence[str] | None = None, **representer_kw) -> list[dict[str, Any]]:
    """Predict with a saved probe: recompute R(x) for the texts (cache first) and apply the classifier.

    Multiple-choice probes take one question (``texts[0]``) and its ``choices``.
    """
    probe, info, meta = load_probe(probe_dir)
    spec = FeatureSpec.from_dict(meta["features"])
    if meta.get("max_length"):
        spec.max_length = int(meta["max_length"])
    rep = Representer(spec, **representer_kw)
    if spec.kind in ("concat", "joint"):
        from .bank import BankError

        have = {e.task: e.sha256 for e in rep.bank.entries()}  # type: ignore[union-attr]
        pinned = dict(zip(spec.entries or [], meta.get("entry_sha256", [])))
        changed = [t for t, h in pinned.items() if have.get(t) != h]
        if changed:
            raise BankError(f"bank prefixes {changed} were removed or retrained since probe {probe_dir} was fitted; "
                            "its input no longer exists: refit the probe (softprompt probe ...)")
    if info.kind == "multiple_choice":
        if not choices:
            raise ValueError("this probe is multiple choice: give --choice (repeatable) with one --text")
        x = rep.features([(texts[0], c) for c in choices])
        xg, mask = _group_tensor(x, [len(choices)])
        with torch.no_grad():
            s = probe(xg).squeeze(-1).masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, -1)[0]
        i = int(p.argmax())
        return [{"text": texts[0], "choice": choices[i], "label": i, "score": float(p[i])}]
    pairs = list(pairs) if pairs else [None] * len(texts)
    x = rep.features(list(zip(texts, pairs)))
    if info.kind == "regression":
        return [{"text": t, "score": float(v)} for t, v in zip(texts, predictions(info, probe, x))]
    with torch.no_grad():
        probs = torch.softmax(probe(x), -1)
    out = []
    for t, row in zip(texts, probs):
        i = int(row.argmax())
        label = info.label_names[i] if i < len(info.label_names) else i
        out.append({"text": t, "label": label, "score": float(row[i])})
    return out
