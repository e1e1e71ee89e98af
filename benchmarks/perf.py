#!/usr/bin/env python
"""Speed and memory of softprompt's methods against PEFT and full fine-tuning on real model shapes (issue 8).

Randomly initialised models with the exact shapes of Qwen2.5-0.5B, Qwen2.5-1.5B (``Qwen2ForCausalLM``) and
RoBERTa-large (``RobertaForSequenceClassification``) are built directly on the device (speed and memory do not depend
on weight values). Sections (``--sections``, in this order; the budget skips what does not fit):

* ``train``: training steps (forward + backward + AdamW step on the trainable parameters) at ``--shapes``. The
  methods of one shape are timed in ``--rounds`` interleaved rounds (A B C ... A B C ...; issue 18: one run of
  each method in turn let a slow spell of the machine decide a ratio), ``--steps`` timed steps each (CUDA events)
  after ``--warmup`` warm-up steps: ``step_ms`` is the median of the round medians, ``step_ms_spread`` their
  min/max. Peak memory (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, less what the
  methods built before hold), tokens/s, model FLOPs utilisation, and the profiled device time of one step.
* ``memory``: the same at ``--gc-shapes`` (default 1x8192) with gradient checkpointing where the method allows it;
  PEFT prefix tuning refuses checkpointing: the refusal is a result row and the case is re-run without it.
* ``longseq``: our prefix against PEFT's prefix, forward + backward + step at batch 1 and ``--longseq`` lengths, with
  a flash-only SDPA probe and the attention kernels that actually ran (from the CUDA profiler), to show which route
  keeps the fused kernels.
* ``inference``: forward throughput (no grad) of the bare model, our prefix and PEFT's prefix at ``--infer-shape``;
  greedy ``generate()`` new-tokens/s at ``--gen-shape`` with ``--gen-tokens`` new tokens (bare, ours, PEFT).

Every case catches ``torch.OutOfMemoryError`` (and any other error) and records it as a result row; memory is freed
between cases; the JSON is rewritten after every case, so a run cut off by a wall-clock limit keeps what it measured.

MFU (see docs/performance.md): model FLOPs of the bare model on the real tokens over the measured time, against the
bf16 matmul rate measured in the same run (``--dtype`` matmul of 8192^3, best of several timings):

    N      = weights of every nn.Linear that acts on every token (attention, MLP, the LM head; for RoBERTa not the
             one-token classifier); embedding look-ups are not matmuls
    A_fwd  = 4 * b * s^2 * L * H * d_head * c      (QK^T and AV; c = 1/2 causal, 1 bidirectional)
    train  = 6 * N * b * s + 3 * A_fwd              -> "mfu"
    needed = 4 * N * b * s + 3 * A_fwd              -> "mfu_needed" for methods with a frozen backbone (no weight
             gradients: forward + input-gradient backward); equals "train" for full fine-tuning
    forward (inference) = 2 * N * b * s + A_fwd

Virtual tokens, prefix columns and method networks are not credited: they are overhead, so a method's MFU is
directly comparable with the bare model's. Gradient-checkpointing recomputation is not credited either.

The code: this file holds the command line, the run's set-up and the order of the sections; ``perf_models.py``
the model shapes, FLOP counts and methods; ``perf_measure.py`` timing, memory, kernel profiles, the time budget and
the environment; ``perf_bench.py`` the cases and sections (:class:`Bench`); ``perf_report.py`` the tables and the
targets.

Examples::

    python benchmarks/perf.py --tiny --device cpu                      # smoke run, a few seconds
    python benchmarks/perf.py --models qwen0.5b,roberta-large --time-budget 480 --out $OUT/perf_small.json
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

# Run from a checkout without installing: the working tree's package wins over an installed one.
_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "softprompt").is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

# The rest of the script lives in the perf_*.py files beside this one (benchmarks/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The "X as X" imports re-export names that the tests use from this module (tests/conftest.py's load_benchmark).
from perf_bench import Bench  # noqa: E402
from perf_measure import _T0, measure_peak_flops  # noqa: E402
from perf_measure import Budget as Budget  # noqa: E402
from perf_models import ALL_METHODS, MODELS  # noqa: E402
from perf_models import Shape as Shape  # noqa: E402
from perf_models import attention_flops_fwd as attention_flops_fwd  # noqa: E402
from perf_models import build_base as build_base  # noqa: E402
from perf_models import make_batch as make_batch  # noqa: E402
from perf_models import make_method as make_method  # noqa: E402
from perf_models import model_flops as model_flops  # noqa: E402
from perf_models import shape_of as shape_of  # noqa: E402
from perf_report import format_markdown, format_table, targets  # noqa: E402

SECTIONS = ("train", "memory", "longseq", "inference")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)} (default: all)")
    p.add_argument("--methods", default=None, help=f"comma list of {', '.join(ALL_METHODS)} (default: all)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--shapes", default=None, help="training shapes BATCHxSEQ (default 8x512,4x2048; tiny 2x32)")
    p.add_argument("--gc-shapes", default=None,
                   help="shapes run with gradient checkpointing, memory section (default 1x8192; tiny 1x128)")
    p.add_argument("--longseq", default=None,
                   help="batch-1 lengths of the longseq section (default 1024,2048,4096,8192; tiny 64,128)")
    p.add_argument("--longseq-methods", default="prefix,peft_prefix")
    p.add_argument("--infer-shape", default=None, help="forward-throughput shape (default 32x512; tiny 4x32)")
    p.add_argument("--gen-shape", default=None, help="generate() batch x prompt length (default 8x128; tiny 2x16)")
    p.add_argument("--gen-tokens", type=int, default=None, help="new tokens per generate() (default 64; tiny 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per case (default 3; tiny 1)")
    p.add_argument("--virtual-tokens", type=int, default=None,
                   help="prompt/prefix length (default 20; tiny 4); LPT and ID-SPAM use half")
    p.add_argument("--profile-method", default="all",
                   help="comma list of methods profiled (CUDA kernels, one step) at every training shape: the row's "
                        "device_ms and device_busy; 'all' (default) or 'none'")
    p.add_argument("--rounds", type=int, default=3,
                   help="train section: interleaved rounds of every method (A B C ... A B C ...), --steps timed steps "
                        "each; step_ms is the median of the round medians (default 3)")
    p.add_argument("--out", default="perf_results.json", help="JSON output (rewritten after every case)")
    p.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds for the whole run, from process start (0 = none); cases that would not fit are "
                        "reported as skipped")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="model dtype (default bf16; fp32 with --tiny on CPU)")
    p.add_argument("--tiny", action="store_true", help="tiny models and shapes for CPU smoke runs")
    p.add_argument("--compile", default="none", choices=("none", "default", "reduce-overhead", "max-autotune"),
                   help="train section: run the model through torch.compile with this mode (default none); "
                        "use enough --warmup steps to cover compilation")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    return p


def _defaults(args: argparse.Namespace) -> None:
    tiny = args.tiny
    for name, full, small in (("shapes", "8x512,4x2048", "2x32"), ("gc_shapes", "1x8192", "1x128"),
                              ("longseq", "1024,2048,4096,8192", "64,128"), ("infer_shape", "32x512", "4x32"),
                              ("gen_shape", "8x128", "2x16"), ("gen_tokens", 64, 4), ("steps", 10, 2),
                              ("warmup", 3, 1), ("virtual_tokens", 20, 4)):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the JSON document (also written to ``--out``)."""
    args = build_parser().parse_args(argv)
    args.argv = argv
    _defaults(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype is None:
        args.dtype = "fp32" if (args.tiny and device.type == "cpu") else "bf16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    models = [m.strip() for m in (args.models or ",".join(MODELS)).split(",") if m.strip()]
    methods = [m.strip() for m in (args.methods or ",".join(ALL_METHODS)).split(",") if m.strip()]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for kind, given, known in (("model", models, MODELS), ("method", methods, ALL_METHODS),
                               ("section", sections, SECTIONS)):
        bad = [g for g in given if g not in known]
        if bad:
            raise SystemExit(f"unknown {kind}(s) {bad}; known: {', '.join(known)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings

    import transformers

    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif args.tiny:
        torch.set_num_threads(1)  # tiny models gain nothing from threads, and contend with other processes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(args, device, dtype, models, methods, sections)
    finally:  # leave the calling process (e.g. pytest) as it was
        gc.unfreeze()
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)


def _run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, models: list[str], methods: list[str],
         sections: list[str]) -> dict:
    """The sections in order; see :func:`main`."""
    bench = Bench(args, device, dtype)
    import peft  # noqa: F401 - imported before the freeze below, like softprompt and transformers

    import softprompt  # noqa: F401

    # Library objects live for the whole run: keep them out of the collections between cases (0.2 s each otherwise).
    gc.collect()
    gc.freeze()
    bench.meta["compile"] = args.compile
    bench.meta["peak_flops"] = measure_peak_flops(device, dtype, args.tiny)
    bench.meta["peak_tflops"] = round(bench.meta["peak_flops"] / 1e12, 2)
    print(f"device {bench.meta.get('gpu', device)} | {args.dtype} matmul peak {bench.meta['peak_tflops']} TFLOP/s | "
          f"torch {torch.__version__} | budget {args.time_budget or 'none'} s", flush=True)
    specs = [MODELS[m] for m in models]
    if "train" in sections:
        bench.section_train(specs, methods)
    if "memory" in sections:
        bench.section_memory([s for s in specs if s.causal], methods)
    if "longseq" in sections:
        bench.section_longseq(specs)
    if "inference" in sections:
        bench.section_inference(specs)
    bench.meta["wall_s"] = round(time.perf_counter() - _T0, 1)
    bench.write()
    print("\n" + format_table(bench.rows), flush=True)
    tg = targets(bench.rows)
    if tg:
        print("\nTargets of issue 8:")
        for t in tg:
            verdict = "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"
            extra = (f" (frozen-model floor: PEFT/floor {t['ceiling']}x, ours/floor {t['ours_over_floor']}x)"
                     if "ceiling" in t else "")
            print(f"  [{verdict}] {t['target']} | {t['model']} {t['shape']}: {t['value']}{extra}")
    if args.markdown:
        note = f"Training steps through `torch.compile(mode={args.compile!r})`.\n\n" if args.compile != "none" else ""
        Path(args.markdown).write_text(note + format_markdown(bench.rows) + "\n")
    print(f"\nwrote {bench.out} ({len(bench.rows)} rows, {bench.meta['wall_s']} s)", flush=True)
    return bench.document()


if __name__ == "__main__":
    main()
