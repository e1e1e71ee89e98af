"""Checkpoint zoo for Drag-and-Drop: one PEFT LoRA per dataset, all from one fixed initialisation.

Layout written by :func:`build_zoo` under ``out``::

    out/
      manifest.json
      init/                                  # the shared step-0 LoRA (PEFT folder; B = 0, A from init_seed)
        adapter_config.json
        adapter_model.safetensors
      <dataset with "/" -> "__">/            # e.g. commonsense__arc_easy
        step_000076/                         # one PEFT folder per kept optimiser step
          adapter_config.json
          adapter_model.safetensors
        ...

Training: LM loss on the answer only. ``format="cloze"`` (default): the gold option's cloze context (see
:mod:`.cloze`) is masked with -100 and its answer text is the target, the format the harness scores;
``format="letter"``: the :mod:`.templates` prompt and the gold letter + EOS. AdamW without weight decay; batches
from a seeded shuffle of the dataset's DnD ``zoo`` part (see :mod:`.harness`). ``warmup_steps`` optimiser steps run
first (nothing kept), then ``checkpoints`` kept checkpoints, one every ``checkpoint_every`` steps. The lr follows
``schedule`` over the whole run (``cosine`` or ``linear`` from ``lr`` down to ``min_lr_ratio``·lr at the last step,
or ``constant``), so the kept checkpoints lie on the decaying tail of training, as DnD's phase 2.
Every dataset restarts from the exact same LoRA weights (asserted) and a fresh optimiser.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .cloze import cloze_example, score_items, training_pairs
from .harness import (
    default_device,
    dnd_records,
    dnd_split_info,
    encode_item,
    evaluate_items,
    pad_id,
)
from .templates import canonical_name, format_dataset

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MANIFEST_VERSION = 1


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """``"all"`` -> the seven projections; ``"qv"`` -> q,v; else a comma list or a sequence of module names."""
    if isinstance(targets, str):
        t = targets.strip().lower()
        if t == "all":
            return list(ALL_TARGETS)
        if t == "qv":
            return ["q_proj", "v_proj"]
        return [x.strip() for x in targets.split(",") if x.strip()]
    return list(targets)


def dataset_dirname(name: str) -> str:
    """Folder name of a dataset inside the zoo (``commonsense/arc_easy`` -> ``commonsense__arc_easy``)."""
    return canonical_name(name).replace("/", "__")


def lr_factor(step: int, total: int, schedule: str = "cosine", min_ratio: float = 0.1) -> float:
    """lr multiplier of optimiser step ``step`` (1-based) out of ``total``: 1 at step 1, ``min_ratio`` at the last."""
    if schedule == "constant" or total <= 1:
        return 1.0
    prog = (step - 1) / (total - 1)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * prog
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * prog))
    raise ValueError(f"schedule={schedule!r}: use cosine, linear or constant")


def _train_examples(tokenizer: Any, items: Sequence[Any], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per item: prompt masked with -100, gold answer + EOS as targets."""
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for it in items:
        if it.gold < 0:
            continue
        p, answers = encode_item(tokenizer, it, max_prompt_tokens=max(max_length - 8, 1))
        a = list(answers[it.gold]) + ([int(eos)] if eos is not None else [])
        out.append((p + a, [-100] * len(p) + a))
    return out


def _batch(examples: Sequence[tuple[list[int], list[int]]], pad: int, device: Any) -> dict[str, Any]:
    """Left-padded batch with position ids skipping the padding. The loss reads only the answer tokens, which end
    every row, so the model computes logits for the last (longest answer + 1) positions alone (``logits_to_keep``,
    labels cut to match): the same loss without the full-vocabulary logits (and their log-softmax) of every prompt
    token. On the CPU a SmolLM2 step at 4 x ~650 tokens took 9.3 s instead of 14.6 s; memory falls less (37.4 to
    33.3 GiB saved for backward at BoolQ's batch of 32 x ~700 tokens), the fp32 activations being most of it."""
    n = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), n), pad, dtype=torch.long)
    lab = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, n - len(x):] = torch.tensor(x)
        lab[i, n - len(y):] = torch.tensor(y)
        mask[i, n - len(x):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    # The causal-LM loss shifts labels by one, so the first kept label must be a masked prompt token in every row.
    keep = min(n, 1 + max(sum(t != -100 for t in y) for _, y in examples))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": lab[:, n - keep:], "position_ids": pos}
    return {**{k: v.to(device) for k, v in batch.items()}, "logits_to_keep": keep}


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().cpu() for k, v in get_peft_model_state_dict(model).items()}


