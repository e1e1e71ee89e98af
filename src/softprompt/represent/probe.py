"""Target-task probes on frozen features: logistic regression or a one-hidden-layer MLP, early-stopped on dev.

Features are standardised with the training split's mean and standard deviation (stored in the probe), because
``concat`` stacks blocks from different prefixes whose scales differ. Task kinds:

* classification: softmax over the labels;
* regression: one output, MSE on standardised targets, metric from ``tasks.compute_metrics`` (Pearson for STS-B);
* multiple choice: each (question, choice) pair is one text with its own R(x); the probe scores every choice with
  the same scorer and a softmax runs over the choices (pairwise option scoring on top of R(x), spec section 5).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from .. import tasks
from ..errors import ConfigError
from ..io import atomic_save_tensors, atomic_write_json

CLASSIFIERS = ("logreg", "mlp")
PROBE_WEIGHTS = "probe.safetensors"
PROBE_CONFIG = "probe.json"


@dataclass
class ProbeConfig:
    """Classifier options. ``patience`` counts epochs without a dev improvement before stopping."""

    classifier: str = "logreg"
    hidden: int = 256
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 200
    patience: int = 15
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.classifier not in CLASSIFIERS:
            raise ConfigError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")


@dataclass
class TaskInfo:
    """What a probe needs to know about its task (a registry spec or a user file's)."""

    name: str
    kind: str
    label_names: list[str]
    metric: str
    metrics: list[str]

    @classmethod
    def from_spec(cls, spec) -> TaskInfo:
        return cls(spec.name, spec.kind, list(spec.label_names), spec.metric, list(spec.metrics))

    @property
    def outputs(self) -> int:
        return 1 if self.kind in ("regression", "multiple_choice") else len(self.label_names)

    def metric_spec(self):
        """A duck-typed spec for ``tasks.compute_metrics``."""
        return self


class Probe(nn.Module):
    """Standardisation + linear layer (logreg) or Linear-ReLU-Dropout-Linear (mlp)."""

    def __init__(self, dim: int, outputs: int, cfg: ProbeConfig):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("y_mean", torch.zeros(()))  # regression target standardisation
        self.register_buffer("y_std", torch.ones(()))
        if cfg.classifier == "mlp":
            self.net = nn.Sequential(nn.Linear(dim, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                     nn.Linear(cfg.hidden, outputs))
        else:
            self.net = nn.Sequential(nn.Linear(dim, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


# ---- data --------------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """Texts of one split: ``texts`` flat (a multiple-choice example contributes one text per choice)."""

    texts: list[tuple[str, str | None]]
    labels: list[Any]
    groups: list[int] | None = None  # multiple choice: number of choices of each example

    def __len__(self) -> int:
        return len(self.labels)


def records_to_split(records: list[dict], kind: str) -> Split:
    records = [r for r in records if r.get("label") is not None]
    if kind == "multiple_choice":
        texts, groups = [], []
        for r in records:
            texts += [(r["text"], c) for c in r["choices"]]
            groups.append(len(r["choices"]))
        return Split(texts, [int(r["label"]) for r in records], groups)
    return Split([(r["text"], r.get("text_pair")) for r in records], [r["label"] for r in records])


def _subsample(records: list, limit: int | None, seed: int) -> list:
    if not limit or limit >= len(records):
        return records
    idx = np.random.default_rng(seed).permutation(len(records))[:limit]
    return [records[i] for i in sorted(idx)]


def target_splits(task: str, *, data_dir: str | None = None, train_limit: int | None = None,
                  dev_limit: int | None = None, test_limit: int | None = None, dev_fraction: float = 0.1,
                  split_seed: int = 0) -> tuple[TaskInfo, dict[str, Split], dict]:
    """(task info, {"train","dev","test"} splits, a record of how they were made) for a registry task.

    Where the task's report split is its evaluation split (GLUE and SuperGLUE: the test sets are unlabelled), the
    dev split for early stopping is carved out of train (seeded, ``dev_fraction``) so that no model selection
    happens on the reported split.
    """
    spec = tasks.get_task(task)
    info = TaskInfo.from_spec(spec)
    train = [r for r in tasks.load_split(spec.name, spec.train_split, data_dir) if r.get("label") is not None]
    how: dict[str, Any] = {"task": spec.name, "split_seed": split_seed}
    if spec.test_split == spec.eval_split:
        perm = np.random.default_rng(split_seed).permutation(len(train))
        n_dev = max(16, round(dev_fraction * len(train)))
        dev = [train[i] for i in sorted(perm[:n_dev])]
        train = [train[i] for i in sorted(perm[n_dev:])]
        test = tasks.load_split(spec.name, spec.test_split, data_dir)
        how.update(train=f"{spec.train_split} minus dev", dev=f"{dev_fraction:.0%} of {spec.train_split} (seeded)",
                   test=spec.test_split)
    else:
        dev = tasks.load_split(spec.name, spec.eval_split, data_dir)
        test = tasks.load_split(spec.name, spec.test_split, data_dir)
        how.update(train=spec.train_split, dev=spec.eval_split, test=spec.test_split)
    train = _subsample(train, train_limit, split_seed)
    dev = _subsample([r for r in dev if r.get("label") is not None], dev_limit, split_seed + 1)
    test = _subsample([r for r in test if r.get("label") is not None], test_limit, split_seed + 2)
    splits = {k: records_to_split(v, spec.kind) for k, v in (("train", train), ("dev", dev), ("test", test))}
    how.update({f"n_{k}": len(v) for k, v in splits.items()})
    return info, splits, how


def file_splits(train_file: str, *, eval_file: str | None = None, test_file: str | None = None,
                text_column: str = "text", text_pair_column: str | None = None, label_column: str = "label",
                dev_fraction: float = 0.2, split_seed: int = 0) -> tuple[TaskInfo, dict[str, Split], dict]:
    """Splits from a user's labelled files; without ``eval_file`` a seeded dev split is cut from ``train_file``."""
    recs, spec = tasks.load_file(train_file, text_column=text_column, text_pair_column=text_pair_column,
                                 label_column=label_column)
    names = list(spec.label_names) or None

    def load(path: str) -> list[dict]:
        return tasks.load_file(path, text_column=text_column, text_pair_column=text_pair_column,
                               label_column=label_column, label_names=names)[0]

    if eval_file:
        dev = load(eval_file)
        train = recs
    else:
        perm = np.random.default_rng(split_seed).permutation(len(recs))
        n_dev = max(1, round(dev_fraction * len(recs)))
        dev = [recs[i] for i in sorted(perm[:n_dev])]
        train = [recs[i] for i in sorted(perm[n_dev:])]
    test = load(test_file) if test_file else dev
    info = TaskInfo.from_spec(spec)
    info.name = Path(train_file).name
    splits = {k: records_to_split(v, spec.kind) for k, v in (("train", train), ("dev", dev), ("test", test))}
    how = {"train": train_file, "dev": eval_file or f"{dev_fraction:.0%} of {train_file}", "test": test_file or "dev",
           **{f"n_{k}": len(v) for k, v in splits.items()}}
    return info, splits, how


# ---- fitting -----------------------------------------------------------------------------------------------------
def _targets(info: TaskInfo, labels: Sequence) -> torch.Tensor:
    if info.kind == "regression":
        return torch.tensor([float(y) for y in labels])
    return torch.tensor([int(y) for y in labels])


def _group_tensor(x: torch.Tensor, groups: list[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multiple choice: [sum C_i, d] -> [n, C_max, d] + a choice mask."""
    if groups is None:
        return x, None
    cmax = max(groups)
    out = x.new_zeros(len(groups), cmax, x.shape[1])
    mask = torch.zeros(len(groups), cmax, dtype=torch.bool)
    at = 0
    for i, c in enumerate(groups):
        out[i, :c] = x[at : at + c]
        mask[i, :c] = True
        at += c
    return out, mask


def _scores(probe: Probe, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if x.dim() == 2:
        return probe(x)
    s = probe(x).squeeze(-1)  # multiple choice: [n, C] choice scores
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def predictions(info: TaskInfo, probe: Probe, x: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    """Class ids, regression values (original scale) or chosen options."""
    probe.eval()
    with torch.no_grad():
        s = _scores(probe, x, mask)
    if info.kind == "regression":
        return (s.squeeze(-1) * probe.y_std + probe.y_mean).numpy()
    return s.argmax(-1).numpy()


def score(info: TaskInfo, probe: Probe, x: torch.Tensor, labels: Sequence, mask: torch.Tensor | None = None
          ) -> dict[str, float]:
    return tasks.compute_metrics(info, predictions(info, probe, x, mask), list(labels))


def fit_probe(info: TaskInfo, x_train: torch.Tensor, y_train: Sequence, x_dev: torch.Tensor, y_dev: Sequence,
              cfg: ProbeConfig, *, groups_train: list[int] | None = None, groups_dev: list[int] | None = None
              ) -> tuple[Probe, dict[str, Any]]:
    """Train with AdamW on minibatches; keep the epoch with the best dev main metric (the earliest on ties).

    Runs single-threaded: the matrices are small, and intra-op threads only add synchronisation overhead (which
    grows to seconds per fit on a busy machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(info, x_train, y_train, x_dev, y_dev, cfg, groups_train, groups_dev)
    finally:
        torch.set_num_threads(threads)


def _fit(info, x_train, y_train, x_dev, y_dev, cfg, groups_train, groups_dev):
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, x_dev = x_train.float(), x_dev.float()
    probe = Probe(x_train.shape[1], info.outputs, cfg)
    probe.mean.copy_(x_train.mean(0))
    probe.std.copy_(x_train.std(0).clamp(min=1e-6) if len(x_train) > 1 else torch.ones(x_train.shape[1]))
    y = _targets(info, y_train)
    if info.kind == "regression":
        probe.y_mean.fill_(float(y.mean()))
        probe.y_std.fill_(float(y.std().clamp(min=1e-6)) if len(y) > 1 else 1.0)
        y = (y - probe.y_mean) / probe.y_std
    xt, mt = _group_tensor(x_train, groups_train)
    xd, md = _group_tensor(x_dev, groups_dev)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, best_epoch, bad, history = -float("inf"), None, -1, 0, []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        probe.train()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            s = _scores(probe, xt[idx], None if mt is None else mt[idx])
            if info.kind == "regression":
                loss = nn.functional.mse_loss(s.squeeze(-1), y[idx])
            else:
                loss = nn.functional.cross_entropy(s, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        dev = score(info, probe, xd, y_dev, md)["main"]
        history.append(round(float(dev), 5))
        if dev > best + 1e-9:
            best, best_state, best_epoch, bad = dev, copy.deepcopy(probe.state_dict()), epoch, 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    probe.load_state_dict(best_state)  # type: ignore[arg-type]
    probe.eval()
    return probe, {"best_epoch": best_epoch, "epochs_run": len(history), "dev_main": float(best),
                   "dev_history": history[-50:], "fit_seconds": round(time.perf_counter() - start, 2)}


# ---- saving ------------------------------------------------------------------------------------------------------
def save_probe(path: str | os.PathLike, probe: Probe, info: TaskInfo, cfg: ProbeConfig, feature_spec: dict,
               extra: dict | None = None) -> None:
    """``probe.safetensors`` (weights + standardisation) and ``probe.json`` (task, config, feature spec)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(path / PROBE_WEIGHTS, dict(probe.state_dict()), metadata={"format": "pt"})
    dim = int(probe.mean.shape[0])
    atomic_write_json(path / PROBE_CONFIG, {"task": asdict(info), "probe": asdict(cfg), "features": feature_spec,
                                            "input_dim": dim, **(extra or {})})


def load_probe(path: str | os.PathLike) -> tuple[Probe, TaskInfo, dict]:
    """(probe, task info, the whole probe.json)."""
    path = Path(path)
    meta = json.loads((path / PROBE_CONFIG).read_text())
    info = TaskInfo(**meta["task"])
    cfg = ProbeConfig(**meta["probe"])
    probe = Probe(int(meta["input_dim"]), info.outputs, cfg)
    probe.load_state_dict(load_file(str(path / PROBE_WEIGHTS)))
    probe.eval()
    return probe, info, meta
