#!/usr/bin/env python
"""Drag-and-Drop on SmolLM2-135M-Instruct: leave-one-dataset-out benchmark, resumable by stages (docs/dnd_gpu.md).

Subcommands
-----------
``convert --gguf FILE --out DIR``   GGUF -> HF folder once (the steps of ``softprompt.resources.ensure_smollm2``,
                                    from a given GGUF path).
``run --state DIR [...]``           run the pending stages that fit in ``--time-budget`` seconds; everything is kept
                                    under ``--state``; ``--export DIR`` writes the results after every stage.
``export --state DIR --out DIR``    results JSON + markdown + a small tar of logs.
``report --results JSON [--out MD]`` markdown from a results JSON (benchmarks/results/dnd.md).
``plan --state DIR``                the stages, which are done, and the time estimates.
``cloze --state DIR --model M``     issue 21, cloze format: base scores, the zoo gate per config, cross-dataset LoRA
                                    scores (``softprompt.dnd.study``); ``--export`` writes dnd_cloze_stages.json.
                                    With ``--generators``: the leave-one-out gen/dnd stages, ``--gen-group K`` side by
                                    side, none started that cannot finish within ``--session-left`` seconds.
``cloze-report --stages JSON``      benchmarks/results/dnd_cloze.json and dnd.md from exported stage results.
``gen-bench``                       seconds per generator step, 1 or K side by side, on random data (no zoo).
``boolq-probe``                     BoolQ base skill (AUC, balanced accuracy) per faithful cloze format, zoo part.

Stages, in order (each persisted as ``state/stages/<name>.json`` when complete; an interrupted stage is redone):

* ``base``           the base model on every dataset's fixed evaluation subset (both measures).
* ``zoo:<d>``        one LoRA for dataset d from the shared init (warm-up + kept checkpoints; ``curve_steps`` also
                     saved), its checkpoints tokenised once, its final checkpoint scored on every dataset and its
                     training curve scored on d.
* ``gen:<h>``        generator trained on the zoo without h (conditions: unlabeled prompts); adapters generated
                     from h's prompts (``samples`` draws, seeds 0..), the zoo-mean (A, B) baseline, the
                     number-of-prompts ablation, generation timings and distances to the zoo.
* ``ans:<h>``        the same generator recipe with prompt + answer conditions (ablation), scored on h.

The configuration (sizes) is frozen in ``state/config.json`` at the first ``run``; later runs reuse it.
A stage starts only if its estimated duration (the longest measured stage of its kind, else ``--priors``) fits in
what is left of ``--time-budget``; the run then stops cleanly, and the next ``run`` continues.

The code is split over sibling modules (imported from this folder, as the other benchmark scripts do):
``dnd_bench_common`` (sizes, priors, helpers), ``dnd_bench_model`` (GGUF conversion, the merging evaluator),
``dnd_bench_stages`` (the stages), ``dnd_bench_report`` (results, markdown, export) and ``dnd_bench_tools``
(gen-bench, boolq-probe, cloze-report). This file keeps the process clock ``T_START``, ``log``, ``Bench``'s driver
loop and the CLI.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/portable.py, also when loaded from a path
from portable import portable

T_START = time.time()

# the sibling modules (benchmarks/dnd_bench_*.py), imported after T_START so that the clock starts where it always did;
# Evaluator is re-exported (the tests use dnd_bench.Evaluator)
from dnd_bench_common import DEFAULTS, FLOAT_KEYS, INT_KEYS, KIND_TITLES, env_info, write_json  # noqa: E402
from dnd_bench_model import Evaluator as Evaluator  # noqa: E402
from dnd_bench_model import convert  # noqa: E402
from dnd_bench_report import export_results, render  # noqa: E402
from dnd_bench_stages import BenchStages  # noqa: E402
from dnd_bench_tools import cmd_boolq_probe, cmd_cloze_report, cmd_gen_bench, cmd_zoo_alone  # noqa: E402


def log(msg: str, state: Path | None = None) -> None:
    line = f"[{time.time() - T_START:7.1f}s] {msg}"
    print(line, flush=True)
    if state is not None:
        with open(state / "log.txt", "a") as f:
            f.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {line}\n")


# --------------------------------------------------------------------------------------------------------- bench
class Bench(BenchStages):
    """The stages (``dnd_bench_stages.BenchStages``) and the driver loop, which reads this module's ``T_START``."""

    # ------------------------------------------------------------------ driver loop
    def run_stage(self, name: str, kind: str, d: str | None) -> dict:
        if kind == "base":
            return self.stage_base()
        if kind == "zoo":
            return self.stage_zoo(d)
        missing = [n for n, k, _ in self.stages() if k in ("base", "zoo") and not self.done(n)]
        if missing:
            raise RuntimeError(f"{name} needs {missing} first")
        return self.stage_gen(d, with_answer=kind == "ans")

    def run(self, budget: float | None, export: Path | None, record: dict) -> str:
        safety, reserve = float(self.rt.get("safety") or 1.15), float(self.rt.get("reserve") or 0)
        status = "complete"
        for name, kind, d in self.stages():
            if self.done(name):
                continue
            est, how = self.estimate(kind)
            elapsed = time.time() - T_START
            if budget is not None and elapsed + est * safety + reserve > budget:
                status = (f"stopped before {name}: estimated {est:.0f} s ({how}) x {safety} + {reserve:.0f} s reserve "
                          f"> {budget - elapsed:.0f} s left of {budget:.0f} s")
                break
            log(f"stage {name} (estimated {est:.0f} s, {how})", self.state)
            t0 = time.time()
            res = self.run_stage(name, kind, d)
            res["stage_seconds"] = round(time.time() - t0, 3)
            res["process_stage_index"] = len(self.stages_run)  # 0 = first stage of a process (cold caches)
            write_json(self.stage_file(name), res)
            if kind == "zoo":
                self.write_zoo_manifest()
            self.stages_run.append(name)
            record["stages_run"] = list(self.stages_run)
            log(f"stage {name} done in {res['stage_seconds']:.1f} s", self.state)
            if export is not None:
                export_results(self.state, export, record=record)
        return status

