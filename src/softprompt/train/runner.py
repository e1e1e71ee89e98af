"""``train(TrainConfig(...))``: one adapter trained through transformers' Trainer, with adapter-only checkpoints.

Distribution (torchrun / accelerate launch), resume, progress bars and logging come from the Trainer. We only
change what it saves and loads: the adapter (safetensors + JSON), never the frozen base model.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback

from .. import tasks
from ..data import Collator, featurize
from ..errors import ConfigError
from ..inductor import disable_mix_order_reduction
from ..io import atomic_write_json
from ..loading import load_base, load_tokenizer
from ..methods import config_from_dict, default_lr, method_classes
from ..model import SoftPromptModel
from .bucketing import CUDAGRAPHS, BucketCollator, decide_compile, length_buckets, length_is_dynamic, planned_steps
from .evaluate import labelled, predictions_to_metrics
from .guards import check_output, check_values, resume_point
from .trainer import AdapterTrainer, ListDataset, LossLogger, ProgressLines, StepClock


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
    seed: int = 42  # seeds everything: head, method init (unless method_options sets "seed"), data order, dropout
    readout: str = "pooler"  # what the classification head reads: "pooler" or "mean" (softprompt.readout.READOUTS)
    carve_dev: float = 0.0  # > 0: hold out this fraction of the train split and evaluate on it (model selection)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    method_options: dict[str, Any] = field(default_factory=dict)
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    # torch.compile mode of the training forward ("default", "reduce-overhead", ...), "auto" (CUDA graphs when the
    # planned steps pay for compiling, eager on CPU; the CLI's default) or None (eager)
    compile: str | None = None
    length_buckets: int = 4  # compiled runs pad each batch to one of this many lengths (0: to its longest row)
    # Drop each epoch's short last batch, as compiled runs always do: an eager run then trains on the same batches
    # as a compiled one (eager-against-compiled comparisons; benchmarks/train_compiled.py)
    full_batches: bool = False
    save_steps: int | None = None
    eval_steps: int | None = None
    resume: bool = False
    overwrite: bool = False  # an --output folder that is not empty: replace the adapter files in it
    strict: bool = False
    label_map: dict[str, Any] | None = None  # user files: rename label values before classes are inferred
    logging_steps: int = 50
    fsdp: str = ""
    report_to: str = "none"
    dataloader_workers: int = 0


def task_records(cfg: TrainConfig, split_role: str) -> tuple[list[dict], Any]:
    """Records of the train/eval role, from the registry (``--task``) or from user files (``--file``)."""
    if cfg.file:
        read = dict(text_column=cfg.text_column, text_pair_column=cfg.text_pair_column, label_column=cfg.label_column,
                    strict=cfg.strict, label_map=cfg.label_map)
        recs, spec = tasks.load_file(cfg.file, **read)
        if split_role == "eval" and cfg.eval_file:
            # The eval file's labels are read against the training file's label set, so ids mean the same thing.
            recs, _ = tasks.load_file(cfg.eval_file, **read, label_names=list(spec.label_names) or None)
        return recs, spec
    spec = tasks.get_task(cfg.task)
    split = registry_split(cfg, spec, split_role)
    limit = cfg.train_limit if split_role == "train" else cfg.eval_limit
    if cfg.carve_dev:
        recs = carve(cfg.task, tasks.load_split(cfg.task, registry_split(cfg, spec, "train"), cfg.data_dir,
                                                strict=cfg.strict), cfg.carve_dev)[split_role]
        if limit and limit < len(recs):
            idx = np.random.default_rng(cfg.seed).permutation(len(recs))[:limit]
            recs = [recs[i] for i in sorted(idx)]
        return recs, spec
    if limit:
        return _limited(cfg, spec, split, limit), spec
    return tasks.load_split(cfg.task, split, cfg.data_dir, strict=cfg.strict), spec


def registry_split(cfg: TrainConfig, spec: Any, split_role: str) -> str:
    """The registry split of the train/eval role: ``--train-split``/``--eval-split``, else the task's own."""
    if split_role == "train":
        return cfg.train_split or spec.train_split
    return cfg.eval_split or spec.eval_split


def carve(task: str, recs: list[dict], fraction: float) -> dict[str, list[dict]]:
    """``{"train": ..., "eval": ...}``: a fixed held-out part of a train split (hash order with seed 0, the same for
    every run seed and method), so that learning rates and readouts are chosen without the reported dev set."""
    from ..tasks.splits import hash_order

    order = hash_order(range(len(recs)), f"{task}|carve", 0)
    held = set(order[: max(1, round(fraction * len(recs)))])
    return {"train": [r for i, r in enumerate(recs) if i not in held],
            "eval": [r for i, r in enumerate(recs) if i in held]}


