#!/usr/bin/env python
"""Host time of one layer call, per method, ours against PEFT's and the bare model (issue 18). CPU only.

Tiny models (hidden 32, 24 layers, batch 2 x 16 tokens, fp32, one thread) make the arithmetic negligible, so what is
timed is the host work a real GPU step also pays per layer: Python, module calls, autograd bookkeeping, op dispatch.
Every variant (bare; ours: prompt, ptuning, prefix, apt, lpt, lpt_npg, idspam; PEFT's prompt, ptuning, prefix) runs
on a Qwen2 decoder and a RoBERTa encoder at two depths, in ``train`` (forward + backward) and ``forward`` (no grad)
mode, interleaved over ``--rounds`` rounds; the line through the two depths gives ``us_per_layer`` (FORMULA below).
Method and reading: docs/performance.md, "Host cost per layer call".

    python benchmarks/host_overhead.py --out benchmarks/results/host_overhead.json
    python benchmarks/host_overhead.py --quick --out /tmp/host.json        # smoke settings, a few seconds
    python benchmarks/host_overhead.py --baseline 66dae24 --out ...         # before/after, interleaved in one run

``--baseline REF`` adds ``before:<method>`` variants: the package at git ``REF``, imported beside the working tree's,
so that a change is judged against its predecessor within one run, round by round (``before_after``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules below, also when loaded from a path
from host_overhead_steps import BASELINE, measure
from host_overhead_steps import adapt as adapt  # re-exported: apt_host_ops.py uses these through this module
from host_overhead_steps import build_base as build_base
from host_overhead_steps import make_batch as make_batch
from host_overhead_steps import make_steps as make_steps
from host_overhead_summary import HEADLINE, before_after, environment, goals, headline, summarise, table

# Run from a checkout without installing: the working tree's package wins over an installed one.
_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "softprompt").is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

OURS = ("prompt", "ptuning", "prefix", "apt", "lpt", "lpt_npg", "idspam")
MODES = ("train", "forward")
MODELS = ("decoder", "encoder")
FORMULA = ("us_per_layer = (T_variant(L) - F_bare) / L; F_bare = T_bare(L) - L * (T_bare(L) - T_bare(S)) / (L - S); "
           "T = median step time (all rounds), S = --short-layers. slope_us = (T(L) - T(S)) / (L - S), fixed_us = "
           "T(L) - L * slope_us. train = forward + loss.backward(), no optimizer step; forward = no-grad, eval mode.")
NOTE = ("Host-side CPU numbers on tiny models (one torch thread), not GPU times. The 2 cores are shared with other "
        "processes: thread CPU time ignores descheduling but not cache contention, so compare variants within one run "
        "(they are interleaved), not across runs.")


def load_baseline(ref: str) -> None:
    """Make the package as it was at git ``ref`` importable as ``softprompt_baseline`` (a temporary folder on
    ``sys.path``). Its imports are relative; only the attention function's registered name must differ, since
    transformers looks attention functions up by name when a layer runs."""
    root = Path(tempfile.mkdtemp(prefix="host_baseline_"))
    tar = subprocess.run(["git", "-C", str(_SRC.parent), "archive", ref, "src/softprompt"], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(root, filter="data")  # a snapshot: other engineers edit the working tree meanwhile
    (root / "src" / "softprompt").rename(root / BASELINE)
    attn = root / BASELINE / "engine" / "attention.py"
    attn.write_text(attn.read_text().replace('ATTN_NAME = "softprompt"', f'ATTN_NAME = "{BASELINE}"'))
    sys.path.insert(0, str(root))
    sys.modules.pop(BASELINE, None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma list of decoder, encoder")
    p.add_argument("--methods", default=",".join(OURS), help=f"comma list of {', '.join(OURS)}")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of train, forward")
    p.add_argument("--layers", type=int, default=24, help="depth L of the measured models (default 24)")
    p.add_argument("--short-layers", type=int, default=4, help="second depth for the per-forward/per-layer split")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--virtual-tokens", type=int, default=20, help="LPT and ID-SPAM use half")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    p.add_argument("--reps", type=int, default=3, help="consecutive timed steps of a variant per round (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of every variant before the rounds")
    p.add_argument("--clock", choices=("thread", "wall"), default="thread")
    p.add_argument("--quick", action="store_true", help="smoke settings: 4/2 layers, 2 rounds, 2 reps, 1 warm-up")
    p.add_argument("--baseline", metavar="GIT_REF", help="also time the package as it was at this commit (before:*)")
    p.add_argument("--out", default=None, help="JSON output")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.layers, args.short_layers, args.rounds, args.reps, args.warmup = 4, 2, 2, 2, 1
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    for given, known in ((args.models, MODELS), (args.methods, OURS), (args.modes, MODES)):
        if set(given) - set(known):
            raise SystemExit(f"unknown {sorted(set(given) - set(known))}; known: {', '.join(known)}")
    if not args.layers > args.short_layers >= 1:
        raise SystemExit("need --layers > --short-layers >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.baseline:
        load_baseline(args.baseline)
    import transformers

    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(1)  # tiny ops gain nothing from threads, and one thread makes thread CPU time the cost
    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples, failures = measure(args)
        machine, versions = environment()
    finally:  # leave a calling process (pytest) as it was
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
    cases = summarise(samples, args)
    doc = {
        "methods": headline(cases, args.methods),
        "headline_case": HEADLINE,
        "cases": cases,
        "goals": goals(cases),
        "before_after": before_after(cases, args.methods),
        "failures": failures,
        "formula": FORMULA,
        "settings": {k: getattr(args, k) for k in ("models", "methods", "modes", "layers", "short_layers", "batch",
                                                     "seq", "virtual_tokens", "rounds", "reps", "warmup", "clock",
                                                     "baseline")},
        "models": {"decoder": "Qwen2ForCausalLM, hidden 32, intermediate 64, 4 heads / 2 KV heads, vocab 128, fp32",
                   "encoder": "RobertaForSequenceClassification (2 labels), hidden 32, intermediate 64, 4 heads, "
                              "vocab 128, dropout 0.1, fp32"},
        "machine": machine,
        "note": NOTE,
        "versions": versions,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/host_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(table(cases, args.methods))
    for g in doc["goals"] + doc["before_after"]:
        lo, mid, hi = g["round_ratios_min_median_max"]
        print(f"  [{'met' if g['met'] else 'NOT met'}] {g['case']}: {g['goal']}: {g['ratio']}x (per round "
              f"{lo}-{hi}, median {mid}; met in {g['rounds_met']} rounds)")
    for f in failures:
        print(f"  failed: {f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out} ({doc['wall_s']} s)")
    return doc


if __name__ == "__main__":
    main()
