"""Memory bounds of the theory lab, checked from the sizes alone before anything is allocated.

Every size a user can give (``d``, the number of tasks, the context lengths ``n``, Monte-Carlo draws, the
training batch and restarts) is turned into an estimate of the bytes of the largest arrays the run holds at
once. A size whose estimate exceeds the limit raises :class:`~softprompt.errors.ConfigError` with one line
naming the field, the value, the estimate, the limit and the largest value that fits.

The limit is half of the memory that is available now (``MemAvailable`` on Linux) for host work, and 80% of
the free memory of a CUDA device for work on it. Half, because the estimates count only the large arrays
(temporaries of numpy/torch are covered by a factor, not exactly) and other processes share the machine.
``SOFTPROMPT_THEORY_MAX_MEMORY`` (bytes, or a number with a ``KiB``/``MiB``/``GiB``/``TiB`` or ``KB``/``MB``/
``GB``/``TB`` suffix) replaces the limit for every device.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError
from ..memory import available_host_memory

__all__ = [
    "ENV_VAR",
    "Limit",
    "check_closed_forms",
    "check_mixture",
    "check_training",
    "closed_forms_bytes",
    "fit_mc_chunk",
    "format_bytes",
    "mc_draw_bytes",
    "memory_limit",
    "mixture_bytes",
    "training_bytes",
]

ENV_VAR = "SOFTPROMPT_THEORY_MAX_MEMORY"
_F64 = 8
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Limit:
    """A memory limit in bytes and where it comes from (quoted in error messages)."""

    bytes: int
    source: str


def format_bytes(n: float) -> str:
    """``1234567890`` -> ``'1.15 GiB'``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{ENV_VAR}={text!r} is not a size; use bytes or a number with GiB/MiB/GB/MB, e.g. 8GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def memory_limit(device: str = "cpu") -> Limit:
    """The memory a theory computation on ``device`` may use: see the module docstring."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Limit(_parse_bytes(env), ENV_VAR)
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return Limit(int(0.8 * free), f"80% of the free memory of {device}; {ENV_VAR} overrides it")
    avail = available_host_memory()
    if avail is None:  # unknown platform: a cap that any machine running these experiments has
        return Limit(4 * 2**30, f"a fixed cap (available memory unknown); {ENV_VAR} overrides it")
    return Limit(avail // 2, f"half of the available memory; {ENV_VAR} overrides it")


# ------------------------------------------------------------------ estimates (bytes)
def mixture_bytes(d: int, k: int) -> int:
    """A mixture's ``d x d`` matrices (K covariances, their square roots for sampling, ``Sigma_x``, the
    moments) plus the work of one closed form at one ``n``: ``(3K + 16) d^2`` float64s."""
    return _F64 * (3 * k + 16) * d * d


def closed_forms_bytes(d: int, k: int, num_n: int) -> int:
    """One closed form over ``num_n`` context lengths: per ``n`` the ``K`` stacked preconditioners and about
    8 solver temporaries, plus ``2K + 12`` fixed ``d x d`` matrices (``jt_gc`` builds a centred mixture)."""
    return _F64 * d * d * (num_n * (k + 8) + 2 * k + 12)


def mc_draw_bytes(d: int, n: int, runs: int = 1, itemsize: int = _F64) -> int:
    """Memory per Monte-Carlo draw: the context ``X`` (and its ``Sigma_x`` transform and einsum temporaries),
    the labels, the query, the ``(d+1)^2`` Gram matrix of a trained model and its per-run vectors."""
    big_d = d + 1
    return itemsize * (3 * n * d + 4 * n + big_d * big_d + 4 * (runs + 1) * big_d + 8 * d)


def training_bytes(d: int, k: int, ns: list[int], batch: int, runs: int, itemsize: int) -> int:
    """Memory of one training step plus one evaluation chunk (float64) of :func:`~.train.train_multi`.

    Per step and task: the draws (``X`` and temporaries, ``3 n_max d``; tokens ``n_max (d+1)``), the prefix Gram
    matrices (4 copies of ``len(ns) (d+1)^2``) and the forward/backward activations of all ``runs * len(ns)``
    restarts (``9 (d+1)`` each).
    """
    big_d, n_max, num_n = d + 1, max(ns), len(ns)
    per_prompt = 3 * n_max * d + 2 * n_max + n_max * big_d + 4 * d + 4 * num_n * big_d * big_d
    per_prompt += 9 * runs * num_n * big_d
    step = itemsize * k * batch * per_prompt
    return step + batch * mc_draw_bytes(d, n_max, runs)


# ---------------------------------------------------------------------- checks
def _largest(need: Callable[[int], int], limit: int, hi: int) -> int:
    """The largest value in ``[0, hi]`` whose ``need`` fits ``limit`` (``need`` grows with its argument)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _refuse(field: str, value: object, need: int, what: str, limit: Limit, fix: str) -> ConfigError:
    return ConfigError(
        f"{field} = {value}: needs about {format_bytes(need)} ({what}), over the limit of "
        f"{format_bytes(limit.bytes)} ({limit.source}); {fix}"
    )


