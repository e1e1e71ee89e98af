#!/usr/bin/env python
"""Where one decoding step of the generation engine spends its time: mixed prefix adapters against bare rows, at a
few batch sizes, with the torch profiler (issue 19).

On the H200, SmolLM2's eager decoding step took 58-61 ms with a few mixed rows against 17-19 ms bare, while the CPU
counts nearly the same aten ops for both (``benchmarks/results/serve_generation.md``). This script times decode-only
steps (no request joins) with the device synchronised after each, then profiles a few more and prints, per mode and
batch size: the median step, the profiler's total self CPU and device time, the host-side CUDA runtime calls that
can stall (synchronisations, allocations, copies) and the ops that cost most.

    python benchmarks/serve_decode_profile.py --model smollm2 --rows 2,16 --out $OUT/decode_profile.json
    python benchmarks/serve_decode_profile.py --model tiny --rows 2 --steps 3 --profile-steps 2   # CPU smoke
    python benchmarks/serve_decode_profile.py --model qwen0.5b-random --rows 32 --join 4 --decoding cuda_graphs  # joins
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from portable import portable
from serve_generation import build_model

# CUDA runtime calls in which the host may wait (for the device, or for the driver).
STALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMalloc", "cudaFree", "cudaMemcpy", "cudaHostAlloc",
          "cudaEventSynchronize")


def decoding_engine(model, vocab: int, mode: str, rows: int, args):
    """An engine whose ``rows`` requests (one adapter each, cycling; none when bare) have all joined."""
    from softprompt.multi.generation import GenerationEngine, SamplingParams

    engine = GenerationEngine(model, max_rows=max(rows + 2 * args.join, 1), decoding=args.decoding,
                              max_context=args.max_context)
    rng = np.random.default_rng(args.seed)
    params = SamplingParams(max_new_tokens=args.steps + args.profile_steps + 8, stop_token_ids=[])
    for i in range(rows):
        prompt = rng.integers(10, vocab - 10, size=args.prompt_len - (i % 4)).tolist()  # lengths differ: padding
        engine.submit(prompt, None if mode == "bare" else f"a{i % args.adapters}", params)
    while engine.waiting:
        engine.step()
    for _ in range(3):  # warm-up decoding steps
        engine.step()
    return engine


def joiners(engine, vocab: int, mode: str, args, rng) -> None:
    """``--join`` new requests before a step: each decodes one token after its prefill and leaves, so every step
    prefills, copies ``--join`` rows into the batch and decodes, as a serving step at saturation does."""
    from softprompt.multi.generation import SamplingParams

    params = SamplingParams(max_new_tokens=2, stop_token_ids=[])
    for i in range(args.join):
        prompt = rng.integers(10, vocab - 10, size=args.prompt_len).tolist()
        engine.submit(prompt, None if mode == "bare" else f"a{(i + 3) % args.adapters}", params)


def measure(model, vocab: int, mode: str, rows: int, args) -> dict:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    engine = decoding_engine(model, vocab, mode, rows, args)
    rng = np.random.default_rng(args.seed + 1)
    times = []
    for _ in range(args.steps):
        joiners(engine, vocab, mode, args, rng)
        start = time.perf_counter()
        engine.step()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            joiners(engine, vocab, mode, args, rng)
            engine.step()
            sync()
    events = prof.key_averages()
    n = args.profile_steps

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    top_device = sorted(events, key=device_us, reverse=True)[: args.top]
    return {
        "mode": mode, "rows": rows, "join": args.join, "step_ms_p50": statistics.median(times), "step_ms_all": times,
        "self_cpu_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1000 / n,
        "device_ms_per_step": sum(device_us(e) for e in events) / 1000 / n,
        "stalls_per_step": {e.key: e.count / n for e in events if any(s in e.key for s in STALLS)},
        "top_cpu": [(e.key, e.count // n, round(e.self_cpu_time_total / 1000 / n, 3)) for e in top],
        "top_device": [(e.key, e.count // n, round(device_us(e) / 1000 / n, 3)) for e in top_device],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, qwen0.5b-random or tiny")
    p.add_argument("--rows", default="2,16", help="comma-separated batch sizes")
    p.add_argument("--modes", default="mixed,bare")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decoding", default="dynamic", choices=["dynamic", "static", "cuda_graphs"])
    p.add_argument("--max-context", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed decoding steps")
    p.add_argument("--join", type=int, default=0, help="requests that join before every step (0: decoding only; "
                   "each decodes one token and leaves)")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, vocab = build_model(args.model, args.adapters, args.prefix_len, device, getattr(torch, args.dtype))
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for mode in args.modes.split(","):
            r = measure(model, vocab, mode, rows, args)
            results.append(r)
            print(f"{mode:5s} rows {rows:3d} join {args.join}: step p50 {r['step_ms_p50']:7.2f} ms, self CPU "
                  f"{r['self_cpu_ms_per_step']:7.2f} ms, device {r['device_ms_per_step']:7.2f} ms per step; "
                  f"stalls {r['stalls_per_step']}", flush=True)
            for name, count, ms in r["top_cpu"][:6]:
                print(f"    cpu  {ms:8.3f} ms  x{count:<5d} {name}")
            for name, count, ms in r["top_device"][:6] if device == "cuda" else []:
                print(f"    dev  {ms:8.3f} ms  x{count:<5d} {name}")
    if args.out:
        import transformers

        Path(args.out).write_text(json.dumps({
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "command": portable("python " + " ".join(sys.argv)), "results": results}, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
