"""Training and evaluation through transformers' Trainer, with adapter-only checkpoints.

Distribution (torchrun / accelerate launch), resume, progress bars and logging come from the Trainer. We only
change what it saves and loads: the adapter (safetensors + JSON), never the frozen base model.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .. import resources, tasks
from ..errors import NonFiniteLossError
from ..io import atomic_write_json, read_adapter_tensors
from ..methods import config_from_dict
from ..model import SoftPromptModel
from .data import Collator, featurize, model_class_for

# Learning rates that work for each method with AdamW on small encoders (prompt-based methods need large ones).
DEFAULT_LR = {"prompt": 3e-2, "ptuning": 1e-3, "prefix": 1e-2, "lpt": 5e-3, "apt": 1e-2, "idspam": 1e-3}


@dataclass
class TrainConfig:
    """Everything ``softprompt train`` needs (CLI flags map 1:1 onto these fields)."""

    method: str
    model: str
    output: str
    task: str | None = None
    file: str | None = None
    eval_file: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    data_dir: str | None = None
    train_split: str | None = None  # registry split names; default: the task's train / eval split
    eval_split: str | None = None
    epochs: float = 3.0
    max_steps: int = -1
    lr: float | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 128
    train_limit: int | None = None
    eval_limit: int | None = None
    seed: int = 42
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    method_options: dict[str, Any] = field(default_factory=dict)
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    compile: str | None = None  # torch.compile mode for the training forward (e.g. "default", "reduce-overhead")
    save_steps: int | None = None
    eval_steps: int | None = None
    resume: bool = False
    strict: bool = False
    logging_steps: int = 50
    fsdp: str = ""
    report_to: str = "none"
    dataloader_workers: int = 0


# ---- model + data ------------------------------------------------------------------------------------------------
def load_tokenizer(model_name: str):
    from transformers import AutoTokenizer

    path = resources.resolve(model_name)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(model_name: str, spec, *, dtype=torch.float32):
    """The frozen base model with the head for ``spec.kind`` (num_labels from the task)."""
    from transformers import AutoConfig

    path = resources.resolve(model_name)
    config = AutoConfig.from_pretrained(path)
    is_decoder = bool(getattr(config, "is_decoder", False)) or config.model_type in DECODER_TYPES
    cls = model_class_for(spec.kind, is_decoder)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.kind in ("classification", "token_classification"):
        kwargs["num_labels"] = len(spec.label_names)
        kwargs["id2label"] = dict(enumerate(spec.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(spec.label_names)}
    elif spec.kind == "regression":
        kwargs.update(num_labels=1, problem_type="regression")
    torch.manual_seed(0)  # the head's initialisation is part of the experiment: make it reproducible
    model = cls.from_pretrained(path, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        tok = load_tokenizer(model_name)
        model.config.pad_token_id = tok.pad_token_id
    return model, is_decoder


DECODER_TYPES = {"llama", "gpt2", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "opt", "gpt_neox"}


def task_records(cfg: TrainConfig, split_role: str) -> tuple[list[dict], Any]:
    """Records of the train/eval role, from the registry (``--task``) or from user files (``--file``)."""
    if cfg.file:
        path = cfg.file if split_role == "train" else (cfg.eval_file or cfg.file)
        recs, spec = tasks.load_file(path, text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                                     label_column=cfg.label_column, strict=cfg.strict)
        return recs, spec
    spec = tasks.get_task(cfg.task)
    split = registry_split(cfg, spec, split_role)
    limit = cfg.train_limit if split_role == "train" else cfg.eval_limit
    if limit:
        return _limited(cfg, spec, split, limit), spec
    return tasks.load(cfg.task, split, cfg.data_dir, strict=cfg.strict), spec


def registry_split(cfg: TrainConfig, spec: Any, split_role: str) -> str:
    """The registry split of the train/eval role: ``--train-split``/``--eval-split``, else the task's own."""
    if split_role == "train":
        return cfg.train_split or spec.train_split
    return cfg.eval_split or spec.eval_split


def _limited(cfg, spec, split, limit):
    recs = tasks.load(cfg.task, split, cfg.data_dir, strict=cfg.strict)
    if limit >= len(recs):
        return recs
    # A seeded subsample (not the first rows: files are often sorted by label or source).
    idx = np.random.default_rng(cfg.seed).permutation(len(recs))[:limit]
    return [recs[i] for i in sorted(idx)]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


