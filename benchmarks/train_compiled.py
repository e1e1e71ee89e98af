#!/usr/bin/env python
"""Real training, eager against compiled (CUDA graphs + length bucketing), end to end with the same steps (issue 18).

Runs (``--runs``, default all): the real MiniLM (``--minilm``) on GLUE SST-2 and MRPC with prefix, APT and ID-SPAM
through ``softprompt train`` (a subprocess each: ``--compile off`` against ``--compile reduce-overhead``, which pads
batches to a few lengths, and ``--compile cudagraphs``, mode ``graphs``: the same CUDA graphs without Inductor's code
generation, CUDA only), and SmolLM2 (``--smollm2``) with prefix tuning on ARC-Easy: LM loss on the gold answer,
dev accuracy by cloze scoring (``softprompt.dnd.cloze``), trained by a plain loop here (``softprompt train`` has no
multiple-choice head for decoders), compiled with ``torch.compile(mode="reduce-overhead")`` (``graphs``:
``backend="cudagraphs"``) on bucketed batches.
Same data order, seed, batch and steps in every mode (MiniLM runs pass ``--full-batches``: eager drops each epoch's
short last batch as compiled runs must, so that every mode trains on the same batches). ``wall_s``: the whole run (load,
compile, train, evaluate); ``train_s``: the training loop; ``accuracy``: dev accuracy (SmolLM2: acc_norm, the cloze
measure of ARC); ``steady_step_ms`` and ``one_off_s``: the training loop split into steady steps and one-off costs
(compiling, recording graphs; ``softprompt.train.trainer.StepClock``). The summary turns each pair of eager and a
compiled mode into what ``--compile auto`` needs: ``saved_s_per_step``, ``one_off_extra_s`` and ``break_even_steps``.

Resumable: ``--out`` is rewritten after every run and finished runs (same model, task, method, mode, steps) are
skipped; ``--time-budget S`` starts no run that its estimate (``estimate_s``: the longest finished run of its kind, or
one of another task scaled to the steps) would take past S seconds from the start. GPU commands:
docs/performance.md, "Next GPU session".

    python benchmarks/train_compiled.py --out benchmarks/results/train_compiled.json --time-budget 540 --bf16
    python benchmarks/train_compiled.py --smoke --out /tmp/tc.json        # CPU, tiny sizes, a few minutes
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/portable.py
if (ROOT / "src" / "softprompt").is_dir() and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
from portable import portable  # noqa: E402

MINILM_TASKS = {"sst2": "glue/sst2", "mrpc": "glue/mrpc"}
METHODS = ("prefix", "apt", "idspam")
SMOLLM2_TASK = "commonsense/arc_easy"
MODES = ("eager", "compiled", "graphs")  # graphs: CUDA graphs without Inductor (--compile cudagraphs), CUDA only
DEFAULT_ESTIMATE_S = {"eager": 150.0, "compiled": 300.0, "graphs": 200.0}
CLOCK_WINDOW = 50  # steps between two readings of the step clock (softprompt.train.trainer.StepClock's window)


def compile_flag(mode: str, args) -> str | None:
    """``softprompt train --compile``'s value of a mode (None: eager)."""
    return {"eager": None, "compiled": args.compile_mode, "graphs": "cudagraphs"}[mode]


def all_runs() -> list[tuple[str, str, str]]:
    """(model, task, method) of every run, MiniLM first."""
    return [("minilm", t, m) for t in MINILM_TASKS for m in METHODS] + [("smollm2", "arc_easy", "prefix")]


def recorded_mode(mode: str) -> str:
    """A ``--modes`` entry as runs record it: ``eager`` or ``compiled`` (issue 18's results format)."""
    return "eager" if mode == "eager" else "compiled"


def fields(mode: str, args) -> dict:
    """What a run records of its ``--modes`` entry: its ``mode`` (:func:`recorded_mode`) and ``compile``, the
    ``softprompt train --compile`` value that compiled it (``reduce-overhead``, ``cudagraphs``; None for eager)."""
    return {"mode": recorded_mode(mode), "compile": compile_flag(mode, args)}


def key(run: dict) -> tuple:
    return run["model"], run["task"], run["method"], run["mode"], run.get("compile"), run["steps"]


