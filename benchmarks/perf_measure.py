"""Measurement helpers of ``benchmarks/perf.py``: the run's start time and its wall-clock :class:`Budget` (which
estimates a case's duration from the cases already run, so that what would not fit is skipped), device
synchronisation and clean-up, the timed step loop (CUDA events on GPU, wall clock on CPU), the measured matmul peak
that MFU is taken against, allocated and peak memory, the CUDA profiler's kernel breakdown, the flash-only SDPA
probe, and the versions, device and date recorded in the JSON.
"""

from __future__ import annotations

import datetime as _dt
import gc
import platform
import re
import time
from collections.abc import Callable
from typing import Any

import torch

_T0 = time.perf_counter()

GIB = 2.0**30

# Default seconds one case of a section may take, before any case of that section has been measured.
_DEFAULT_ESTIMATE = {"train": 25.0, "memory": 35.0, "longseq": 15.0, "forward": 15.0, "generate": 25.0}


# ---------------------------------------------------------------------------------------------------------------
# Timing, memory, kernels
# ---------------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cleanup(device: torch.device) -> None:
    """Free everything a finished case left behind."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def time_loop(fn: Callable[[], Any], warmup: int, steps: int, device: torch.device, deadline: float
              ) -> tuple[list[float], bool]:
    """Milliseconds of ``steps`` calls of ``fn`` after ``warmup`` calls (CUDA events on GPU, wall clock on CPU).

    Stops early (second value True) once ``deadline`` (a ``time.perf_counter()`` value) has passed, keeping at least
    one timed step.
    """
    for _ in range(warmup):
        fn()
        if time.perf_counter() > deadline:
            break
    synchronize(device)
    truncated = False
    times: list[float] = []
    if device.type == "cuda":
        events = []
        for i in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
            if time.perf_counter() > deadline and i + 1 < steps:
                truncated = True
                break
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for i in range(steps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000.0)
            if time.perf_counter() > deadline and i + 1 < steps:
                truncated = True
                break
    return times, truncated


def measure_peak_flops(device: torch.device, dtype: torch.dtype, tiny: bool) -> float:
    """FLOP/s of a large square ``dtype`` matmul on ``device`` (best of 3 timings of 10 back-to-back products)."""
    n = 8192 if device.type == "cuda" and not tiny else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = float("inf")
    reps = 10
    for _ in range(3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                a @ b
            end.record()
            torch.cuda.synchronize(device)
            seconds = start.elapsed_time(end) / 1000.0
        else:
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            seconds = time.perf_counter() - t
        best = min(best, seconds / reps)
    del a, b
    cleanup(device)
    return 2.0 * n**3 / best


def reset_peak(device: torch.device) -> float | None:
    """Reset the peak-memory counter; return the GiB allocated now (None on CPU: not tracked)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / GIB


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / GIB


_ATTN_KERNEL = re.compile(r"flash|fmha|attention|efficient|softmax|cutlassF|cutlassB", re.I)
_GEMM_KERNEL = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|sm90_|sm80_|wgmma", re.I)


def _device_us(event: Any) -> float:
    # Self time: a kernel's own time; CPU-side ops (whose totals include their kernels) count 0, so nothing doubles.
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attr, None)
        if value:
            return float(value)
    return 0.0


def profile_kernels(fn: Callable[[], Any], device: torch.device, top: int = 15) -> dict | None:
    """One profiled call of ``fn`` (CUDA only): device time by kernel class (attention / gemm / other) and the top
    kernels. The classes come from kernel names and are approximate."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    kernels = [(e.key, _device_us(e), e.count) for e in prof.key_averages()]
    kernels = [k for k in kernels if k[1] > 0]
    total = sum(k[1] for k in kernels) or 1.0
    classes = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    for name, us, _ in kernels:
        cls = "attention" if _ATTN_KERNEL.search(name) else "gemm" if _GEMM_KERNEL.search(name) else "other"
        classes[cls] += us
    kernels.sort(key=lambda k: -k[1])
    return {
        "device_ms": round(total / 1000.0, 3),
        "share": {k: round(v / total, 4) for k, v in classes.items()},
        "top": [{"kernel": n[:160], "ms": round(us / 1000.0, 3), "calls": c, "share": round(us / total, 4)}
                for n, us, c in kernels[:top]],
        "attention_kernels": sorted({n[:160] for n, _, _ in kernels if _ATTN_KERNEL.search(n)}),
    }


def flash_only_probe(fn: Callable[[], Any], device: torch.device) -> tuple[bool | None, str | None]:
    """Run ``fn`` (a no-grad forward) with SDPA restricted to the flash kernel: (True, None) if it runs,
    (False, reason) if SDPA has no flash kernel for that call (e.g. a materialised mask)."""
    if device.type != "cuda":
        return None, "flash attention probe needs CUDA"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.no_grad():
            fn()
        synchronize(device)
        return True, None
    except RuntimeError as exc:
        return False, _short(exc)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Budget
# ---------------------------------------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget of the whole run; estimates a case's duration from the cases already run."""

    def __init__(self, seconds: float | None, tiny: bool):
        self.seconds = seconds if seconds and seconds > 0 else None
        self.tiny = tiny
        self.seen: dict[tuple[str, str], float] = {}

    def deadline(self) -> float:
        return _T0 + self.seconds if self.seconds else float("inf")

    def remaining(self) -> float:
        return self.deadline() - time.perf_counter()

    def record(self, section: str, model: str, seconds: float) -> None:
        key = (section, model)
        self.seen[key] = max(self.seen.get(key, 0.0), seconds)

    def estimate(self, section: str, model: str) -> float:
        if (section, model) in self.seen:
            return self.seen[(section, model)]
        same = [v for (s, _), v in self.seen.items() if s == section]
        if same:
            return max(same)
        return 1.0 if self.tiny else _DEFAULT_ESTIMATE.get(section, 20.0)

    def allows(self, section: str, model: str) -> bool:
        """True while the remaining time covers the estimated case plus a margin."""
        if self.seconds is None:
            return True
        margin = 2.0 + 0.02 * self.seconds
        return self.remaining() > 1.15 * self.estimate(section, model) + margin


# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------
def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Versions, device and date for the JSON."""
    import peft
    import transformers

    import softprompt

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "softprompt": getattr(softprompt, "__version__", "?"), "device": str(device),
        "dtype": str(dtype).split(".")[-1],
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1), cuda=torch.version.cuda)
    else:
        meta.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return meta