# ---- Trainer with adapter-only checkpoints ------------------------------------------------------------------------
class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch), identical on every rank.

    accelerate shards the *batches* of this sampler across ranks (rank r takes batches r, r+W, ...), so a step of
    W processes with batch b sees exactly the examples of one step of a single process with batch W*b: runs with the
    same global batch give the same adapter whatever the number of processes.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class AdapterTrainer(Trainer):
    """Saves and restores only the adapter (safetensors + JSON); stops on a non-finite loss."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return EpochShuffleSampler(len(dataset), self.args.data_seed or self.args.seed)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        unwrapped.save_pretrained(output_dir, **getattr(self, "adapter_metadata", {}))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model
        _load_adapter_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        _load_adapter_weights(self.model, self.state.best_model_checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {self.state.global_step + 1}; the last good checkpoint is kept "
                f"in {self.args.output_dir}. Lower the learning rate (--lr) or use bf16 instead of fp16."
            )
        return loss


def _load_adapter_weights(model: SoftPromptModel, folder: str) -> None:
    tensors = read_adapter_tensors(folder)
    model.method.import_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("method.")})
    for name in model.head_names:
        prefix = f"head.{name}."
        getattr(model.base_model, name).load_state_dict(
            {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


class _LossLogger(TrainerCallback):
    def __init__(self):
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs:
            self.history.append({"step": state.global_step, **logs})


# ---- public entry points -------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, spec):
    """Base model + tokenizer + wrapped method for a training run."""
    tokenizer = load_tokenizer(cfg.model)
    base, is_decoder = load_base(cfg.model, spec)
    if is_decoder:
        tokenizer.padding_side = "left"  # last-token heads and generation read the right end
    method_cfg = config_from_dict(cfg.method, dict(cfg.method_options))
    model = SoftPromptModel(base, method_cfg, tokenizer=tokenizer)
    return model, tokenizer


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


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one adapter; writes the adapter and ``metrics.json`` into ``cfg.output`` and returns the metrics."""
    torch.manual_seed(cfg.seed)
    train_recs, spec = task_records(cfg, "train")
    eval_recs, _ = task_records(cfg, "eval")
    model, tokenizer = build_model(cfg, spec)
    train_feats = featurize([r for r in train_recs if _labelled(r)], spec, tokenizer, cfg.max_length)
    eval_feats = featurize([r for r in eval_recs if _labelled(r)], spec, tokenizer, cfg.max_length)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.method, 1e-3)
    if cfg.fsdp and not torch.cuda.is_available():
        import warnings

        warnings.warn("--fsdp needs CUDA devices: on CPU the Trainer trains with DDP instead (same results, "
                      "parameters replicated on every process)", stacklevel=2)
    args = TrainingArguments(
        output_dir=cfg.output, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size, learning_rate=lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, weight_decay=cfg.weight_decay, warmup_steps=_warmup(cfg, len(train_feats)),
        seed=cfg.seed, data_seed=cfg.seed, bf16=cfg.bf16, fp16=cfg.fp16, logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        save_total_limit=2, eval_strategy="steps" if cfg.eval_steps else "no", eval_steps=cfg.eval_steps,
        report_to=cfg.report_to, remove_unused_columns=False, dataloader_num_workers=cfg.dataloader_workers,
        disable_tqdm=not _interactive(), fsdp=cfg.fsdp, use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        # Every method's forward traces into one graph (tests/test_engine.py); padding to the batch's longest row
        # gives a few distinct lengths, which torch.compile handles by recompiling once and then going dynamic.
        torch_compile=cfg.compile is not None, torch_compile_mode=cfg.compile,
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    logger = _LossLogger()
    trainer = AdapterTrainer(
        model=model, args=args, train_dataset=ListDataset(train_feats), eval_dataset=ListDataset(eval_feats),
        data_collator=Collator(tokenizer, spec.kind), callbacks=[logger],
        compute_metrics=lambda ev: predictions_to_metrics(spec, _first(ev.predictions), ev.label_ids),
    )
    trainer.adapter_metadata = _adapter_metadata(cfg, spec)
    start = time.time()
    resume = _last_checkpoint(cfg.output) if cfg.resume else None
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - start
    eval_metrics = trainer.evaluate()
    method_params, head_params, _ = model.num_parameters_summary()
    metrics = {
        **{k: _py(v) for k, v in eval_metrics.items()},
        f"eval_{spec.metric}": _py(eval_metrics.get(f"eval_{spec.metric}", eval_metrics.get("eval_main"))),
        "trainable_params": method_params + head_params, "method_params": method_params,
        "head_params": head_params, "train_seconds": round(train_seconds, 2), "method": cfg.method,
        "task": cfg.task or cfg.file, "model": cfg.model, "seed": cfg.seed, "lr": lr,
        "train_examples": len(train_feats), "eval_examples": len(eval_feats), "steps": trainer.state.global_step,
        "loss_history": logger.history[-20:],
    }
    if cfg.task:
        metrics["train_split"] = registry_split(cfg, spec, "train")
        metrics["eval_split"] = registry_split(cfg, spec, "eval")
    if trainer.is_world_process_zero():
        model.save_pretrained(cfg.output, **trainer.adapter_metadata)
        atomic_write_json(Path(cfg.output) / "metrics.json", metrics)
    return metrics


def evaluate(adapter: str, *, task: str | None = None, file: str | None = None, text_column: str = "text",
             text_pair_column: str | None = None, label_column: str = "label", split: str | None = None,
             data_dir: str | None = None, batch_size: int = 128, max_length: int | None = None,
             limit: int | None = None, base_model: str | None = None) -> dict[str, float]:
    """Score a saved adapter on a registry task split or a user's labelled file."""
    model, tokenizer, meta = load_for_inference(adapter, base_model)
    if file:
        recs, spec = tasks.load_file(file, text_column=text_column, text_pair_column=text_pair_column,
                                     label_column=label_column, label_names=meta.get("label_names"))
    else:
        task = task or meta.get("task")
        spec = tasks.get_task(task)
        recs = tasks.load(task, split or spec.eval_split, data_dir, limit=limit)
    feats = featurize([r for r in recs if _labelled(r)], spec, tokenizer, max_length or meta.get("max_length", 128))
    logits, labels = _run(model, feats, Collator(tokenizer, spec.kind), batch_size)
    return {f"eval_{k}": v for k, v in predictions_to_metrics(spec, logits, labels).items()}


def predict(adapter: str, texts: list[str], text_pairs: list[str] | None = None, batch_size: int = 64,
            base_model: str | None = None) -> list[dict]:
    """Predict labels for raw texts with a saved classification/regression adapter."""
    model, tokenizer, meta = load_for_inference(adapter, base_model)
    names = meta.get("label_names") or []
    kind = meta.get("task_kind", "classification")
    recs = [{"text": t, "text_pair": (text_pairs[i] if text_pairs else None)} for i, t in enumerate(texts)]
    spec = type("S", (), {"kind": kind})()
    feats = featurize(recs, spec, tokenizer, meta.get("max_length", 128))
    logits, _ = _run(model, feats, Collator(tokenizer, kind), batch_size)
    out = []
    for text, row in zip(texts, logits):
        if kind == "regression":
            out.append({"text": text, "score": float(row.reshape(-1)[0])})
        else:
            probs = torch.softmax(torch.tensor(row), -1).numpy()
            i = int(probs.argmax())
            out.append({"text": text, "label": names[i] if i < len(names) else i, "score": float(probs[i])})
    return out


def load_for_inference(adapter: str, base_model: str | None = None):
    """Rebuild base model, tokenizer and adapter from an adapter folder written by :func:`train`.

    ``base_model`` (alias, folder or Hub name) replaces the base recorded in the adapter, e.g. when the adapter was
    trained on another machine where the model lived elsewhere; the adapter is still checked against it.
    """
    from .. import load as load_adapter
    from ..io import read_adapter_config

    meta = read_adapter_config(adapter)
    model_name = base_model or meta.get("model_name") or meta["base_model"]["name_or_path"]
    if base_model is None and os.path.isabs(model_name) and not os.path.exists(model_name):
        raise FileNotFoundError(
            f"the base model recorded in {adapter} ({model_name}) does not exist on this machine; pass "
            f"--base-model PATH_OR_ALIAS (Python: base_model=...) with the same model"
        )
    spec = _SpecStub(meta.get("task_kind", "classification"), meta.get("label_names") or [])
    base, is_decoder = load_base(model_name, spec)
    tokenizer = load_tokenizer(model_name)
    if is_decoder:
        tokenizer.padding_side = "left"
    return load_adapter(base, adapter, tokenizer=tokenizer), tokenizer, meta


@dataclass
class _SpecStub:
    kind: str
    label_names: list


@torch.no_grad()
def _run(model, feats, collate, batch_size):
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


def _adapter_metadata(cfg: TrainConfig, spec) -> dict:
    return {"model_name": cfg.model, "task": cfg.task, "task_kind": spec.kind, "label_names": list(spec.label_names),
            "max_length": cfg.max_length}


def _labelled(r: dict) -> bool:
    return r.get("label") is not None or r.get("tags") is not None


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _py(v):
    return float(v) if isinstance(v, (np.floating, float)) else v


def _warmup(cfg: TrainConfig, n: int) -> int:
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(n / cfg.batch_size) * cfg.epochs
    return int(steps * cfg.warmup_ratio)


def _interactive() -> bool:
    return os.isatty(2)


def _last_checkpoint(output: str) -> str | None:
    """The newest *complete* checkpoint folder: a process killed while writing one leaves it incomplete, so we fall
    back to the one before (the Trainer writes ``trainer_state.json`` last; our adapter files are atomic)."""
    root = Path(output)
    if not root.is_dir():
        return None
    found = []
    for d in root.glob("checkpoint-*"):
        suffix = d.name.split("-", 1)[1]
        if d.is_dir() and suffix.isdigit():
            found.append((int(suffix), d))
    for _, d in sorted(found, reverse=True):
        try:
            json.loads((d / "trainer_state.json").read_text())
            read_adapter_tensors(d)
        except (OSError, ValueError):
            continue
        if (d / "optimizer.pt").exists() and (d / "scheduler.pt").exists():
            return str(d)
    return None