# ---- MiniLM: softprompt train in a subprocess ------------------------------------------------------------------------
def minilm_run(args, task: str, method: str, mode: str, steps: int) -> dict:
    out = Path(args.scratch) / f"minilm_{task}_{method}_{mode}"
    cmd = [sys.executable, "-m", "softprompt", "train", "--method", method, "--model", args.minilm,
           "--task", MINILM_TASKS[task], "--output", str(out), "--max-steps", str(steps),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--seed", str(args.seed),
           "--compile", compile_flag(mode, args) or "off", "--full-batches", "--overwrite"]
    cmd += ["--bf16"] * args.bf16
    cmd += ["--train-limit", str(args.train_limit)] if args.train_limit else []
    cmd += ["--eval-limit", str(args.eval_limit)] if args.eval_limit else []
    cmd += ["--data-dir", args.data_dir] if args.data_dir else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.run_timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"softprompt train exited {proc.returncode}: {proc.stderr[-800:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": round(wall, 2), "train_s": metrics["train_seconds"], "accuracy": metrics["eval_accuracy"],
            "metric": MINILM_TASKS[task] + " dev accuracy",
            "length_buckets": metrics.get("length_buckets"), "steps_done": metrics["steps"],
            "steady_step_ms": metrics.get("steady_step_ms"), "one_off_s": metrics.get("one_off_s"),
            "eval_examples": metrics["eval_examples"],
            "command": portable(" ".join(cmd[1:]).replace(str(args.scratch), "$SCRATCH"))}


# ---- SmolLM2: prefix tuning with a plain loop (in a subprocess of this script) ---------------------------------------
def smollm2_run(args, mode: str, steps: int) -> dict:
    """LM loss on the gold answer text of ARC-Easy train, bucketed right-padded batches, AdamW; cloze dev accuracy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import softprompt as sp
    from softprompt import tasks
    from softprompt.dnd.cloze import cloze_example, score_items, training_pairs
    from softprompt.inductor import disable_mix_order_reduction
    from softprompt.methods import default_lr
    from softprompt.resources import resolve
    from softprompt.train.bucketing import bucket_for, length_buckets, length_is_dynamic, mark_length_dynamic
    from softprompt.train.trainer import split_time

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(resolve(args.smollm2))
    base = AutoModelForCausalLM.from_pretrained(resolve(args.smollm2), dtype=torch.float32).to(device)
    model = sp.wrap(base, sp.PrefixConfig(num_virtual_tokens=10, seed=args.seed)).train()
    name = SMOLLM2_TASK
    train = [cloze_example(name, r) for r in tasks.load_split(name, "train", args.data_dir)]
    dev = [cloze_example(name, r) for r in tasks.load_split(name, "dev", args.data_dir)]
    train = train[: args.train_limit] if args.train_limit else train
    dev = dev[: args.eval_limit] if args.eval_limit else dev
    pairs = training_pairs(tok, train, args.max_length)
    buckets = length_buckets([len(x) for x, _ in pairs], args.batch_size, seed=args.seed) if mode != "eager" else ()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=default_lr("prefix"))
    if mode != "eager":
        disable_mix_order_reduction()  # as softprompt train does (src/softprompt/inductor.py)
    flag = compile_flag(mode, args)
    # cudagraphs: a static graph per bucket (dynamic=False; bucketing.length_is_dynamic), as softprompt train does
    step_model = (model if flag is None else torch.compile(model, backend="cudagraphs", dynamic=False)
                  if flag == "cudagraphs" else torch.compile(model, mode=flag))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16)
    t_train = time.perf_counter()
    marks = [(0, t_train)]  # the step clock of softprompt train (StepClock), without a Trainer
    for step in range(steps):
        rows = [pairs[order[(step * args.batch_size + i) % len(order)]] for i in range(args.batch_size)]
        n = max(len(x) for x, _ in rows)
        n = bucket_for(n, buckets) if buckets else n
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (x, y) in enumerate(rows):  # right padding: causal rows are computed as if alone
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
        if length_is_dynamic(flag, len(buckets)):  # one compilation for every bucket, as softprompt train does
            batch = mark_length_dynamic(batch)
        with autocast:
            loss = step_model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % CLOCK_WINDOW == 0:
            marks.append((step + 1, time.perf_counter()))
    if device == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t_train
    marks.append((steps, t_train + train_s))
    model.eval()
    with autocast:
        scores = score_items(model, tok, dev, batch_size=32)
    return {"wall_s": round(time.perf_counter() - t0, 2), "train_s": round(train_s, 2), "accuracy": scores["acc_norm"],
            "accuracy_unnormalised": scores["acc"], "metric": f"{name} dev acc_norm (cloze)", "steps_done": steps,
            "length_buckets": list(buckets),
            "eval_examples": scores["n"], "final_loss": float(loss), **split_time(marks, CLOCK_WINDOW)}


# ---- driver --------------------------------------------------------------------------------------------------------
def environment() -> dict:
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"device": device, "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                           "transformers": transformers.__version__}}


def same_run(run: dict) -> tuple:
    """What an eager run and the compiled runs it pairs with share."""
    return run["model"], run["task"], run["method"], run["steps"]


def summarise(runs: list[dict]) -> list[dict]:
    """Per (model, task, method, steps) and compiled run (``compile``: ``reduce-overhead`` or ``cudagraphs``): its wall
    time over eager's and the accuracy difference (issue 18's goal: at most 1/1.5 of eager's wall time on the MiniLM
    runs, accuracy within 0.5 points). The ``compiled_*`` fields are the row's compiled run, whichever its compile."""
    ok = [r for r in runs if r.get("status") == "ok"]
    out = []
    for eager in (r for r in ok if r["mode"] == "eager"):
        model, task, method, steps = same_run(eager)
        for compiled in (r for r in ok if r["mode"] == "compiled" and same_run(r) == same_run(eager)):
            ratio = compiled["wall_s"] / eager["wall_s"]
            diff = 100 * (compiled["accuracy"] - eager["accuracy"])
            out.append({"model": model, "task": task, "method": method, "mode": compiled["mode"],
                        "compile": compiled.get("compile"), "steps": steps,
                        "eager_wall_s": eager["wall_s"], "compiled_wall_s": compiled["wall_s"],
                        "compiled_over_eager": round(ratio, 3),
                        "train_s_ratio": round(compiled["train_s"] / max(eager["train_s"], 1e-9), 3),
                        "accuracy_diff_points": round(diff, 2), **calibration(eager, compiled),
                        "goal_met": ratio <= 1 / 1.5 and abs(diff) <= 0.5 if model == "minilm" else None})
    return out