def build_zoo(model_name: str, datasets: Sequence[str], rank: int = 8, targets: str | Sequence[str] = "all",
              warmup_steps: int = 200, checkpoints: int = 50, out: str | Path = "zoo", *,
              lora_alpha: float | None = None, lr: float = 1e-4, checkpoint_lr: float | None = None,
              batch_size: int = 32, max_length: int = 512, init_seed: int = 42, data_seed: int = 0,
              train_limit: int | None = None, dev_limit: int | None = 50,
              eval_measures: Sequence[str] = ("loglik", "gen"), eval_batch_size: int = 16,
              device: str | None = None, dtype: torch.dtype | None = None, model: Any = None,
              tokenizer: Any = None, progress: bool = True, curve_steps: Sequence[int] = (),
              format: str = "cloze", checkpoint_every: int = 1, schedule: str = "cosine",
              min_lr_ratio: float = 0.1) -> dict[str, Any]:
    """Train one LoRA per dataset from a shared initialisation and keep ``checkpoints`` step checkpoints.

    Args:
        model_name: alias (``smollm2``) or HF folder; ignored for loading when ``model``/``tokenizer`` are given.
        datasets: registry or short names.
        rank: LoRA rank r (``lora_alpha`` defaults to 2r, as DnD's r=8/alpha=16).
        targets: ``"all"`` (q,k,v,o,gate,up,down), ``"qv"`` or module names.
        warmup_steps: optimiser steps run before the first kept checkpoint.
        checkpoints: consecutive steps kept per dataset (steps warmup+1 .. warmup+checkpoints).
        lr: peak AdamW lr; ``schedule`` (``cosine``/``linear``/``constant``) decays it to ``min_lr_ratio``·lr.
        checkpoint_lr: if given, the checkpoint phase runs at this constant lr instead (the old recipe).
        checkpoint_every: optimiser steps between kept checkpoints.
        format: ``cloze`` (answer text, the default) or ``letter`` (lettered prompt, see :mod:`.templates`).
        train_limit: use only the first ``train_limit`` records of the zoo part.
        dev_limit: records of the DnD ``dev`` part scored per checkpoint (None = all; 0 = no scoring): cloze
            ``acc``/``acc_norm`` in the cloze format, ``eval_measures`` in the letter format.
        init_seed: torch seed of the LoRA init, identical for every dataset.
        data_seed: seed of the batch order (per dataset: ``data_seed`` + dataset position).
        curve_steps: warm-up steps (<= ``warmup_steps``) also saved, as ``<dataset>/curve_<step>`` (a training
            curve for cost comparisons; listed in the dataset's ``curve`` entry, never in ``checkpoints``).

    Every kept checkpoint and curve point records ``train_seconds``: the cumulative time of the optimiser steps
    so far (forward, backward, update; CUDA-synchronised), excluding saving and scoring.

    Returns:
        The manifest dict (also written to ``out/manifest.json``).
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from .harness import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = device or default_device()
    if model is None or tokenizer is None:
        model, tokenizer = load_model(model_name, device=dev, dtype=dtype)
    model.to(dev)
    tmods = parse_targets(targets)
    alpha = float(lora_alpha if lora_alpha is not None else 2 * rank)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=tmods, bias="none",
                     task_type="CAUSAL_LM")
    torch.manual_seed(init_seed)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out / "init"))
    init_state = _lora_state(peft_model)
    pad = pad_id(tokenizer)
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION, "model": model_name, "rank": rank, "lora_alpha": alpha,
        "target_modules": tmods, "init_seed": init_seed, "init_path": "init", "warmup_steps": warmup_steps,
        "num_checkpoints": checkpoints, "lr": lr, "checkpoint_lr": checkpoint_lr if checkpoint_lr is not None else lr,
        "batch_size": batch_size, "max_length": max_length, "data_seed": data_seed, "train_limit": train_limit,
        "dev_limit": dev_limit, "eval_measures": list(eval_measures),
        "curve_steps": sorted(int(x) for x in curve_steps), "format": format, "checkpoint_every": checkpoint_every,
        "schedule": schedule, "min_lr_ratio": min_lr_ratio, "datasets": {}, "checkpoints": [],
    }
    for d_i, raw in enumerate(datasets):
        name = canonical_name(raw)
        t0 = time.time()
        set_peft_model_state_dict(peft_model, {k: v.to(dev) for k, v in init_state.items()})
        now = _lora_state(peft_model)
        assert all(torch.equal(now[k], init_state[k]) for k in init_state), "LoRA init differs across datasets"
        recs = dnd_records(name, "zoo")
        if train_limit is not None:
            recs = recs[:train_limit]
        dev_recs = dnd_records(name, "dev") if dev_limit != 0 else []
        dev_recs = dev_recs[:dev_limit] if dev_limit else dev_recs
        if format == "cloze":
            examples = training_pairs(tokenizer, [cloze_example(name, r) for r in recs], max_length)
            dev_items = [cloze_example(name, r) for r in dev_recs]
        elif format == "letter":
            examples = _train_examples(tokenizer, format_dataset(name, recs, tokenizer), max_length)
            dev_items = format_dataset(name, dev_recs, tokenizer)
        else:
            raise ValueError(f"format={format!r}: use cloze or letter")
        prep_seconds = time.time() - t0  # records, formatting, tokenisation (the stage's set-up, for profiling)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        rng = random.Random(data_seed + d_i)
        order: list[int] = []
        entry = {"dir": dataset_dirname(name), "splits": dnd_split_info(name), "n_zoo": len(examples),
                 "n_dev": len(dev_items), "checkpoints": [], "curve": []}
        train_seconds = save_seconds = 0.0
        cuda = torch.device(dev).type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        if cuda:  # this dataset's peak alone, in the stage profile: how many zoo workers fit on one card
            torch.cuda.reset_peak_memory_stats(dev)
        from tqdm.auto import tqdm

        total = warmup_steps + checkpoints * checkpoint_every
        curve = {int(x) for x in curve_steps}
        for step in tqdm(range(1, total + 1), desc=f"zoo {name}", disable=not progress, leave=False):
            for g in opt.param_groups:
                g["lr"] = (checkpoint_lr if checkpoint_lr is not None and step > warmup_steps
                           else lr * lr_factor(step, total, schedule, min_lr_ratio))
            batch_ex = []
            while len(batch_ex) < min(batch_size, len(examples)):
                if not order:
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                batch_ex.append(examples[order.pop()])
            peft_model.train()
            inputs = _batch(batch_ex, pad, dev)
            sync()
            t_step = time.perf_counter()
            loss = peft_model(**inputs).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            train_seconds += time.perf_counter() - t_step
            if step <= warmup_steps and step in curve:
                rel = f"{dataset_dirname(name)}/curve_{step:06d}"
                t_save = time.perf_counter()
                peft_model.save_pretrained(str(out / rel))
                save_seconds += time.perf_counter() - t_save
                entry["curve"].append({"step": step, "path": rel, "train_seconds": round(train_seconds, 4),
                                       "train_loss": float(loss.detach())})
            if step > warmup_steps and (step - warmup_steps) % checkpoint_every == 0:
                rel = f"{dataset_dirname(name)}/step_{step:06d}"
                t_save = time.perf_counter()
                peft_model.save_pretrained(str(out / rel))
                save_seconds += time.perf_counter() - t_save
                rec: dict[str, Any] = {"dataset": name, "step": step, "path": rel, "train_loss": float(loss.detach()),
                                       "train_seconds": round(train_seconds, 4), "lr": opt.param_groups[0]["lr"]}
                if dev_items and format == "cloze":
                    sc = score_items(peft_model, tokenizer, dev_items, eval_batch_size, max_length)
                    rec.update({k: sc[k] for k in ("acc", "acc_norm", "n")})
                elif dev_items:
                    sc = evaluate_items(peft_model, tokenizer, dev_items, eval_batch_size, eval_measures,
                                        progress=False)
                    rec.update({k: sc[k] for k in ("loglik_acc", "gen_acc", "gen_invalid", "n") if k in sc})
                manifest["checkpoints"].append(rec)
                entry["checkpoints"].append(rel)
        entry["seconds"] = round(time.time() - t0, 2)
        entry["train_seconds"] = round(train_seconds, 4)
        entry["prep_seconds"], entry["save_seconds"] = round(prep_seconds, 2), round(save_seconds, 2)
        entry["memory"] = {"peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)} if cuda else {}
        manifest["datasets"][name] = entry
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        del opt
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_manifest(zoo: str | Path) -> dict[str, Any]:
    """Read ``zoo/manifest.json``."""
    return json.loads((Path(zoo) / "manifest.json").read_text())