def check_mixture(d: int, k: int) -> None:
    """Refuse a mixture whose ``d x d`` matrices would not fit, before they are allocated."""
    limit = memory_limit("cpu")
    need = mixture_bytes(d, k)
    if need <= limit.bytes:
        return
    best_d = _largest(lambda v: mixture_bytes(v, k), limit.bytes, d)
    if best_d >= 1:
        fix = f"use d <= {best_d}"
    else:
        fix = f"use fewer tasks (K = {k}) or a machine with more memory"
    raise _refuse("theory config field 'd'", d, need, f"{3 * k + 16} float64 {d}x{d} matrices for K = {k} tasks",
                  limit, fix)


def check_closed_forms(d: int, k: int, num_n: int) -> None:
    """Refuse closed forms over ``num_n`` context lengths that would not fit in memory together."""
    limit = memory_limit("cpu")
    need = closed_forms_bytes(d, k, num_n)
    if need <= limit.bytes:
        return
    best = _largest(lambda v: closed_forms_bytes(d, k, v), limit.bytes, num_n)
    fix = f"give at most {best} values of --n per run" if best >= 1 else "reduce d"
    what = f"{k + 8} float64 {d}x{d} matrices per value of n"
    raise _refuse("the number of context lengths (--n)", num_n, need, what, limit, fix)


def fit_mc_chunk(d: int, n: int, chunk: int, runs: int = 1, itemsize: int = _F64, device: str = "cpu") -> int:
    """The Monte-Carlo chunk to use: ``chunk``, or fewer draws per chunk when ``chunk`` would not fit.

    Splitting the draws into smaller chunks changes only how many are drawn at once, not their number, so
    ``draws`` itself never needs memory; only one draw that does not fit (``n`` and ``d`` too large) is refused.
    """
    limit = memory_limit(device)
    per = mc_draw_bytes(d, n, runs, itemsize)
    if chunk * per <= limit.bytes:
        return chunk
    fits = limit.bytes // per
    if fits >= 1:
        return int(fits)
    best_n = _largest(lambda v: mc_draw_bytes(d, v, runs, itemsize), limit.bytes, n)
    raise _refuse("context length n", n, per, f"one Monte-Carlo draw of {n} x {d} inputs", limit,
                  f"use n <= {best_n}" if best_n >= 1 else "reduce d")


def check_training(d: int, k: int, ns: list[int], batch: int, runs: int, itemsize: int, device: str) -> None:
    """Refuse a training configuration whose step (all restarts, all ``ns``) would not fit on ``device``."""
    limit = memory_limit(device)
    need = training_bytes(d, k, ns, batch, runs, itemsize)
    if need <= limit.bytes:
        return
    best = _largest(lambda v: training_bytes(d, k, ns, v, runs, itemsize), limit.bytes, batch)
    if best >= 1:
        fix = f"use --batch <= {best} (TrainConfig.batch)"
    else:
        fix = f"even --batch 1 does not fit: reduce --runs ({runs}), the number or size of --n (max {max(ns)}) or d"
    what = f"one step of {runs} restarts x {len(ns)} context lengths, n up to {max(ns)}, d = {d}, K = {k}"
    raise _refuse("training batch (--batch)", batch, need, what, limit, fix)