def estimate_s(runs: list[dict], model: str, task: str, mode: str, steps: int, flag: str | None = None) -> float:
    """Seconds a run is expected to take: the longest finished run of the same model, task, mode and compile value
    (``flag``); else the
    finished runs of the same model and mode on other tasks, their training time scaled to ``steps`` (loading and
    evaluation kept as they were); else a fixed default per mode."""
    kind = (model, recorded_mode(mode), flag)
    ok = [r for r in runs if r.get("status") == "ok" and (r["model"], r["mode"], r.get("compile")) == kind]
    same = [r["wall_s"] for r in ok if r["task"] == task]
    if same:
        return max(same)
    scaled = [r["wall_s"] - r["train_s"] + r["train_s"] * steps / r["steps"] for r in ok if r.get("train_s")]
    return max(scaled, default=DEFAULT_ESTIMATE_S[mode])


def calibration(eager: dict, compiled: dict) -> dict:
    """What ``--compile auto``'s cost model needs (``softprompt.train.bucketing``), from one eager/compiled pair with
    the same steps: the host time a compiled step saves, the one-off time beyond eager's (compiling once, recording
    each length bucket's graphs), and the steps after which compiling pays. Empty when a run lacks its step clock."""
    e, c = eager.get("steady_step_ms"), compiled.get("steady_step_ms")
    if e is None or c is None or compiled.get("one_off_s") is None or eager.get("one_off_s") is None:
        return {}
    saved = (e - c) / 1e3
    extra = compiled["one_off_s"] - eager["one_off_s"]
    return {"saved_s_per_step": round(saved, 5), "one_off_extra_s": round(extra, 2),
            "buckets": len(compiled.get("length_buckets") or ()),
            "break_even_steps": round(extra / saved) if saved > 0 else None}


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.one:  # a SmolLM2 run inside its own process: print its result as JSON
        print("RESULT " + json.dumps(smollm2_run(args, args.one, args.steps_override)), flush=True)
        return {}
    if args.smoke:
        args.train_limit, args.eval_limit, args.batch_size, args.max_length = 64, 32, 8, 64
        args.steps = {"sst2": 3, "mrpc": 3, "arc_easy": 3}
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"runs": []}
    wanted = [r for r in all_runs() if not args.runs or f"{r[0]}:{r[1]}:{r[2]}" in args.runs.split(",")]
    start = time.time()
    for model, task, method in wanted:
        for mode in args.modes.split(","):
            steps = args.steps[task]
            run = {"model": model, "task": task, "method": method, **fields(mode, args), "steps": steps}
            if mode == "graphs" and not _cuda():
                print(f"skipped (no CUDA device for CUDA graphs): {model} {task} {method} {mode}", flush=True)
                continue
            if any(key(r) == key(run) and r.get("status") == "ok" for r in doc["runs"]):
                continue
            estimate = estimate_s(doc["runs"], model, task, mode, steps, run["compile"])
            if args.time_budget and time.time() - start + estimate > args.time_budget:
                print(f"skipped (time budget): {model} {task} {method} {mode}", flush=True)
                continue
            try:
                run.update(minilm_run(args, task, method, mode, steps) if model == "minilm"
                           else smollm2_subprocess(args, mode, steps), status="ok")
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                run.update(status="error", error=str(exc)[-800:])
            run["batch_size"], run["bf16"], run["date"] = args.batch_size, args.bf16, _now()
            doc["runs"] = [r for r in doc["runs"] if key(r) != key(run)] + [run]
            print(f"{model} {task} {method} {mode} ({run['compile']}) {steps} steps: {run['status']} "
                  f"{run.get('wall_s')} s, accuracy {run.get('accuracy')}, steady {run.get('steady_step_ms')} ms "
                  f"per step, one-off {run.get('one_off_s')} s", flush=True)
            write(out, doc, args, argv)
    write(out, doc, args, argv)
    for s in doc["summary"]:
        print(f"  {s['model']} {s['task']} {s['method']} {s['compile']}: /eager wall {s['compiled_over_eager']}x, "
              f"accuracy {s['accuracy_diff_points']:+.2f} points, goal met: {s['goal_met']}, "
              f"saved {s.get('saved_s_per_step')} s per step, break-even {s.get('break_even_steps')} steps")
    return doc


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def smollm2_subprocess(args, mode: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--one", mode, "--steps-override", str(steps), "--smollm2", args.smollm2,
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--seed", str(args.seed),
           "--compile-mode", args.compile_mode, "--out", os.devnull]
    cmd += ["--bf16"] * args.bf16
    cmd += ["--train-limit", str(args.train_limit)] if args.train_limit else []
    cmd += ["--eval-limit", str(args.eval_limit)] if args.eval_limit else []
    cmd += ["--data-dir", args.data_dir] if args.data_dir else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"SmolLM2 run exited {proc.returncode}: {proc.stderr[-800:]}")
    return {**json.loads(lines[-1][7:]), "command": portable(" ".join(cmd[1:]))}


