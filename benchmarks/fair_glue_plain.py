"""The runs of ``fair_glue.py`` that do not go through ``softprompt.train``: stage 1's readout probe on frozen features,
and the LoRA and linear-probe rows (a plain Trainer with the same data, readout, seeds and budget)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
from fair_glue import CARVE, LR_SEED


# ---- stage 1: the readout ------------------------------------------------------------------------------------------
def choose_readout(model_name: str, task_list: list[str], out: Path, limit: int | None = None) -> dict:
    """Logistic regression on frozen features read by each readout, carved train -> carved dev; writes ``out``."""
    import torch

    from softprompt import tasks
    from softprompt.loading import load_base, load_tokenizer
    from softprompt.readout import READOUTS
    from softprompt.train import TrainConfig
    from softprompt.train.runner import task_records

    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores: dict = {}
    start = time.time()
    for task in task_list:
        spec = tasks.get_task(task)
        if spec.kind != "classification":
            continue
        cfg = TrainConfig(method="prompt", model=model_name, output="-", task=task, carve_dev=CARVE,
                          train_limit=limit, seed=LR_SEED)
        train_recs, eval_recs = task_records(cfg, "train")[0], task_records(cfg, "eval")[0]
        scores[task] = {}
        for readout in READOUTS:
            base, _ = load_base(model_name, spec, readout=readout)
            tok = load_tokenizer(model_name, is_decoder=False)
            backbone = getattr(base, base.base_model_prefix).to(device).eval()
            feats = [_features(backbone, tok, recs, device) for recs in (train_recs, eval_recs)]
            ys = [torch.tensor([r["label"] for r in recs]) for recs in (train_recs, eval_recs)]
            pred = _logistic(feats[0], ys[0].to(device), feats[1], len(spec.label_names))
            scores[task][readout] = 100 * tasks.compute_metrics(spec, pred.cpu().numpy(), ys[1].numpy())["main"]
        print(f"readout probe {task}: {scores[task]}", flush=True)
    means = {r: statistics.mean(s[r] for s in scores.values()) for r in READOUTS}
    choice = max(READOUTS, key=lambda r: (means[r], r == "pooler"))  # a tie keeps the model's own pooler
    result = {"choice": choice, "means": means, "scores": scores, "seconds": round(time.time() - start, 1),
              "protocol": f"logistic regression (full batch, AdamW 1e-2, 300 steps, standardised features) on "
                          f"frozen features, trained on the carved {1 - CARVE:.0%} of train, scored on the carved "
                          f"{CARVE:.0%}; the readout with the higher mean over the tasks is used by every method"}
    out.write_text(json.dumps(result, indent=1))
    return result


def _features(backbone, tok, recs, device):
    import torch

    out = []
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for i in range(0, len(recs), 256):
            chunk = recs[i: i + 256]
            pairs = [r.get("text_pair") for r in chunk]
            enc = tok([r["text"] for r in chunk], pairs if any(p is not None for p in pairs) else None,
                      truncation=True, max_length=128, padding=True, return_tensors="pt").to(device)
            out.append(backbone(**enc).pooler_output.float())
    return torch.cat(out)


def _logistic(x, y, x_eval, classes: int):
    import torch

    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    x, x_eval = (x - mu) / sd, (x_eval - mu) / sd
    g = torch.Generator(device=x.device).manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], classes).to(x.device)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, device=x.device) * 0.01)
        lin.bias.zero_()
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x), y).backward()
        opt.step()
    with torch.no_grad():
        return lin(x_eval).argmax(-1)


# ---- LoRA and the linear probe (plain Trainer, same data, readout, seeds and budget) --------------------------------
def train_plain(cfg, method: str, spec):
    """``(metrics, predictions, labels)`` of PEFT LoRA (r=8, all linear layers) or a head-only linear probe."""
    import torch
    from transformers import Trainer, TrainingArguments

    from softprompt.data import Collator, featurize
    from softprompt.loading import load_base, load_tokenizer
    from softprompt.train.evaluate import labelled, predictions_to_metrics
    from softprompt.train.runner import task_records
    from softprompt.train.trainer import ListDataset

    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model, is_decoder=False)
    base, _ = load_base(cfg.model, spec, head_seed=cfg.seed, readout=cfg.readout)
    if method == "probe":
        for n, p in base.named_parameters():
            p.requires_grad_(n.startswith("classifier"))
        model = base
    else:
        import peft

        torch.manual_seed(cfg.seed)  # LoRA's A matrices
        model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                                          target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_recs = [r for r in task_records(cfg, "train")[0] if labelled(r)]
    eval_recs = [r for r in task_records(cfg, "eval")[0] if labelled(r)]
    steps = int(np.ceil(len(train_recs) / cfg.batch_size) * cfg.epochs)
    args = TrainingArguments(
        output_dir=cfg.output, per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=256,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, warmup_steps=int(cfg.warmup_ratio * steps),
        seed=cfg.seed, data_seed=cfg.seed, bf16=cfg.bf16, save_strategy="no", report_to="none",
        remove_unused_columns=False, disable_tqdm=True, logging_steps=10_000, use_cpu=not torch.cuda.is_available())
    eval_ds = ListDataset(featurize(eval_recs, spec, tok, cfg.max_length))
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(featurize(train_recs, spec, tok,
                                                                                  cfg.max_length)),
                      eval_dataset=eval_ds, data_collator=Collator(tok, spec.kind))
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    out = trainer.predict(eval_ds)
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    preds = logits.reshape(-1) if spec.kind == "regression" else logits.argmax(-1)
    main = predictions_to_metrics(spec, logits, out.label_ids)["main"]
    metrics = {"steps": trainer.state.global_step, "train_seconds": round(seconds, 2), "trainable_params": trainable,
               "train_examples": len(train_recs), f"eval_{spec.metric}": main,
               "eval_split": f"carved {cfg.carve_dev}" if cfg.carve_dev else spec.eval_split}
    return metrics, np.asarray(preds), np.asarray(out.label_ids)