def _limited(cfg, spec, split, limit):
    recs = tasks.load_split(cfg.task, split, cfg.data_dir, strict=cfg.strict)
    if limit >= len(recs):
        return recs
    # A seeded subsample (not the first rows: files are often sorted by label or source).
    idx = np.random.default_rng(cfg.seed).permutation(len(recs))[:limit]
    return [recs[i] for i in sorted(idx)]


# ---- public entry points -------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, spec):
    """Base model + tokenizer + wrapped method for a training run."""
    base, is_decoder = load_base(cfg.model, spec, head_seed=cfg.seed, readout=cfg.readout)
    tokenizer = load_tokenizer(cfg.model, is_decoder=is_decoder)
    method_cfg = config_from_dict(cfg.method, seeded_options(cfg.method, cfg.method_options, cfg.seed))
    # Methods without a seed option would draw their init from the global RNG: seed it too.
    torch.manual_seed(cfg.seed)
    model = SoftPromptModel(base, method_cfg, tokenizer=tokenizer)
    return model, tokenizer


def seeded_options(method: str, options: dict, seed: int) -> dict:
    """The method options with the run's seed as the method's ``seed``, unless the user set one explicitly."""
    from dataclasses import fields

    out = dict(options)
    if "seed" not in out and any(f.name == "seed" for f in fields(method_classes(method)[0])):
        out["seed"] = seed
    return out


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one adapter; writes the adapter and ``metrics.json`` into ``cfg.output`` and returns the metrics."""
    check_values(cfg)
    check_output(cfg)
    check_device(cfg)
    torch.manual_seed(cfg.seed)
    train_recs, spec = task_records(cfg, "train")
    eval_recs, _ = task_records(cfg, "eval")
    model, tokenizer = build_model(cfg, spec)
    train_feats = featurize([r for r in train_recs if labelled(r)], spec, tokenizer, cfg.max_length)
    eval_feats = featurize([r for r in eval_recs if labelled(r)], spec, tokenizer, cfg.max_length)
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.method)
    compile_mode, collator = compiled_collation(cfg, model, Collator(tokenizer, spec.kind), train_feats)
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
        # Every method's forward traces into one graph (tests/test_engine.py); compiled runs pad to a few lengths.
        **compile_arguments(compile_mode),
        # Its per-step isnan/isinf test reads the loss back (a host sync every step, which undoes what CUDA graphs
        # gain); AdapterTrainer checks finiteness on the device and reads the result at logging and saving instead.
        logging_nan_inf_filter=False,
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    logger, clock = LossLogger(), StepClock()
    trainer = AdapterTrainer(
        model=model, args=args, train_dataset=ListDataset(train_feats), eval_dataset=ListDataset(eval_feats),
        data_collator=collator, callbacks=[logger, clock],
        compute_metrics=lambda ev: predictions_to_metrics(spec, _first(ev.predictions), ev.label_ids),
    )
    if not _interactive():  # plain flushed lines instead of the Trainer's buffered dicts
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(ProgressLines())
    trainer.adapter_metadata = _adapter_metadata(cfg, spec)
    trainer.dynamic_length = length_is_dynamic(compile_mode, len(getattr(collator, "buckets", ())))
    # One batch size: no recompilation at an epoch's end.
    trainer.full_batches_only = cfg.full_batches or compile_mode is not None
    start = time.time()
    resume = resume_point(cfg)
    with _static_shapes(compile_mode):
        trainer.train(resume_from_checkpoint=resume)
    trainer.check_finite()
    train_seconds = time.time() - start
    with _static_shapes(compile_mode):  # accelerate compiles the evaluation model too; its batches have own lengths
        eval_metrics = trainer.evaluate()
    method_params, head_params, _ = model.num_parameters_summary()
    metrics = {
        **{k: _py(v) for k, v in eval_metrics.items()},
        f"eval_{spec.metric}": _py(eval_metrics.get(f"eval_{spec.metric}", eval_metrics.get("eval_main"))),
        "trainable_params": method_params + head_params, "method_params": method_params,
        "head_params": head_params, "train_seconds": round(train_seconds, 2), "method": cfg.method,
        "task": cfg.task or cfg.file, "model": cfg.model, "seed": cfg.seed, "lr": lr,
        "method_seed": getattr(model.method_config, "seed", None), "readout": cfg.readout,
        "carve_dev": cfg.carve_dev,
        "train_examples": len(train_feats), "eval_examples": len(eval_feats), "steps": trainer.state.global_step,
        "compile": compile_mode, "length_buckets": list(getattr(collator, "buckets", ())),
        "loss_history": logger.history[-20:], **clock.summary(),
    }
    if cfg.task:
        metrics["train_split"] = registry_split(cfg, spec, "train")
        metrics["eval_split"] = registry_split(cfg, spec, "eval")
        if cfg.carve_dev:
            metrics["eval_split"] = f"carved {cfg.carve_dev} of {metrics['train_split']}"
    if trainer.is_world_process_zero():
        model.save_pretrained(cfg.output, **trainer.adapter_metadata)
        atomic_write_json(Path(cfg.output) / "metrics.json", metrics)
    return metrics


def _static_shapes(compile_mode: str | None):
    """cudagraphs: a static graph per shape, so Dynamo must not turn a length dynamic on its own (the cudagraphs
    backend replays one recording per graph, at the recorded shape); other modes: nothing to change."""
    if compile_mode == CUDAGRAPHS:
        return torch._dynamo.config.patch(automatic_dynamic_shapes=False)
    return contextlib.nullcontext()


def check_device(cfg: TrainConfig) -> None:
    """Checks of the machine, before anything loads (``check_values`` holds those independent of it)."""
    if cfg.compile == CUDAGRAPHS and not torch.cuda.is_available():
        raise ConfigError("--compile cudagraphs needs a CUDA device (CUDA graphs); on CPU use --compile default or off")


def compile_arguments(mode: str | None) -> dict[str, Any]:
    """The Trainer's torch.compile arguments for a compile mode: Inductor's modes, or ``cudagraphs`` (Dynamo and AOT
    autograd capture the step, CUDA graphs replay it, and no code is generated: compiling takes seconds, not the tens
    of seconds Inductor takes, and the kernels are eager's, unfused)."""
    if mode is None:
        return {"torch_compile": False}
    if mode == CUDAGRAPHS:
        return {"torch_compile": True, "torch_compile_backend": "cudagraphs"}
    return {"torch_compile": True, "torch_compile_backend": "inductor", "torch_compile_mode": mode}


def compiled_collation(cfg: TrainConfig, model: SoftPromptModel, collator: Collator, feats: list[dict]
                       ) -> tuple[str | None, Any]:
    """The torch.compile mode of this run (``--compile auto`` resolved and its decision printed in one line) and
    the collator: compiled runs pad each batch to one of ``cfg.length_buckets`` lengths, so graphs are reused. A
    compiled run also turns Inductor's mix-order reduction off before anything compiles (:mod:`..inductor`)."""
    if cfg.compile is None:
        return None, collator
    lengths = [max(map(len, f["input_ids"])) if f["input_ids"] and isinstance(f["input_ids"][0], list)
               else len(f["input_ids"]) for f in feats]
    limit = model.info.max_positions
    cap = None if limit is None else limit - model.method.insertion_length() - model.method.position_shift()
    buckets = length_buckets(lengths, cfg.batch_size, cfg.length_buckets, cap=cap, seed=cfg.seed) \
        if cfg.length_buckets and lengths else ()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = planned_steps(len(feats), cfg.batch_size, cfg.epochs, cfg.max_steps, world)
    mode, reason = decide_compile(cfg.compile, steps, max(len(buckets), 1), torch.cuda.is_available())
    if cfg.compile == "auto" and int(os.environ.get("RANK", "0")) == 0:
        print(f"softprompt train: {reason}", flush=True)
    if mode is not None:
        disable_mix_order_reduction()  # known wrong gradients in compiled backward reductions (..inductor)
    if mode is None or not buckets:
        return mode, collator
    return mode, BucketCollator(collator, buckets, left=model.info.is_causal and _runs_on_embeddings(model))


def _runs_on_embeddings(model: SoftPromptModel) -> bool:
    """Whether the method puts a prompt in front of the input embeddings (the base model then gets no token ids)."""
    from ..methods import MethodInputs

    ids = torch.ones(1, 2, dtype=torch.long, device=model.device)
    with torch.no_grad():
        return model.method(MethodInputs(ids, ids, model.base_model.get_input_embeddings(), 1)).input_prompt is not None


def _adapter_metadata(cfg: TrainConfig, spec) -> dict:
    return {"model_name": cfg.model, "task": cfg.task, "task_kind": spec.kind, "label_names": list(spec.label_names),
            "max_length": cfg.max_length, "seed": cfg.seed, "readout": cfg.readout}


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _py(v):
    return float(v) if isinstance(v, (np.floating, float)) else v


def _warmup(cfg: TrainConfig, n: int) -> int:
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(n / cfg.batch_size) * cfg.epochs
    return int(steps * cfg.warmup_ratio)


def _interactive() -> bool:
    return os.isatty(2)