def write(out: Path, doc: dict, args, argv) -> None:
    doc.update(environment(), summary=summarise(doc["runs"]), date=_now(),
               command=portable("python benchmarks/train_compiled.py " + " ".join(argv if argv is not None
                                                                                else sys.argv[1:])))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(portable(doc), indent=1) + "\n")
    tmp.replace(out)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _steps(text: str) -> dict[str, int]:
    steps = {"sst2": 2000, "mrpc": 1150, "arc_easy": 1000}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        steps[name] = int(value)
    return steps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results JSON (resumed when it exists)")
    p.add_argument("--minilm", default="minilm", help="MiniLM folder or alias (default: the pip package)")
    p.add_argument("--smollm2", default="smollm2", help="SmolLM2 HF folder (default: the converted pip package)")
    p.add_argument("--data-dir", help="benchmark data folder (default: $SOFTPROMPT_DATA_DIR or ../shared/data)")
    p.add_argument("--runs", help="comma list of model:task:method, e.g. minilm:sst2:prefix,smollm2:arc_easy:prefix")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=_steps, default=_steps(""),
                   help="task=steps overrides of sst2=2000 (~1 epoch), mrpc=1150 (10 epochs), arc_easy=1000")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (both modes)")
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument("--train-limit", type=int)
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--time-budget", type=float, help="seconds from the start after which no run starts")
    p.add_argument("--scratch", default=str(Path(tempfile.gettempdir()) / "train_compiled"),
                   help="folder for the adapters the runs write (recorded as $SCRATCH)")
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds after which one run is abandoned")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU check: 64 train / 32 dev rows, 3 steps")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--steps-override", type=int, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    main()
