#!/usr/bin/env python
"""Host work per generation step when rows join and leave at nearly every step (a saturated server), counted in
dispatched aten ops: mixed prefix adapters against bare rows (issue 19). CPU, deterministic.

Timing a CPU run mixes host work with the arithmetic of the ops themselves (on a CPU, a KV-cache copy is real work;
on a GPU it is a kernel launch), and it swings with the machine's load. The number of aten ops a step dispatches is
exact and repeatable, and on a host-bound GPU step each op is at least one launch, so it is the measure of choice
for changes to the scheduler's bookkeeping (joins, leaves, prefix tables). Thread CPU time is printed beside it.

A tiny Llama (hidden 64, ``--layers`` layers, fp32, one thread) with 8 prefix adapters; every step, 2 requests
arrive (prompt 16-64 tokens, 8-39 new tokens, EOS ignored, a seeded schedule shared by both modes, which differ
only in whether a request names its adapter); steps after the first ``--warmup`` are counted.

    python benchmarks/serve_churn_ops.py                 # about 1 minute
    python benchmarks/serve_churn_ops.py --steps 60 --warmup 20 --layers 4   # smoke settings
    python benchmarks/serve_churn_ops.py --decoding static   # the fixed buffers of CUDA-graph decoding
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))  # serve_generation.py (model builder)
if (_HERE.parent / "src" / "softprompt").is_dir():  # the checkout's package wins over an installed one
    sys.path.insert(0, str(_HERE.parent / "src"))


class _CountOps(TorchDispatchMode):
    """Counts every aten op dispatched inside the ``with`` block (forward, cache and bookkeeping alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def build(layers: int, adapters: int):
    """(MultiAdapterModel with ``adapters`` prefix adapters of 16 tokens, vocab size) on a tiny Llama."""
    import serve_generation
    import transformers as tf

    config = tf.LlamaConfig

    def deeper(**kw):  # serve_generation's "tiny" model, made deeper and wider
        kw.update(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, vocab_size=1000)
        return config(**kw)

    tf.LlamaConfig = deeper
    try:
        return serve_generation.build_model("tiny", adapters, 16, "cpu", torch.float32)
    finally:
        tf.LlamaConfig = config


def run(model, mode: str, args: argparse.Namespace) -> dict:
    """One seeded schedule in ``mode`` ("mixed" or "bare"): mean ops, CPU ms and rows per counted step."""
    from softprompt.multi.generation import GenerationEngine, SamplingParams

    rng = np.random.default_rng(args.seed)
    engine = GenerationEngine(model, max_rows=args.max_rows, decoding=args.decoding, max_context=args.max_context)
    ops = ms = rows = 0.0
    for step in range(args.steps):
        for _ in range(2):
            length = int(rng.integers(16, 65))
            adapter = f"a{int(rng.integers(0, args.adapters))}"  # drawn in both modes: one schedule
            params = SamplingParams(max_new_tokens=int(rng.integers(8, 40)), stop_token_ids=[])
            engine.submit(rng.integers(10, 990, length).tolist(), adapter if mode == "mixed" else None, params)
        if step < args.warmup:
            engine.step()
            continue
        counter = _CountOps()
        start = time.thread_time_ns()
        with counter:
            engine.step()
        ms += (time.thread_time_ns() - start) / 1e6
        ops += counter.count
        rows += len(engine.rows)
    n = args.steps - args.warmup
    return {"ops_per_step": ops / n, "cpu_ms_per_step": ms / n, "rows_per_step": rows / n}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--max-rows", type=int, default=64)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--warmup", type=int, default=40, help="steps before counting (the batch fills up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoding", default="dynamic", choices=["dynamic", "static"],
                   help="a growing cache, or the fixed buffers that CUDA graphs replay (run eagerly here)")
    p.add_argument("--max-context", type=int, default=256, help="columns of the fixed buffers (static)")
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, _ = build(args.layers, args.adapters)
    result = {mode: run(model, mode, args) for mode in ("mixed", "bare")}
    result["ops_ratio_mixed_to_bare"] = result["mixed"]["ops_per_step"] / result["bare"]["ops_per_step"]
    for mode in ("mixed", "bare"):
        r = result[mode]
        print(f"{mode:5s} ops/step {r['ops_per_step']:7.0f}  cpu ms/step {r['cpu_ms_per_step']:6.1f}  "
              f"rows {r['rows_per_step']:.1f}")
    print(f"mixed / bare ops: {result['ops_ratio_mixed_to_bare']:.3f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), **result}, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