# ------------------------------------------------------------------------------------------------------------ CLI
def parse_priors(s: str | None) -> dict:
    out = {}
    for kv in (s or "").split(","):
        if kv.strip():
            k, v = kv.split("=")
            out[k.strip()] = float(v)
    return out


def load_config(state: Path, args: argparse.Namespace) -> dict:
    """The state's frozen config; at the first run, DEFAULTS updated by the options given."""
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    path = state / "config.json"
    if path.exists():
        cfg = json.loads(path.read_text())
        diff = {k: (cfg.get(k), v) for k, v in given.items() if str(cfg.get(k)) != str(v)}
        if diff:
            raise SystemExit(f"{state} was started with another configuration: {diff} (state value, given). "
                             "Use a new --state, or leave these options out.")
        return cfg
    cfg = {**DEFAULTS, **given}
    if not cfg["model"]:
        raise SystemExit("--model is required at the first run of a state")
    for k in ("model", "encoder"):
        if cfg[k] and Path(cfg[k]).exists():
            cfg[k] = str(Path(cfg[k]).resolve())
    state.mkdir(parents=True, exist_ok=True)
    write_json(path, cfg)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    state = Path(args.state)
    cfg = load_config(state, args)
    (state / "stages").mkdir(parents=True, exist_ok=True)
    rt = {"device": args.device, "eval_batch": args.eval_batch, "priors": parse_priors(args.priors),
          "safety": args.safety, "reserve": args.reserve}
    inv_path = state / "invocations.json"
    invocations = json.loads(inv_path.read_text()) if inv_path.exists() else []
    for old in invocations:  # a run killed by the call's time limit never wrote its end
        if old.get("status") == "running":
            old["status"] = "killed before it finished (no end recorded)"
    record = {"id": len(invocations), "start": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": portable(shlex.join(["python", "benchmarks/dnd_bench.py", *args.argv])), "env": env_info(),
              "time_budget": args.time_budget, "stages_run": [], "status": "running"}
    write_json(inv_path, invocations + [record])
    bench = Bench(state, cfg, rt)
    log(f"run {record['id']}: {record['env']['device']}; pending "
        f"{[n for n, _, _ in bench.stages() if not bench.done(n)]}", state)
    export = Path(args.export) if args.export else None
    rc = 0
    try:
        status = bench.run(args.time_budget, export, record)
    except Exception as exc:  # (any failure: keep what was done; report the failure)
        status = f"failed: {type(exc).__name__}: {exc}"
        log(traceback.format_exc(), state)
        rc = 1
    record.update({"status": status, "end": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "seconds": round(time.time() - T_START, 1)})
    write_json(inv_path, invocations + [record])
    if export is not None:
        res = export_results(state, export, record=record)
        log(f"exported to {export}: {len(res['status']['done'])} stages done, "
            f"pending {res['status']['pending']}", state)
    log(f"STATUS: {status}", state)
    return rc


