#!/usr/bin/env python
"""Where a host-bound training step spends its time (issue 18): host work, host syncs or the device.

``perf.py`` found steps whose wall time is far above their profiled device time (RoBERTa-large 8x512 on an H100,
session 15: APT 64 ms against 20 ms of kernels, prefix tuning 44 against 18), and APT's wall time 1.46x prefix's
while its device time is 1.12x. Two causes look the same from the wall clock: the host issuing many small ops (the
device waits for it), or a host sync inside the step (the host waits for the device, then the device waits for
the host). This script tells them apart, per method, on the models and shapes of ``perf.py``:

* ``enqueue_ms``: host time of one step started on an idle device, up to the return of ``optimizer.step()``,
  without a sync (median). Without a sync inside the step it is pure host work.
* ``wall_ms``: the same step followed by ``torch.cuda.synchronize()`` (median).
* ``device_ms``: profiled kernel time of one step (``perf_measure.profile_kernels``).
* ``syncs``: host syncs torch reports in one step (``torch.cuda.set_sync_debug_mode``), with where they come from.
* ``aten_ops``: aten operations dispatched in one step (forward, backward, optimizer): the host's work scales with it.
* ``host_top``: the ops with the most host self time in one step (torch.profiler), e.g. an attention kernel whose
  launch path is slow on the host.

On a CPU (``--tiny``, the test) there is no device: ``device_ms`` and ``syncs`` are None.

    python benchmarks/host_sync.py --models roberta-large,qwen0.5b --shape 8x512 --out /tmp/host_sync.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_bench import Bench
from perf_measure import environment, profile_kernels, synchronize
from perf_models import MODELS, parse_shapes
from portable import portable

METHODS = "frozen,prefix,peft_prefix,apt,prompt,idspam,lpt"
TORCH_DIR = str(Path(torch.__file__).resolve().parent) + "/"


def _short(filename: str) -> str:
    """A frame's file as a short, machine-independent name: the part after site-packages, or portable's."""
    return filename.split("site-packages/")[-1] if "site-packages/" in filename else portable(filename)


def count_aten_ops(step) -> int:
    """aten operations dispatched by one call of ``step``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.n


def host_top(step, top: int = 8) -> list[dict]:
    """The ops that took the most host time in one call of ``step`` (torch.profiler, CPU activity: self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key[:80], "self_us": round(e.self_cpu_time_total, 1), "calls": e.count} for e in events[:top]]


@contextlib.contextmanager
def sync_warnings() -> Iterator[Counter]:
    """Counts, while active, the warnings torch's sync debug mode emits ("called a synchronizing CUDA operation"),
    keyed by the innermost frame outside torch (``file:line``), and keeps them off the console. Other warnings pass
    through as usual."""
    where: Counter = Counter()
    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def note(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message).lower():
                shown(message, category, filename, lineno, file, line)
                return
            # torch's own frames by torch's folder: a plain "/torch/" test also drops every frame of a venv that
            # lives under a folder named torch (the GPU machine's /opt/torch/.venv), transformers' included.
            frames = [f for f in traceback.extract_stack()[:-1]
                      if not f.filename.startswith(TORCH_DIR) and not f.filename.endswith("warnings.py")]
            site = f"{_short(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
            where[site] += 1

        warnings.showwarning = note
        yield where


def count_syncs(step, device: torch.device) -> tuple[int | None, list[str]]:
    """Host syncs in one call of ``step`` (CUDA only) and the places outside torch that caused most of them."""
    if device.type != "cuda":
        return None, []
    with sync_warnings() as where:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return sum(where.values()), [f"{k} x{v}" for k, v in where.most_common(5)]


def bench(device: torch.device, dtype: torch.dtype, tiny: bool) -> Bench:
    """perf.py's bench with its defaults, so that every case here is one of its training cases (model, batch,
    fused AdamW, the sequence clamp for RoBERTa's positions, the step itself)."""
    import os

    import perf

    args = perf.build_parser().parse_args(["--out", os.devnull] + ["--tiny"] * tiny)
    args.argv = []
    perf._defaults(args)
    return Bench(args, device, dtype)


def measure(runner: Bench, model_name: str, method: str, b: int, s: int, steps: int) -> dict:
    case = runner.train_setup(MODELS[model_name], method, b, s, gc_on=False)
    step, device = case["step"], runner.device
    for _ in range(3):
        step()
    enqueue, wall = [], []
    for _ in range(steps):
        synchronize(device)
        t = time.perf_counter()
        step()
        enqueue.append((time.perf_counter() - t) * 1e3)
        synchronize(device)
        wall.append((time.perf_counter() - t) * 1e3)
    profile = profile_kernels(step, device)
    syncs, where = count_syncs(step, device)
    return {"model": model_name, "method": method, "shape": f"{b}x{case['s']}",
            "enqueue_ms": round(statistics.median(enqueue), 3), "wall_ms": round(statistics.median(wall), 3),
            "device_ms": profile["device_ms"] if profile else None, "syncs": syncs, "sync_sites": where,
            "aten_ops": count_aten_ops(step), "host_top": host_top(step)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="roberta-large,qwen0.5b")
    p.add_argument("--shape", default="8x512")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (the test)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ((b, s),) = parse_shapes(args.shape)
    runner = bench(device, dtype, args.tiny)
    rows = []
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            try:
                row = measure(runner, model_name, method, b, s, args.steps)
            except Exception as exc:  # a method a model refuses (PEFT prefix on some encoders) is a row, not a crash
                row = {"model": model_name, "method": method, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        command = "python benchmarks/host_sync.py " + " ".join(argv if argv is not None else sys.argv[1:])
        doc = {**environment(device, dtype), "command": portable(command), "rows": rows}
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
