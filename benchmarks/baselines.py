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
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

OURS = {"prompt", "ptuning", "prefix", "lpt", "apt", "idspam"}
# Variants of our methods: name -> (method, extra options). "<idspam|lpt>_L<m>" (insertion layer m) and "pt2star"
# (prefix tuning with APT-derived per-layer lengths) are parsed in method_of().
VARIANTS = {"prefix_rand": ("prefix", {"init": "random"}), "prefix_shift": ("prefix", {"shift_positions": True}),
            "prompt_after_cls": ("prompt", {"position": "after_cls"}),
            "idspam_meanpool": ("idspam", {"pooling": "mean"})}
OTHERS = {"peft_lora", "peft_prefix", "peft_prompt", "peft_ptuning", "linear_probe", "full_ft"}
EPOCHS = {"glue/sst2": 3, "glue/rte": 20, "glue/mrpc": 10, "glue/cola": 5, "glue/stsb": 5, "superglue/cb": 30,
          "conll2003": 3}
TRAIN_SIZES = {"glue/sst2": 67349, "glue/rte": 2490, "glue/mrpc": 3668, "glue/cola": 8551, "glue/stsb": 5749,
               "superglue/cb": 250, "conll2003": 14041}
# "<task>@fewshot": the FewGLUE protocol: train on the 32-example train32 file, evaluate on the SuperGLUE dev set.
FEWSHOT = "@fewshot"
FEWSHOT_EPOCHS = 100  # 32 examples in one batch of 32: 100 steps
LR = {"peft_lora": 5e-4, "peft_prefix": 1e-2, "peft_prompt": 3e-2, "peft_ptuning": 1e-3, "linear_probe": 1e-3,
      "full_ft": 5e-5}
VIRTUAL_TOKENS = 20  # prompt, P-tuning, prefix and APT; LPT and ID-SPAM keep their default t=10 (same t, same m)
PT2_BUDGET = 60  # PT-2*: total prefix tokens over all layers (APT and prefix tuning use 20 x 6 = 120 on MiniLM)
PT2_SOURCE_SEED = 1  # PT-2* lengths come from the gates of this seed's APT run

GLUE4 = ["glue/sst2", "glue/mrpc", "glue/rte", "glue/cola"]
APT_TASKS = ["glue/rte", "glue/mrpc", "glue/cola", "glue/sst2", "superglue/cb", "conll2003"]
FEWGLUE = [f"superglue/{t}{FEWSHOT}" for t in ("boolq", "cb", "copa", "rte", "wic", "wsc")]
IDSPAM_TASKS = ["glue/sst2", "glue/mrpc", "glue/rte", "glue/cola", "glue/stsb", "superglue/cb"]


def suite(name: str) -> list[tuple[str, str]]:
    """(task, method) pairs of a named suite, in launch order (long runs first so that they do not finish last)."""
    if name == "core":
        pairs = [(t, m) for t in GLUE4 for m in ("prompt", "ptuning", "prefix", "lpt", "peft_lora", "linear_probe",
                                                  "full_ft")]
        return [("glue/sst2", "prefix_shift")] + pairs
    if name == "apt":
        return ([(t, m) for t in APT_TASKS for m in ("apt", "prefix")] + [(t, m) for t in FEWGLUE for m in
                ("apt", "prefix")] + [(t, "pt2star") for t in APT_TASKS])
    if name == "idspam":
        return [(t, m) for t in IDSPAM_TASKS for m in ("idspam", "prompt", "ptuning", "lpt", "peft_lora",
                                                      "idspam_meanpool")]
    if name == "sweep":
        return [(t, f"{m}_L{layer}") for t in ("glue/rte", "glue/mrpc") for m in ("idspam", "lpt")
                for layer in range(6)]
    raise SystemExit(f"unknown suite {name!r}: core, apt, idspam, sweep")


def method_of(method: str) -> tuple[str, dict]:
    """Our method name and options of a (variant) method name."""
    m = re.fullmatch(r"(idspam|lpt)_L(\d+)", method)
    if m:
        return m.group(1), {"layer": int(m.group(2))}
    if method == "pt2star":
        return "prefix", {}
    return VARIANTS.get(method, (method, {}))


def split_task(task: str) -> tuple[str, dict]:
    """Registry task name and TrainConfig split options of a task key (``superglue/cb@fewshot``)."""
    if task.endswith(FEWSHOT):
        return task[: -len(FEWSHOT)], {"train_split": "train32", "eval_split": "val"}
    return task, {}


def epochs_of(task: str) -> float:
    return FEWSHOT_EPOCHS if task.endswith(FEWSHOT) else EPOCHS.get(task, 3)


def estimated_steps(task: str) -> int:
    n = 32 if task.endswith(FEWSHOT) else TRAIN_SIZES.get(task, 10000)
    return int(math.ceil(n / 32) * epochs_of(task))