def cmd_plan(args: argparse.Namespace) -> int:
    state = Path(args.state)
    cfg = json.loads((state / "config.json").read_text()) if (state / "config.json").exists() else {**DEFAULTS}
    bench = Bench(state, cfg, {"priors": parse_priors(args.priors), "device": "cpu"})
    total = 0.0
    for name, kind, _ in bench.stages():
        s = bench.load_stage(name)
        if s:
            print(f"  done     {name:24s} {s['stage_seconds']:8.1f} s")
        else:
            est, how = bench.estimate(kind)
            total += est
            print(f"  pending  {name:24s} {est:8.1f} s ({how})  {KIND_TITLES[kind]}")
    print(f"pending total: {total:.0f} s")
    return 0


def _ablation(value: str | None) -> bool | list[str]:
    """``--stats-ablation`` / ``--nearest-ablation``: absent (False), bare (every held-out dataset) or a
    comma-separated list."""
    return False if value is None else True if value == "all" else [d for d in value.split(",") if d]


def _seed_invocations(history: Path, committed: Path) -> None:
    """Start a fresh state's call history with the committed one, so that exports list every session's calls.

    A state that already has a history (a later call of the same session) keeps it as it is.
    """
    if not history.exists() and committed.exists():
        shutil.copy(committed, history)


