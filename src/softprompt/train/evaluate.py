"""Scoring a saved adapter on a task or a file, and predicting labels for raw texts."""

from __future__ import annotations

import numpy as np
import torch

from .. import tasks
from ..data import Collator, featurize
from ..errors import ConfigError
from ..io import read_adapter_config
from ..loading import load_for_inference
from ..postprocess import row_prediction


def predictions_to_metrics(spec, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Map head outputs to the task's metrics (argmax, regression value, or IOB2 tag sequences)."""
    if spec.kind == "regression":
        return tasks.compute_metrics(spec, logits.reshape(-1), labels.reshape(-1))
    if spec.kind == "token_classification":
        pred = logits.argmax(-1)
        p_seq, y_seq = [], []
        for p_row, y_row in zip(pred, labels):
            keep = y_row != -100
            p_seq.append([spec.label_names[i] for i in p_row[keep]])
            y_seq.append([spec.label_names[i] for i in y_row[keep]])
        return tasks.compute_metrics(spec, p_seq, y_seq)
    return tasks.compute_metrics(spec, logits.argmax(-1), labels)


def evaluate(adapter: str, *, task: str | None = None, file: str | None = None, text_column: str = "text",
             text_pair_column: str | None = None, label_column: str = "label", split: str | None = None,
             data_dir: str | None = None, batch_size: int = 128, max_length: int | None = None,
             limit: int | None = None, base_model: str | None = None) -> dict[str, float]:
    """Score a saved adapter on a registry task split or a user's labelled file."""
    if file:
        meta = read_adapter_config(adapter)
        recs, spec = tasks.load_file(file, text_column=text_column, text_pair_column=text_pair_column,
                                     label_column=label_column, label_names=meta.get("label_names"))
    else:
        meta = read_adapter_config(adapter)
        task = task or meta.get("task")
        if not task:
            raise ConfigError(f"{adapter} was not trained on a registry task: give --task NAME or --file F")
        spec = tasks.get_task(task)
        check_pairing(meta, spec, adapter)
        recs = tasks.load_split(task, split or spec.eval_split, data_dir, limit=limit)
    model, tokenizer, meta = load_for_inference(adapter, base_model)
    feats = featurize([r for r in recs if labelled(r)], spec, tokenizer, max_length or meta.get("max_length", 128))
    logits, labels = run_batches(model, feats, Collator(tokenizer, spec.kind), batch_size)
    return {f"eval_{k}": v for k, v in predictions_to_metrics(spec, logits, labels).items()}


def check_pairing(meta: dict, spec, adapter) -> None:
    """Refuse to score an adapter on a task whose outputs it does not produce: another task kind (regression vs
    classification) or another label set (count or names)."""
    kind = meta.get("task_kind") or "classification"
    if kind != spec.kind:
        raise ConfigError(f"{adapter} is a {kind} adapter and {spec.name} is a {spec.kind} task; score it on a "
                          f"{kind} task")
    names = [str(n) for n in meta.get("label_names") or []]
    want = [str(n) for n in spec.label_names or []]
    if kind in ("classification", "token_classification") and names and want and names != want:
        raise ConfigError(f"{adapter} predicts labels {names} but {spec.name} has labels {want}; score it on the "
                          "task it was trained for (or a task with the same labels)")


def predict(adapter: str, texts: list[str], text_pairs: list[str] | None = None, batch_size: int = 64,
            base_model: str | None = None) -> list[dict]:
    """Predict labels (or regression scores) for raw texts with a saved classification/regression adapter."""
    model, tokenizer, meta = load_for_inference(adapter, base_model)
    kind = meta.get("task_kind", "classification")
    recs = [{"text": t, "text_pair": (text_pairs[i] if text_pairs else None)} for i, t in enumerate(texts)]
    feats = featurize(recs, type("Kind", (), {"kind": kind})(), tokenizer, meta.get("max_length", 128))
    logits, _ = run_batches(model, feats, Collator(tokenizer, kind), batch_size)
    names = meta.get("label_names") or []
    return [{"text": text, **row_prediction(torch.from_numpy(row), kind, names)} for text, row in zip(texts, logits)]


@torch.no_grad()
def run_batches(model, feats, collate, batch_size):
    """Head outputs (and labels, when the features carry them) of ``feats`` in batches, as numpy arrays."""
    model.eval()
    logits, labels = [], []
    device = model.device
    for i in range(0, len(feats), batch_size):
        batch = collate(feats[i : i + batch_size])
        y = batch.pop("labels", None)
        out = model(**{k: v.to(device) for k, v in batch.items()})
        logits.append(out.logits.float().cpu().numpy())
        if y is not None:
            labels.append(y.numpy())
    if logits and logits[0].ndim == 3:  # token classification: pad to a common length
        width = max(x.shape[1] for x in logits)
        logits = [np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0))) for x in logits]
        labels = [np.pad(y, ((0, 0), (0, width - y.shape[1])), constant_values=-100) for y in labels]
    return np.concatenate(logits), (np.concatenate(labels) if labels else None)


def labelled(r: dict) -> bool:
    return r.get("label") is not None or r.get("tags") is not None