def run_one(task: str, method: str, seed: int, model: str, out: str, bf16: bool, epochs: float | None,
            model_label: str | None = None) -> dict:
    """One training run; returns the metrics dict (also written to JSON). ``model_label`` is what the JSON records
    as the model (e.g. the repo-relative ``.carry/minilm`` when ``model`` is a scratch folder of a GPU machine)."""
    epochs = epochs or epochs_of(task)
    if method in OURS or method in VARIANTS or method == "pt2star" or re.fullmatch(r"(idspam|lpt)_L\d+", method):
        from softprompt.train import TrainConfig, train

        base_method, extra = method_of(method)
        opts = {} if base_method in ("lpt", "idspam") else {"num_virtual_tokens": VIRTUAL_TOKENS}
        opts.update(extra)
        if method == "pt2star":
            opts = {"layer_lengths": pt2_lengths(task, out)}
        registry_task, splits = split_task(task)
        cfg = TrainConfig(method=base_method, model=model, task=registry_task,
                          output=f"{out}/adapters/{_name(task, method, seed)}",
                          epochs=epochs, batch_size=32, max_length=128, seed=seed, bf16=bf16, method_options=opts,
                          logging_steps=200, **splits)
        metrics = train(cfg)
        metrics["method"] = method
        metrics["task"] = task
        if method == "pt2star":
            metrics["layer_lengths"] = opts["layer_lengths"]
    else:
        metrics = _run_other(task, method, seed, model, bf16, epochs)
    metrics.pop("loss_history", None)
    metrics["model"] = model_label or model
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / f"{_name(task, method, seed)}.json", "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


def pt2_lengths(task: str, out: str) -> list[int]:
    """PT-2*: per-layer prefix lengths summing to PT2_BUDGET from the gates of the seed-``PT2_SOURCE_SEED`` APT run
    of the task, probed on (up to 1000) unlabeled training inputs, not on the evaluation split. One allocation per
    task: every PT-2* seed retrains a prefix with the same lengths."""
    from softprompt import tasks
    from softprompt.methods.apt.cli import adapter_batches
    from softprompt.methods.apt.tools import allocate_lengths, probe_gates

    apt_dir = apt_adapter(task, out)
    if not (apt_dir / "metrics.json").exists():
        raise SystemExit(f"PT-2*: no finished APT adapter at {apt_dir}; run the apt suite first")
    registry_task, splits = split_task(task)
    split = splits.get("train_split", tasks.get_task(registry_task).train_split)
    model, batches = adapter_batches(str(apt_dir), task=registry_task, split=split, limit=1000)
    return allocate_lengths(probe_gates(model, batches), PT2_BUDGET)


def apt_adapter(task: str, out: str) -> Path:
    """The APT adapter whose gates give the PT-2* lengths of ``task``."""
    return Path(out) / "adapters" / _name(task, "apt", PT2_SOURCE_SEED)


