"""The multi-task baseline: fine-tune the whole encoder on the union of the source tasks, one linear head per task.

Following Du et al. (arXiv 2004.14287) and the spec: mixed batches drawn from the union of the (subsampled) source
training sets, a pooled representation (the same pooling as the probes read) feeding per-task heads, cross-entropy
for classification and MSE on standardised targets for regression (so STS-B's 0-5 scale does not dominate the sum).
The encoder is saved as a normal transformers folder, so its features go through the same cache and probes as the
bank's (``FeatureSpec(kind="encoder", encoder=DIR/encoder)``).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import tasks
from ..io import atomic_save_tensors, atomic_write_json
from .encoder import pool_features


@dataclass
class MultiTaskConfig:
    """Options of :func:`train_multitask`.

    tasks: registry source tasks (classification or regression), or paths of labelled user files (CSV/JSONL with
        ``text`` [, ``text_pair``] and ``label`` columns; these are also their own evaluation data).
    steps_per_task: optimiser steps per source task; the run takes ``steps_per_task * len(tasks)`` steps, which
        gives it the same step budget as training one prefix per task (``max_steps`` overrides the total).
    lr: AdamW learning rate for the encoder (heads use ``head_lr``).
    """

    tasks: list[str]
    output: str
    model: str = "minilm"
    steps_per_task: int = 1000
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 3e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_length: int = 128
    train_limit: int | None = None
    eval_limit: int | None = 1000
    pool: str = "cls"
    seed: int = 0
    data_dir: str | None = None
    bf16: bool = False
    device: str | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return int(self.max_steps) if self.max_steps else int(self.steps_per_task) * len(self.tasks)


def _subsample(records: list[dict], limit: int | None, seed: int) -> list[dict]:
    if not limit or limit >= len(records):
        return records
    idx = np.random.default_rng(seed).permutation(len(records))[:limit]
    return [records[i] for i in sorted(idx)]


def _source(task: str, data_dir: str | None) -> tuple[Any, list[dict], list[dict]]:
    """(spec, labelled train records, labelled eval records) of a registry task or a user file."""
    if os.path.isfile(task):
        import csv

        with open(task, encoding="utf-8") as f:
            head = f.readline()
        columns = head if task.endswith((".jsonl", ".json")) else next(csv.reader([head]))
        pair = "text_pair" if "text_pair" in columns else None
        recs, spec = tasks.load_file(task, text_column="text", text_pair_column=pair, label_column="label")
        return spec, recs, recs
    spec = tasks.get_task(task)
    if spec.kind not in ("classification", "regression"):
        raise ValueError(f"multi-task sources must be classification or regression tasks; {spec.name} is {spec.kind}")
    train = [r for r in tasks.load_split(spec.name, spec.train_split, data_dir) if r.get("label") is not None]
    ev = [r for r in tasks.load_split(spec.name, spec.eval_split, data_dir) if r.get("label") is not None]
    return spec, train, ev


class MultiTaskModel(nn.Module):
    """Encoder + one linear head per task on the pooled output."""

    def __init__(self, encoder: nn.Module, heads: dict[str, int], pool: str, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.drop = nn.Dropout(dropout)
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleList([nn.Linear(hidden, n) for n in heads.values()])

    def forward(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**enc).last_hidden_state
        return self.drop(pool_features(hidden, enc["attention_mask"], self.pool))


def train_multitask(cfg: MultiTaskConfig) -> dict[str, Any]:
    """Train and save ``<output>/encoder`` (transformers folder), ``heads.safetensors`` and ``metrics.json``."""
    from transformers import AutoModel, get_linear_schedule_with_warmup

    from .. import resources
    from ..loading import load_tokenizer

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = [_source(t, cfg.data_dir) for t in cfg.tasks]
    specs = [spec for spec, _, _ in loaded]
    tokenizer = load_tokenizer(cfg.model)
    # The union of sources: (task index, text, pair, label), with standardised regression targets.
    examples: list[tuple[int, str, str | None, float]] = []
    reg_stats: dict[int, tuple[float, float]] = {}
    for ti, spec in enumerate(specs):
        recs = _subsample(loaded[ti][1], cfg.train_limit, cfg.seed + ti)
        if spec.kind == "regression":
            ys = np.array([float(r["label"]) for r in recs])
            reg_stats[ti] = (float(ys.mean()), float(ys.std() or 1.0))
        examples += [(ti, r["text"], r.get("text_pair"), float(r["label"])) for r in recs]

    base = AutoModel.from_pretrained(resources.resolve(cfg.model), dtype=torch.float32)
    model = MultiTaskModel(base, {s.name: s.num_labels for s in specs}, cfg.pool).to(device).train()
    enc_params = list(model.encoder.parameters())
    head_params = list(model.heads.parameters())
    opt = torch.optim.AdamW([{"params": enc_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay)
    total = cfg.total_steps
    sched = get_linear_schedule_with_warmup(opt, int(total * cfg.warmup_ratio), total)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    use_bf16 = cfg.bf16 and device.type == "cuda"

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"multitask x{len(specs)}", disable=not cfg.progress, leave=False)
    start = time.perf_counter()
    losses: list[float] = []
    for step in range(total):
        if len(order) < cfg.batch_size:  # mixed batches: shuffled passes over the union of all sources
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        batch = [examples[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        enc = _tokenize(tokenizer, batch, cfg.max_length, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pooled = model(enc)
        pooled = pooled.float()
        task_ids = torch.tensor([b[0] for b in batch], device=device)
        loss = pooled.new_zeros(())
        for ti, spec in enumerate(specs):
            rows = (task_ids == ti).nonzero().flatten()
            if rows.numel() == 0:
                continue
            out = model.heads[ti](pooled[rows])
            ys = torch.tensor([batch[i][3] for i in rows.tolist()], device=device)
            if spec.kind == "regression":
                mu, sd = reg_stats[ti]
                part = nn.functional.mse_loss(out.squeeze(-1), (ys - mu) / sd, reduction="sum")
            else:
                part = nn.functional.cross_entropy(out, ys.long(), reduction="sum")
            loss = loss + part
        loss = loss / len(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"multi-task loss became {loss.item()} at step {step}; lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    metrics = {"tasks": list(cfg.tasks), "steps": total, "train_seconds": round(seconds, 2),
               "train_examples": len(examples), "final_loss": float(np.mean(losses[-20:])) if losses else None,
               "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}}
    metrics["eval"] = _evaluate(model, tokenizer, [(s, ev) for s, _, ev in loaded], reg_stats, cfg, device)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(out / "encoder")
    tokenizer.save_pretrained(out / "encoder")
    atomic_save_tensors(out / "heads.safetensors", {k: v for k, v in model.heads.state_dict().items()})
    atomic_write_json(out / "multitask.json", {"tasks": list(cfg.tasks), "num_labels": [s.num_labels for s in specs],
                                               "pool": cfg.pool, "regression_stats": reg_stats})
    atomic_write_json(out / "metrics.json", json.loads(json.dumps(metrics, default=float)))
    return metrics


def _tokenize(tokenizer, batch, max_length: int, device) -> dict[str, torch.Tensor]:
    firsts = [b[1] for b in batch]
    pairs = [b[2] for b in batch]
    has_pair = any(p is not None for p in pairs)
    enc = tokenizer(firsts, [p or "" for p in pairs] if has_pair else None, truncation=True, max_length=max_length,
                    padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@torch.no_grad()
def _evaluate(model, tokenizer, sources, reg_stats, cfg: MultiTaskConfig, device) -> dict[str, float]:
    """Main metric of each source task on its evaluation split, through the multi-task heads."""
    model.eval()
    out: dict[str, float] = {}
    for ti, (spec, recs) in enumerate(sources):
        recs = _subsample(recs, cfg.eval_limit, 0)
        preds = []
        for i in range(0, len(recs), 128):
            chunk = [(ti, r["text"], r.get("text_pair"), 0.0) for r in recs[i : i + 128]]
            logits = model.heads[ti](model(_tokenize(tokenizer, chunk, cfg.max_length, device)).float())
            preds.append(logits.cpu())
        p = torch.cat(preds)
        if spec.kind == "regression":
            mu, sd = reg_stats[ti]
            pred = (p.squeeze(-1) * sd + mu).numpy()
        else:
            pred = p.argmax(-1).numpy()
        out[spec.name] = tasks.compute_metrics(spec, pred, [r["label"] for r in recs])["main"]
    model.train()
    return out


def encoder_dir(output: str | os.PathLike) -> str:
    """The encoder folder written by :func:`train_multitask` (what ``FeatureSpec(kind='encoder')`` reads)."""
    return str(Path(output) / "encoder")

