"""The stand-alone measuring and reporting subcommands of ``benchmarks/dnd_bench.py`` (split out of it,
unchanged) that read neither a ``run`` state nor the process clock: ``gen-bench`` (seconds per generator step),
``boolq-probe`` (BoolQ base skill per cloze format) and ``cloze-report`` (dnd_cloze.json and dnd.md from the
exported stages of the ``cloze`` study). ``dnd_bench.main`` parses their options and calls them."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from dnd_bench_common import env_info
from portable import portable


def cmd_gen_bench(args: argparse.Namespace) -> int:
    """Seconds per generator step, one generator or K side by side (``softprompt.dnd.gen_bench``); JSON to --out."""
    from softprompt.dnd.gen_bench import bench_steps

    kw = {k: int(v) for k, v in (kv.split("=") for kv in filter(None, (args.shape or "").split(",")))}
    runs, failed = [], []
    for compiled in args.compile.split(","):
        for mode in args.cudnn.split(","):
            try:
                runs.append(bench_steps(groups=[int(x) for x in args.groups.split(",")], steps=args.steps,
                                        streams=not args.no_streams, cudnn_benchmark=mode == "on",
                                        device=args.device, compile=compiled == "on", **kw))
            except Exception as e:  # a compiler failure (torch 2.11 raised one on an H100) keeps the eager rows
                if compiled != "on":
                    raise
                failed.append({"compile": True, "cudnn_benchmark": mode == "on",
                               "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
                print(f"COMPILE: failed ({failed[-1]['error']}); use the eager generators")
    out = {**env_info(), "command": portable(shlex.join(["python benchmarks/dnd_bench.py", *args.argv])),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": runs, "failed": failed}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "dnd_gen_bench.json").write_text(json.dumps(out, indent=1) + "\n")
    if not runs:
        return 1
    best = min(runs, key=lambda r: r["best"]["generator_step_seconds"])
    b = best["best"]
    rows = {c: [r for run in runs for r in run["rows"] if r["compile"] is c and r["group"] == b["group"]]
            for c in (False, True)}
    if rows[False] and rows[True]:  # compiling pays once its warm-up is won back by faster steps
        e, c = (min(rows[x], key=lambda r: r["generator_step_seconds"]) for x in (False, True))
        gain = e["generator_step_seconds"] - c["generator_step_seconds"]
        # the first compiled row paid the compile; later rows of this process reuse its cache, a new call does not
        warm = {x: max(r["warmup_seconds"] for r in rows[x]) for x in (False, True)}
        cost = (warm[True] - warm[False]) / b["group"]
        print(f"COMPILE: {c['generator_step_seconds']:.3f} against {e['generator_step_seconds']:.3f} s per "
              f"generator-step at K={b['group']}, {cost:.0f} s more warm-up per generator: "
              + (f"pays after {cost / gain:.0f} steps per generator and call" if gain > 0 else "never pays"))
    print(f"BEST: K={b['group']} streams={b['streams']} cudnn_benchmark={best['cudnn_benchmark']} "
          f"compile={best['compile']}: "
          f"{b['generator_step_seconds']:.3f} s per generator-step (--gen-step-seconds), "
          f"{best['minutes_per_generator_1000_steps']:.1f} min per 1,000-step generator")
    return 0


def cmd_zoo_alone(args: argparse.Namespace) -> int:
    """Optimiser seconds per zoo step of each dataset with nothing else on the device: the zoo's own loop (data order,
    batch, LoRA) for ``--skip`` warm-up steps and ``--steps`` timed ones. Zoo rebuilds time their steps while other
    zoo stages share the GPU (``--zoo-workers``), so the cost table scales these lone figures instead (issue 21)."""
    import tempfile

    from softprompt.dnd.harness import load_model
    from softprompt.dnd.study import ZOO_MAX_LENGTH, parse_config
    from softprompt.dnd.templates import DATASETS, canonical_name
    from softprompt.dnd.zoo import build_zoo
    from softprompt.resources import resolve

    if args.skip < 1 or args.steps < 1:
        print("zoo-alone: --skip and --steps must be at least 1 (the timing starts after a warm-up step)",
              file=sys.stderr)
        return 2
    cfg = parse_config(args.config)
    datasets = [canonical_name(d) for d in args.datasets.split(",")] if args.datasets else list(DATASETS)
    path = str(resolve(args.model))
    model, tok = load_model(path, None, args.device)
    with tempfile.TemporaryDirectory() as tmp:  # steps skip + steps in all: warm-up ones, then one kept checkpoint
        man = build_zoo(path, datasets, rank=cfg["rank"], warmup_steps=args.skip + args.steps - 1, checkpoints=1,
                        out=tmp, lr=cfg["lr"], batch_size=cfg["batch_size"], dev_limit=0, model=model,
                        tokenizer=tok, progress=False, device=args.device, max_length=ZOO_MAX_LENGTH,
                        curve_steps=[args.skip])
    out = {**env_info(), "command": portable(shlex.join(["python benchmarks/dnd_bench.py", *args.argv])),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": cfg["name"],
           "skip": args.skip, "steps_timed": args.steps, "datasets": {}}
    for d in datasets:
        e = man["datasets"][d]
        timed = e["train_seconds"] - e["curve"][0]["train_seconds"]
        out["datasets"][d] = {"step_seconds": round(timed / args.steps, 5), "timed_seconds": round(timed, 4)}
        print(f"{d}: {timed / args.steps:.4f} s per zoo step alone ({args.steps} steps after {args.skip})")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "dnd_zoo_alone.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


def cmd_boolq_probe(args: argparse.Namespace) -> int:
    """BoolQ: base-model skill under each faithful cloze format, on zoo-part examples (softprompt.dnd.format_probe)."""
    import torch

    from softprompt.dnd.format_probe import probe_boolq, probe_records
    from softprompt.dnd.harness import load_model
    from softprompt.resources import resolve

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tok = load_model(str(resolve(args.model)), None, args.device)
    res = probe_boolq(model, tok, probe_records(args.n), args.batch_size, progress=print)
    res.update({**env_info(), "command": portable(shlex.join(["python benchmarks/dnd_bench.py", *args.argv])),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "examples": "sha256-ranked first n of the BoolQ DnD zoo part (key superglue/boolq|format-probe)"})
    print(f"n={res['n']}, gold yes-rate {res['yes_rate_gold']}%")
    for name, r in res["formats"].items():
        print(f"{name:26s} acc {r['acc']:5.1f}  acc_norm {r['acc_norm']:5.1f}  yes {r['yes_rate']:5.1f}%  balanced "
              f"{r['balanced_acc']:5.1f}  AUC {r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]  "
              f"calibrated: acc {r['acc_cal']:5.1f} yes {r['yes_rate_cal']:5.1f}% "
              f"balanced {r['balanced_acc_cal']:5.1f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "dnd_boolq_probe.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


def cmd_cloze_report(args: argparse.Namespace) -> int:
    """dnd_cloze.json + dnd.md from exported stage results and the invocation record of the run."""
    from softprompt.dnd.report import build_results, render

    stages = json.loads(Path(args.stages).read_text())
    inv = [json.loads(x) for x in Path(args.invocations).read_text().splitlines() if x.strip()]
    last = inv[-1]
    versions = {k: last[k] for k in ("torch", "transformers", "peft", "python")}
    from softprompt.dnd.study import eval_records
    from softprompt.dnd.templates import DATASETS

    n = {d: r["test"]["n"] for d, r in stages.get("base", {}).get("datasets", {}).items()}
    golds = {d: [int(r["label"]) for r in eval_records(d, n[d])] for d in DATASETS if d in n}  # binary rows
    lone = Path(args.zoo_alone) if args.zoo_alone else None
    alone = json.loads(lone.read_text()) if lone and lone.exists() else None
    if alone and alone.get("config") != args.config:
        print(f"cloze-report: {lone} timed zoo config {alone.get('config')}, not {args.config}: not used")
        alone = None
    cond = Path(args.conditions)
    conditions = json.loads(cond.read_text()) if cond.exists() else None
    res = build_results(stages, args.config, args.measure, device=last["device"], versions=versions,
                        date=last["date"], command=last["command"], golds=golds, alone=alone, conditions=conditions)
    # every call of the state (a call that failed before finishing a stage is listed too)
    res["invocations"] = [{"date": i["date"], "command": i["command"], "device": i["device"]} for i in inv]
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    Path(args.md).write_text(render(res))
    print(f"wrote {args.json} and {args.md}")
    return 0
