"""Baselines table on the real MiniLM-L6 and the real GLUE data: our methods against PEFT and classic baselines.

Every run uses the same budget: max length 128, batch 32, AdamW with linear decay and 6% warm-up, a fixed number
of epochs per task, evaluation on the GLUE dev set after the last epoch (no model selection on dev).

    python benchmarks/baselines.py run --tasks glue/sst2 --methods prefix,peft_lora --seeds 1,2,3 \
        --model minilm --out benchmarks/results/runs --parallel 6
    python benchmarks/baselines.py table --out benchmarks/results/runs > benchmarks/results/baselines.md

``run`` starts one process per (task, method, seed) so that several small runs share one GPU; each writes
``<out>/<task>__<method>__<seed>.json``. ``table`` aggregates mean and std over seeds.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OURS = {"prompt", "ptuning", "prefix", "lpt", "apt", "idspam"}
# Variants of our methods: name -> (method, extra options).
VARIANTS = {"prefix_rand": ("prefix", {"init": "random"}), "prefix_shift": ("prefix", {"shift_positions": True}), "prompt_after_cls": ("prompt", {"position": "after_cls"})}
OTHERS = {"peft_lora", "peft_prefix", "peft_prompt", "peft_ptuning", "linear_probe", "full_ft"}
EPOCHS = {"glue/sst2": 3, "glue/rte": 20, "glue/mrpc": 10, "glue/cola": 5}
LR = {"peft_lora": 5e-4, "peft_prefix": 1e-2, "peft_prompt": 3e-2, "peft_ptuning": 1e-3, "linear_probe": 1e-3,
      "full_ft": 5e-5}
VIRTUAL_TOKENS = 20


def run_one(task: str, method: str, seed: int, model: str, out: str, bf16: bool, epochs: float | None) -> dict:
    """One training run; returns the metrics dict (also written to JSON)."""
    epochs = epochs or EPOCHS.get(task, 3)
    if method in OURS or method in VARIANTS:
        from softprompt.train.runner import TrainConfig, train

        base_method, extra = VARIANTS.get(method, (method, {}))
        opts = {} if base_method == "lpt" else {"num_virtual_tokens": VIRTUAL_TOKENS}
        opts.update(extra)
        cfg = TrainConfig(method=base_method, model=model, task=task, output=f"{out}/adapters/{_name(task, method, seed)}",
                          epochs=epochs, batch_size=32, max_length=128, seed=seed, bf16=bf16, method_options=opts,
                          logging_steps=200)
        metrics = train(cfg)
        metrics["method"] = method
    else:
        metrics = _run_other(task, method, seed, model, bf16, epochs)
    metrics.pop("loss_history", None)
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / f"{_name(task, method, seed)}.json", "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def _run_other(task, method, seed, model_name, bf16, epochs) -> dict:
    """PEFT LoRA / prefix / prompt / P-tuning, linear probe and full fine-tuning through a plain Trainer."""
    import torch
    from transformers import Trainer, TrainingArguments

    from softprompt import tasks
    from softprompt.train.data import Collator, featurize
    from softprompt.train.runner import ListDataset, load_base, load_tokenizer, predictions_to_metrics

    torch.manual_seed(seed)
    spec = tasks.get_task(task)
    tok = load_tokenizer(model_name)
    base, _ = load_base(model_name, spec)
    if method == "full_ft":
        model = base
    elif method == "linear_probe":
        for n, p in base.named_parameters():
            p.requires_grad_(n.startswith("classifier"))
        model = base
    else:
        import peft

        cfg = {
            "peft_lora": lambda: peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules="all-linear"),
            "peft_prefix": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=VIRTUAL_TOKENS),
            "peft_prompt": lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=VIRTUAL_TOKENS),
            "peft_ptuning": lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=VIRTUAL_TOKENS,
                                                             encoder_hidden_size=base.config.hidden_size),
        }[method]()
        model = peft.get_peft_model(base, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_recs = [r for r in tasks.load(task, spec.train_split) if r.get("label") is not None]
    eval_recs = [r for r in tasks.load(task, spec.eval_split) if r.get("label") is not None]
    n_train = len(train_recs)
    args = TrainingArguments(
        output_dir=f"/tmp/bl-{os.getpid()}", per_device_train_batch_size=32, per_device_eval_batch_size=128,
        learning_rate=LR[method], num_train_epochs=epochs, warmup_steps=int(0.06 * epochs * n_train / 32),
        seed=seed, data_seed=seed, bf16=bf16, save_strategy="no", report_to="none", remove_unused_columns=False,
        disable_tqdm=True, logging_steps=200,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(featurize(train_recs, spec, tok, 128)),
                      eval_dataset=ListDataset(featurize(eval_recs, spec, tok, 128)),
                      data_collator=Collator(tok, spec.kind),
                      compute_metrics=lambda ev: predictions_to_metrics(
                          spec, ev.predictions[0] if isinstance(ev.predictions, tuple) else ev.predictions,
                          ev.label_ids))
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    ev = trainer.evaluate()
    return {**{k: float(v) for k, v in ev.items() if isinstance(v, (int, float))},
            f"eval_{spec.metric}": float(ev[f"eval_{spec.metric}"]), "trainable_params": trainable,
            "train_seconds": round(seconds, 2), "method": method, "task": task, "model": model_name, "seed": seed,
            "lr": LR[method], "train_examples": n_train}


def _name(task: str, method: str, seed: int) -> str:
    return f"{task.replace('/', '_')}__{method}__{seed}"


def cmd_run(args) -> int:
    jobs = [(t, m, s) for t in args.tasks.split(",") for m in args.methods.split(",") for s in args.seeds.split(",")]
    todo = [j for j in jobs if not (Path(args.out) / f"{_name(*j[:2], int(j[2]))}.json").exists()]
    print(f"{len(todo)} of {len(jobs)} runs to do, {args.parallel} at a time", flush=True)

    def launch(job):
        t, m, s = job
        cmd = [sys.executable, __file__, "one", "--task", t, "--method", m, "--seed", s, "--model", args.model,
               "--out", args.out] + (["--bf16"] if args.bf16 else []) + (["--epochs", str(args.epochs)] if args.epochs else [])
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        status = "ok" if proc.returncode == 0 else "FAILED\n" + proc.stderr[-3000:]
        return f"{t} {m} seed {s}: {status} ({time.time() - start:.0f} s)"

    with cf.ThreadPoolExecutor(args.parallel) as pool:
        for line in pool.map(launch, todo):
            print(line, flush=True)
    return 0


def cmd_table(args) -> int:
    import statistics

    from softprompt import tasks

    rows: dict = {}
    for f in sorted(Path(args.out).glob("*.json")):
        m = json.loads(f.read_text())
        rows.setdefault((m["task"], m["method"]), []).append(m)
    order = ["prompt", "prompt_after_cls", "ptuning", "prefix", "prefix_rand", "prefix_shift", "lpt", "apt", "idspam", "peft_prompt", "peft_ptuning", "peft_prefix",
             "peft_lora", "linear_probe", "full_ft"]
    if args.header:
        print(Path(args.header).read_text())
    task_names = sorted({t for t, _ in rows}, key=lambda t: list(EPOCHS).index(t) if t in EPOCHS else 99)
    print("| task (metric) | method | score (mean ± std) | seeds | trainable params | train time (s) |")
    print("|---|---|---|---|---|---|")
    for task in task_names:
        metric = tasks.get_task(task).metric
        for method in order:
            runs = rows.get((task, method))
            if not runs:
                continue
            vals = [100 * r[f"eval_{metric}"] for r in runs]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            secs = statistics.mean(r["train_seconds"] for r in runs)
            print(f"| {task} ({metric}) | {method} | {statistics.mean(vals):.1f} ± {std:.1f} | {len(vals)} | "
                  f"{runs[0]['trainable_params']:,} | {secs:.0f} |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tasks", default="glue/sst2,glue/mrpc,glue/rte,glue/cola")
    r.add_argument("--methods", default="prompt,ptuning,prefix,lpt,peft_prompt,peft_ptuning,peft_prefix,peft_lora,"
                                        "linear_probe,full_ft")
    r.add_argument("--seeds", default="1,2,3")
    r.add_argument("--model", default="minilm")
    r.add_argument("--out", default="benchmarks/results/runs")
    r.add_argument("--parallel", type=int, default=4)
    r.add_argument("--bf16", action="store_true")
    r.add_argument("--epochs", type=float)
    o = sub.add_parser("one")
    o.add_argument("--task", required=True)
    o.add_argument("--method", required=True)
    o.add_argument("--seed", type=int, required=True)
    o.add_argument("--model", default="minilm")
    o.add_argument("--out", required=True)
    o.add_argument("--bf16", action="store_true")
    o.add_argument("--epochs", type=float)
    t = sub.add_parser("table")
    t.add_argument("--out", default="benchmarks/results/runs")
    t.add_argument("--header", help="markdown file printed before the table (device, versions, commands)")
    args = p.parse_args()
    if args.cmd == "one":
        run_one(args.task, args.method, args.seed, args.model, args.out, args.bf16, args.epochs)
        return 0
    return {"run": cmd_run, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
