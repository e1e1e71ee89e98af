#!/usr/bin/env python
"""One decoding step's attention call under a padding mask on grouped key/value heads (GQA): the engine's packed
call against the copy per query head that transformers up to 5.23 makes (issue 19).

Every decoding step of a padded batch (the serving engine's fixed buffers, the dynamic cache with left padding) calls
attention with one query row and a mask. transformers 5.17-5.23 then copies each key/value head once per query head
(``repeat_kv``), because SDPA's own GQA support would fall back to the math kernel under a mask; the engine instead
treats the G query heads of a group as G query rows of their key/value head (``engine.attention._attend``). Both
variants below run the same SDPA function on the same tensors, interleaved over ``--rounds`` rounds:

- ``copy``: ``repeat_kv`` of the keys and values, then SDPA on [R, H, 1, D] (transformers 5.17's path);
- ``packed``: the engine's ``_sdpa`` (query [R, H_kv, G, D], no copy).

Shapes: the attention heads of Qwen2.5-0.5B (14 query / 2 key-value heads) and SmolLM2-135M (9 / 3), head size 64,
``--rows`` rows, ``--columns`` cache columns (+ 16 prefix columns, as 8 prefix adapters of 16 tokens give). CUDA:
bf16, timed with events after warm-up; CPU: fp32, thread time, one thread.

    python benchmarks/gqa_decode_attention.py --out benchmarks/results/gqa_decode_attention_cpu.json   # ~1 min
    python benchmarks/gqa_decode_attention.py --quick            # smoke settings
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from portable import portable

_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "softprompt").is_dir() and str(_SRC) not in sys.path:  # the checkout's package wins
    sys.path.insert(0, str(_SRC))

HEADS = {"qwen0.5b": (14, 2), "smollm2": (9, 3)}  # (query heads, key/value heads)
HEAD_DIM = 64
PREFIX = 16


class _Layer(torch.nn.Module):
    """What the attention function reads from a self-attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _copy(layer, query, key, value, mask):
    """The engine's call before the change: cuDNN's SDPA off on CUDA as ``_sdpa`` switches it (so that both variants
    choose among the same kernels), keys and values repeated per query head."""
    from transformers.integrations.sdpa_attention import repeat_kv

    g = layer.num_key_value_groups
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    if query.is_cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        out = torch.nn.functional.scaled_dot_product_attention(query, repeat_kv(key, g), repeat_kv(value, g),
                                                               attn_mask=mask)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)
    return out.transpose(1, 2).contiguous()


def _packed(layer, query, key, value, mask):
    from softprompt.engine.attention import _sdpa

    return _sdpa(layer, query, key, value, mask)[0]


def _inputs(heads: int, kv_heads: int, rows: int, columns: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    query = torch.randn(rows, heads, 1, HEAD_DIM, generator=g).to(device, dtype)
    key = torch.randn(rows, kv_heads, columns, HEAD_DIM, generator=g).to(device, dtype)
    value = torch.randn(rows, kv_heads, columns, HEAD_DIM, generator=g).to(device, dtype)
    mask = torch.ones(rows, 1, 1, columns, dtype=torch.bool)
    for r in range(rows):  # left padding of 0-31 columns after the prefix, as rows of different lengths have
        mask[r, ..., PREFIX : PREFIX + (r * 7) % 32] = False
    return query, key, value, mask.to(device)


def _kernels(fn, args) -> list[str]:
    """The CUDA kernels one call launches (which SDPA backend ran, and whether a copy kernel did)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(*args)
            torch.cuda.synchronize()
        return sorted({e.key[:80] for e in prof.key_averages() if e.device_type.name == "CUDA"})
    except Exception as exc:  # a profiler problem must not cost the timings
        return [f"not recorded: {type(exc).__name__}: {exc}"[:200]]


def _time(fn, args, calls: int, device) -> float:
    """Microseconds per call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / calls
    t = time.thread_time_ns()
    for _ in range(calls):
        fn(*args)
    return (time.thread_time_ns() - t) / 1e3 / calls


def _cpu_name() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"CPU: {names[0] if names else platform.machine()}, {os.cpu_count()} logical cores"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="qwen0.5b,smollm2")
    p.add_argument("--rows", default="16,64")
    p.add_argument("--columns", default="256,2048", help="cache columns (the prefix's 16 come on top)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=0, help="calls per timing (default: 200 on CUDA, 5 on the CPU)")
    p.add_argument("--quick", action="store_true", help="smoke settings: one small shape, 2 rounds")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.rows, args.columns, args.rounds = "smollm2", "4", "32", 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    calls = args.calls or (200 if device.type == "cuda" else 5)
    if device.type == "cpu":
        torch.set_num_threads(1)
    cases = []
    with torch.inference_mode():
        for model in args.models.split(","):
            heads, kv_heads = HEADS[model]
            layer = _Layer(heads // kv_heads)
            for rows in map(int, args.rows.split(",")):
                for columns in map(int, args.columns.split(",")):
                    inputs = _inputs(heads, kv_heads, rows, PREFIX + columns, device, dtype)
                    copy_out, packed_out = _copy(layer, *inputs), _packed(layer, *inputs)
                    diff = (copy_out.float() - packed_out.float()).abs().max().item()
                    times = {"copy": [], "packed": []}
                    for r in range(args.rounds):  # interleaved, the first variant alternating
                        order = ("copy", "packed") if r % 2 == 0 else ("packed", "copy")
                        for name in order:
                            fn = _copy if name == "copy" else _packed
                            fn(layer, *inputs)  # warm-up
                            times[name].append(_time(fn, (layer, *inputs), calls, device))
                    copy_us, packed_us = (statistics.median(times[n]) for n in ("copy", "packed"))
                    copied = 2 * rows * heads * (PREFIX + columns) * HEAD_DIM * inputs[1].element_size()
                    case = {"model": model, "heads": heads, "kv_heads": kv_heads, "rows": rows,
                            "columns": PREFIX + columns, "copy_us": round(copy_us, 1), "packed_us": round(packed_us, 1),
                            "speedup": round(copy_us / packed_us, 3), "copy_rounds_us": [round(t, 1) for t in
                                                                                       times["copy"]],
                            "packed_rounds_us": [round(t, 1) for t in times["packed"]],
                            "copied_mb_per_call": round(copied / 1e6, 1), "max_abs_diff": diff}
                    if device.type == "cuda":
                        case["kernels"] = {n: _kernels(f, (layer, *inputs)) for n, f in
                                           (("copy", _copy), ("packed", _packed))}
                    cases.append(case)
                    print(f"{model:9s} rows {rows:3d} columns {PREFIX + columns:5d}: copy {copy_us:9.1f} us, packed "
                          f"{packed_us:9.1f} us, {copy_us / packed_us:5.2f}x (copy writes {copied / 1e6:.1f} MB; "
                          f"max |diff| {diff:.2g})", flush=True)
    import transformers

    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else _cpu_name(),
              "dtype": str(dtype).replace("torch.", ""),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "date": _dt.date.today().isoformat(), "command": portable("python benchmarks/gqa_decode_attention.py " +
                                  " ".join(argv if argv is not None else sys.argv[1:])),
              "timing": ("median over rounds of the mean time per call: CUDA events around `calls` calls" if
                         device.type == "cuda" else "median over rounds of thread CPU time per call, one thread"),
              "variants": {"copy": "repeat_kv, then SDPA: the path of transformers 5.17-5.23 under a mask",
                           "packed": "softprompt.engine.attention._sdpa: query heads of a group as query rows"},
              "calls": calls, "rounds": args.rounds, "cases": cases}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