def cmd_cloze(args: argparse.Namespace) -> int:
    """Run the cloze study's pending stages (``softprompt.dnd.study``), exporting after every stage."""
    import torch

    from softprompt.dnd.study import Study

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)
    state = Path(args.state)
    from softprompt.dnd.templates import DATASETS, canonical_name

    datasets = [canonical_name(d) for d in args.datasets.split(",")] if args.datasets else list(DATASETS)
    gen = {}
    for kv in filter(None, (args.gen or "").split(",")):
        k, _, v = kv.partition("=")
        gen[k.strip()] = v.strip() if k.strip() == "stats_code" else float(v) if "." in v or "e" in v else int(v)
    try:  # a bad config or ablation name: one line, nothing started
        study = Study(state, args.model, datasets, configs=args.configs.split(";"), n_eval=args.n_eval,
                      n_dev=args.n_dev, batch_size=args.eval_batch, device=args.device, log=lambda m: log(m, state),
                      generators=args.generators, encoder=args.encoder, gen=gen,
                      stats_ablation=_ablation(args.stats_ablation),
                      nearest_ablation=_ablation(args.nearest_ablation),
                      gen_group=args.gen_group, gen_streams=args.gen_streams,
                      session_left=args.session_left - (time.time() - T_START) if args.session_left else None,
                      gen_step_seconds=args.gen_step_seconds, zoo_workers=args.zoo_workers,
                      gen_compile=args.gen_compile)
    except ValueError as e:
        raise SystemExit(f"dnd_bench.py cloze: {e}") from None
    if args.restore:
        log(f"restored {study.restore(args.restore)}", state)
        _seed_invocations(state / "invocations.jsonl", Path(args.restore).with_name("dnd_cloze_invocations.jsonl"))
    info = {**env_info(), "command": portable(shlex.join(["python benchmarks/dnd_bench.py", *args.argv])),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with open(state / "invocations.jsonl", "a") as f:
        f.write(json.dumps(info) + "\n")
    status = "failed"
    try:
        status = study.run(args.time_budget - (time.time() - T_START) if args.time_budget else 1e9, args.export)
    finally:
        if args.export:
            study.export(args.export)
            shutil.copy(state / "invocations.jsonl", Path(args.export) / "dnd_cloze_invocations.jsonl")
        print(f"STATUS: {status}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("convert", help="GGUF -> HF folder (once)")
    p.add_argument("--gguf", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("run", help="run the pending stages that fit in the time budget")
    p.add_argument("--state", required=True)
    p.add_argument("--time-budget", type=float, help="seconds from process start; stages that would not fit are left")
    p.add_argument("--export", help="folder for dnd_results.json / dnd.md / dnd_logs.tar.gz (after every stage)")
    p.add_argument("--device")
    p.add_argument("--eval-batch", type=int, default=128, help="evaluation batch (speed only)")
    p.add_argument("--priors", help="stage seconds before a stage of the kind was measured, e.g. zoo=60,gen=100")
    p.add_argument("--safety", type=float, default=1.15, help="factor on the estimates")
    p.add_argument("--reserve", type=float, default=15.0, help="seconds kept for exporting at the end")
    for k, v in DEFAULTS.items():
        typ = int if k in INT_KEYS else float if k in FLOAT_KEYS else str
        p.add_argument(f"--{k.replace('_', '-')}", dest=k, type=typ, default=None,
                       help=f"(config, default {v})")
    p = sub.add_parser("export", help="results JSON + markdown from a state")
    p.add_argument("--state", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("report", help="markdown from a results JSON")
    p.add_argument("--results", required=True)
    p.add_argument("--out", help="markdown file (default: print)")
    p = sub.add_parser("plan", help="stages, state and estimates")
    p.add_argument("--state", required=True)
    p.add_argument("--priors")
    p = sub.add_parser("cloze", help="issue 21: cloze base scores, zoo gate, cross-dataset LoRA scores")
    p.add_argument("--state", required=True)
    p.add_argument("--model", required=True, help="HF folder or alias of the base model")
    p.add_argument("--configs", default="r8,lr2e-4,steps250,ckpt50",
                   help="';'-separated zoo configs (softprompt.dnd.study.parse_config)")
    p.add_argument("--datasets", help="comma list (default: the seven)")
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--n-dev", type=int, default=500)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--time-budget", type=float)
    p.add_argument("--export")
    p.add_argument("--restore", help="dnd_cloze_stages.json of an earlier run (state lost)")
    p.add_argument("--generators", action="store_true", help="also the leave-one-out gen/dnd stages")
    p.add_argument("--encoder", default="minilm", help="condition encoder: alias or HF folder")
    p.add_argument("--stats-ablation", nargs="?", const="all", default=None, metavar="DATASETS",
                   help="also the generators with DnD's scale code (stages gen/dnd:<cfg>+statsdnd:<h>): every held-out "
                        "dataset, or those named, in that order (comma-separated, e.g. arc_easy,piqa)")
    p.add_argument("--nearest-ablation", nargs="?", const="all", default=None, metavar="DATASETS",
                   help="also generators that do not learn the held-out dataset's nearest training dataset either "
                        "(gen/dnd:<cfg>+nonearest:<h>; all, or those named, in that order): DnD beyond retrieval?")
    p.add_argument("--gen", help="generator overrides, e.g. steps=1000,batch_size=64,lr=1e-3,stats_code=dnd "
                                 "(softprompt.dnd.study_gen.GEN_DEFAULTS)")
    p.add_argument("--device")
    p.add_argument("--zoo-workers", type=int, default=1,
                   help="zoo stages of a config trained in this many processes at once on the one GPU")
    p.add_argument("--gen-group", type=int, default=1, help="generators trained side by side (one process)")
    p.add_argument("--gen-streams", action="store_true", help="one CUDA stream per generator of a group")
    p.add_argument("--gen-compile", action="store_true",
                   help="generators through torch.compile (gen-bench --compile off,on says whether it pays)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN autotuning for the generator convolutions")
    p.add_argument("--session-left", type=float,
                   help="device seconds left in the session at this call's start (run tool status: budget_left_s); "
                        "a generator that cannot finish, with its dnd stage, before then is not started")
    p.add_argument("--gen-step-seconds", type=float,
                   help="seconds per generator step until one is measured here (gen-bench's BEST line)")
    p = sub.add_parser("gen-bench", help="seconds per generator step, 1 or K generators side by side (no zoo)")
    p.add_argument("--groups", default="1,2", help="group sizes K to time")
    p.add_argument("--steps", type=int, default=5, help="timed rounds per K (after 2 warm-up rounds)")
    p.add_argument("--no-streams", action="store_true", help="skip the one-stream-per-generator variant")
    p.add_argument("--cudnn", default="off", help="cuDNN autotuning: off, on, or off,on (both timed)")
    p.add_argument("--compile", default="off", help="torch.compile of the generators: off, on, or off,on")
    p.add_argument("--shape", help="bench_steps overrides, e.g. batch_size=8,width=32 (default: the real sizes)")
    p.add_argument("--device")
    p.add_argument("--out", help="folder for dnd_gen_bench.json")
    p = sub.add_parser("zoo-alone", help="seconds per zoo step of each dataset, nothing else on the device")
    p.add_argument("--model", required=True, help="HF folder or alias of the base model")
    p.add_argument("--config", default="r8,lr2e-4,steps250,ckpt50", help="the zoo config (rank, lr, batch)")
    p.add_argument("--datasets", help="comma list (default: the seven)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per dataset")
    p.add_argument("--skip", type=int, default=3, help="warm-up steps before them, not timed")
    p.add_argument("--device")
    p.add_argument("--out", help="folder for dnd_zoo_alone.json")
    p = sub.add_parser("boolq-probe", help="BoolQ base-model skill per faithful cloze format (zoo-part examples)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n", type=int, default=400, help="zoo-part examples (sha256-ranked)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="folder for dnd_boolq_probe.json")
    p = sub.add_parser("cloze-report", help="dnd_cloze.json + dnd.md from exported cloze stages")
    p.add_argument("--stages", required=True)
    p.add_argument("--invocations", required=True)
    p.add_argument("--config", required=True, help="zoo config name, e.g. r8_lr2e-4_steps250_ckpt50")
    p.add_argument("--measure", default="primary", choices=("primary", "acc", "acc_norm"),
                   help="primary: acc_norm, acc for BoolQ and WinoGrande (softprompt.dnd.cloze.PRIMARY_MEASURE)")
    p.add_argument("--json", default="benchmarks/results/dnd_cloze.json")
    p.add_argument("--zoo-alone", default="benchmarks/results/dnd_zoo_alone.json",
                   help="zoo-alone's JSON: the cost table's lone-LoRA seconds (used when the file exists)")
    p.add_argument("--conditions", default="benchmarks/results/dnd_conditions.json",
                   help="dnd_conditions.py's JSON: the condition-geometry line of the diagnosis (when the file exists)")
    p.add_argument("--md", default="benchmarks/results/dnd.md")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.cmd == "cloze":
        return cmd_cloze(args)
    if args.cmd == "cloze-report":
        return cmd_cloze_report(args)
    if args.cmd == "gen-bench":
        return cmd_gen_bench(args)
    if args.cmd == "boolq-probe":
        return cmd_boolq_probe(args)
    if args.cmd == "zoo-alone":
        return cmd_zoo_alone(args)
    if args.cmd == "convert":
        convert(Path(args.gguf), Path(args.out))
        return 0
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "export":
        res = export_results(Path(args.state), Path(args.out))
        print(f"exported {len(res['status']['done'])} stages to {args.out}")
        return 0
    if args.cmd == "report":
        text = render(json.loads(Path(args.results).read_text()))
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text, end="")
        return 0
    return cmd_plan(args)


if __name__ == "__main__":
    sys.exit(main())