def _run_other(task, method, seed, model_name, bf16, epochs) -> dict:
    """PEFT LoRA / prefix / prompt / P-tuning, linear probe and full fine-tuning through a plain Trainer."""
    import torch
    from transformers import Trainer, TrainingArguments

    from softprompt import tasks
    from softprompt.data import Collator, featurize
    from softprompt.loading import load_base, load_tokenizer
    from softprompt.train.evaluate import predictions_to_metrics
    from softprompt.train.trainer import ListDataset

    torch.manual_seed(seed)
    registry_task, splits = split_task(task)
    spec = tasks.get_task(registry_task)
    tok = load_tokenizer(model_name)
    base, _ = load_base(model_name, spec, head_seed=seed)  # the seed varies the head's init too (issue 23)
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
    train_recs = [r for r in tasks.load_split(registry_task, splits.get("train_split", spec.train_split))
                  if r.get("label") is not None]
    eval_recs = [r for r in tasks.load_split(registry_task, splits.get("eval_split", spec.eval_split))
                 if r.get("label") is not None]
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
    pairs = ([p for name in args.suites.split(",") for p in suite(name)] if args.suites else
             [(t, m) for t in args.tasks.split(",") for m in args.methods.split(",")])
    jobs = [(t, m, s) for t, m in pairs for s in args.seeds.split(",")]
    jobs = list(dict.fromkeys(jobs))  # suites share runs (e.g. prefix on RTE): run each once
    todo = [j for j in jobs if not (Path(args.out) / f"{_name(j[0], j[1], int(j[2]))}.json").exists()]
    # PT-2* needs the adapter of its APT run; where only that run's JSON is here (adapters are not kept between
    # machines), the APT run is made again, first, so that the PT-2* runs can start early.
    reruns = list(dict.fromkeys((t, "apt", str(PT2_SOURCE_SEED)) for t, m, _ in todo if m == "pt2star"
                                if not (apt_adapter(t, args.out) / "metrics.json").exists()))
    print(f"{len(todo)} of {len(jobs)} runs to do, plus {len(reruns)} APT reruns for PT-2*, {args.parallel} at a time",
          flush=True)
    todo = reruns + [j for j in todo if j not in reruns]
    start = time.time()
    per_step: list[float] = []  # seconds per training step of finished runs (they share the machine)

    def launch(job):
        t, m, s = job
        est = estimated_steps(t) * (statistics.median(per_step) if per_step else args.sec_per_step) + 30
        if args.deadline and time.time() - start + est > args.deadline:
            return f"{t} {m} seed {s}: not started (about {est:.0f} s would pass the deadline)"
        cmd = [sys.executable, __file__, "one", "--task", t, "--method", m, "--seed", s, "--model", args.model,
               "--model-label", args.model_label or args.model,
               "--out", args.out] + (["--bf16"] if args.bf16 else [])
        cmd += ["--epochs", str(args.epochs)] if args.epochs else []
        # One CPU thread per run: many small runs share the host's cores (unpinned, each grabs them all).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        status = "ok" if proc.returncode == 0 else "FAILED\n" + proc.stderr[-3000:]
        result = Path(args.out) / f"{_name(t, m, int(s))}.json"
        if proc.returncode == 0 and result.exists():
            r = json.loads(result.read_text())
            if r.get("steps"):
                per_step.append(r["train_seconds"] / r["steps"])
        return f"[{time.time() - start:.0f} s] {t} {m} seed {s}: {status} ({time.time() - t0:.0f} s)"

    # Workers take the first runnable job in `todo` order; a PT-2* job is runnable once its APT adapter exists,
    # so it never holds a worker while waiting, and it is dropped when that APT run has failed or was not started.
    lock = threading.Lock()
    running_apt: set = set()

    def next_job():
        with lock:
            for i, job in enumerate(todo):
                t, m, _ = job
                if m != "pt2star" or (apt_adapter(t, args.out) / "metrics.json").exists():
                    if m == "apt":
                        running_apt.add(t)
                    return todo.pop(i)
                if t not in running_apt and not any(j[0] == t and j[1] == "apt" for j in todo):
                    todo.pop(i)
                    return (t, "pt2star-skip", job[2])
            return None if not todo else "wait"

    def worker():
        while (job := next_job()) is not None:
            if job == "wait":
                time.sleep(2)
                continue
            if job[1] == "pt2star-skip":
                print(f"{job[0]} pt2star seed {job[2]}: not started (no APT adapter in {args.out}/adapters)",
                      flush=True)
                continue
            line = launch(job)
            if job[1] == "apt":
                with lock:
                    running_apt.discard(job[0])
            print(line, flush=True)

    threads = [threading.Thread(target=worker) for _ in range(args.parallel)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return 0


def cmd_table(args) -> int:
    from softprompt import tasks

    rows: dict = {}
    for f in sorted(Path(args.out).glob("*.json")):
        m = json.loads(f.read_text())
        rows.setdefault((m["task"], m["method"]), []).append(m)
    order = ["prompt", "prompt_after_cls", "ptuning", "prefix", "prefix_rand", "prefix_shift", "lpt", "apt", "idspam",
             "peft_prompt", "peft_ptuning", "peft_prefix",
             "peft_lora", "linear_probe", "full_ft"]
    if args.header:
        print(Path(args.header).read_text())
    task_names = sorted({t for t, _ in rows}, key=lambda t: (list(EPOCHS).index(t) if t in EPOCHS else 99, t))
    print("| task (metric) | method | score (mean ± std) | seeds | trainable params | train time (s) |")
    print("|---|---|---|---|---|---|")
    for task in task_names:
        metric = tasks.get_task(split_task(task)[0]).metric
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
    r.add_argument("--suites",
                   help="comma list of named suites (core, apt, idspam, sweep); overrides --tasks/--methods")
    r.add_argument("--tasks", default="glue/sst2,glue/mrpc,glue/rte,glue/cola")
    r.add_argument("--methods", default="prompt,ptuning,prefix,lpt,peft_prompt,peft_ptuning,peft_prefix,peft_lora,"
                                        "linear_probe,full_ft")
    r.add_argument("--seeds", default="1,2,3")
    r.add_argument("--model", default="minilm")
    r.add_argument("--model-label", help="model name recorded in the run JSONs (default: --model)")
    r.add_argument("--out", default="benchmarks/results/runs")
    r.add_argument("--parallel", type=int, default=4)
    r.add_argument("--bf16", action="store_true")
    r.add_argument("--epochs", type=float)
    r.add_argument("--deadline", type=float, help="seconds from start after which no run is started that would "
                                                 "not finish in time (estimated from finished runs)")
    r.add_argument("--sec-per-step", type=float, default=0.05, help="step time guess before any run has finished")
    o = sub.add_parser("one")
    o.add_argument("--task", required=True)
    o.add_argument("--method", required=True)
    o.add_argument("--seed", type=int, required=True)
    o.add_argument("--model", default="minilm")
    o.add_argument("--model-label")
    o.add_argument("--out", required=True)
    o.add_argument("--bf16", action="store_true")
    o.add_argument("--epochs", type=float)
    t = sub.add_parser("table")
    t.add_argument("--out", default="benchmarks/results/runs")
    t.add_argument("--header", help="markdown file printed before the table (device, versions, commands)")
    args = p.parse_args()
    if args.cmd == "one":
        run_one(args.task, args.method, args.seed, args.model, args.out, args.bf16, args.epochs, args.model_label)
        return 0
    return {"run": cmd_run, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
