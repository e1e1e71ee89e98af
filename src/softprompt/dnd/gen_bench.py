"""Device cost of generator training steps, one generator or K side by side, without a zoo (issue 21 planning).

:func:`bench_steps` times full optimiser steps (condition batch stacked from a device cache of per-prompt states, as
:class:`.condition.ConditionEncoder` does; bf16 autocast on CUDA; weighted MSE; AdamW; clipping) of randomly
initialised decoders on random data of the real shapes, for each group size K, in lockstep (one stream) and, on
CUDA, with one stream per generator. It reports seconds per round, seconds per generator-step (the number the
study's session planner needs: ``--gen-step-seconds``), achieved TFLOP/s and peak memory. The numbers do not depend
on the values, only on shapes, so no zoo or encoder is needed: run it in any device call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ..inductor import disable_mix_order_reduction
from .gen_loss import weighted_mse
from .hyperconv import HyperConvDecoder, chain_parameters, plan_chain


def step_flops(chain: Sequence[tuple[int, int, int]], kernel: int, batch_size: int) -> float:
    """FLOPs of one training step (forward + backward) of one generator, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = HyperConvDecoder(chain, kernel)
        x = torch.zeros(batch_size, *chain[0])
        with FlopCounterMode(display=False) as fc:
            model(x).float().pow(2).sum().backward()
    return float(fc.get_total_flops())


def bench_steps(n_prompts: int = 64, max_length: int = 256, hidden: int = 384,
                grid: tuple[int, int, int] = (1590, 10, 194), width: int = 64, n_layers: int = 4, kernel: int = 5,
                batch_size: int = 64, groups: Sequence[int] = (1, 2), steps: int = 5, warmup: int = 2,
                streams: bool = True, cudnn_benchmark: bool = False, cache_prompts: int = 512,
                device: str | None = None, log: Any = print, compile: bool = False) -> dict[str, Any]:
    """Time ``steps`` rounds (after ``warmup``) for every K in ``groups``; see the module docstring. ``compile``:
    the decoders through ``torch.compile``; the warm-up rounds then include compiling (``warmup_seconds``)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    chain = plan_chain((n_prompts, max_length, hidden), grid, width, n_layers)
    flops = step_flops(chain, kernel, batch_size)
    g = torch.Generator(device=dev).manual_seed(0)
    cache = [torch.randn(max_length, hidden, device=dev, generator=g) for _ in range(cache_prompts)]
    target = torch.randn(batch_size, *grid, device=dev, generator=g)
    mask = torch.ones(1, grid[1], grid[2], dtype=torch.bool, device=dev)
    weight = torch.ones(grid[0], device=dev)
    pick = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "chain": chain,
                           "kernel": kernel, "batch_size": batch_size, "parameters": chain_parameters(chain, kernel),
                           "step_tflop": flops / 1e12, "cudnn_benchmark": cudnn_benchmark, "compile": compile,
                           "rows": []}

    def one_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        idx = torch.randint(0, cache_prompts, (batch_size, n_prompts), generator=pick).tolist()
        cond = torch.stack([torch.stack([cache[i] for i in row]) for row in idx])  # as ConditionEncoder.encode_batch
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            pred = model(cond)
        loss = weighted_mse(pred.float(), target, mask, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for k in groups:
        for use_streams in ((False, True) if cuda and streams and k > 1 else (False,)):
            models = [HyperConvDecoder(chain, kernel).to(dev) for _ in range(k)]
            if compile:
                disable_mix_order_reduction()  # as GeneratorRun does (..inductor)
                for m in models:
                    m.compile()
            opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1) for m in models]
            side = [torch.cuda.Stream(dev) for _ in range(k)] if use_streams else [None] * k
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(dev)
            t_warm = time.perf_counter()
            for r in range(warmup + steps):
                if r == warmup:
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    warm_seconds = t0 - t_warm
                for m, o, s in zip(models, opts, side):
                    if s is None:
                        one_step(m, o)
                    else:
                        s.wait_stream(torch.cuda.current_stream(dev))
                        with torch.cuda.stream(s):
                            one_step(m, o)
                if cuda:
                    torch.cuda.synchronize()
            per_round = (time.perf_counter() - t0) / steps
            row = {"group": k, "streams": use_streams, "compile": compile, "round_seconds": round(per_round, 4),
                   "warmup_seconds": round(warm_seconds, 2),
                   "generator_step_seconds": round(per_round / k, 4),
                   "tflops": round(k * flops / per_round / 1e12, 1),
                   "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if cuda else None}
            out["rows"].append(row)
            log(f"K={k} streams={use_streams} compile={compile}: {row['round_seconds']:.3f} s per round, "
                f"{row['generator_step_seconds']:.3f} s per generator-step, {row['tflops']} TFLOP/s, "
                f"peak {row['peak_gib']} GiB; warm-up {row['warmup_seconds']:.1f} s")
            del models, opts
            if cuda:
                torch.cuda.empty_cache()
    best = min(out["rows"], key=lambda r: r["generator_step_seconds"])
    out["best"] = best
    out["minutes_per_generator_1000_steps"] = round(1000 * best["generator_step_seconds"] / 60, 2)
    return out


__all__ = ["bench_steps", "step_flops"]
