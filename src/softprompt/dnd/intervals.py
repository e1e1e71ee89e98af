"""Paired bootstrap intervals over evaluated examples, the cloze study's one test of "beats" (issue 21)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence


def bootstrap_interval(stat: Callable[[list[int]], float], n: int, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``stat(indices)`` over ``n_boot`` resamples of ``n`` examples with replacement (each
    resample's indices drawn in order from ``random.Random(seed)``, so that every statistic sees the same
    resamples for the same seed)."""
    rng = random.Random(seed)
    stats = sorted(stat([rng.randrange(n) for _ in range(n)]) for _ in range(n_boot))
    return stats[int((1 - level) / 2 * n_boot)], stats[min(n_boot - 1, int((1 + level) / 2 * n_boot))]


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> list[float]:
    """Percentile interval (in points) of mean(a) − mean(b) over examples, resampling examples with replacement
    (the same indices for both, since a and b score the same examples). Entries may be fractions (an example's
    mean correctness over several adapters)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired bootstrap needs two equal, non-empty lists (got {len(a)} and {len(b)})")
    n = len(a)
    diff = [x - y for x, y in zip(a, b)]
    lo, hi = bootstrap_interval(lambda idx: sum(diff[i] for i in idx) / n, n, n_boot, seed, level)
    return [round(100 * lo, 2), round(100 * hi, 2)]


def verdict(ci: Sequence[float]) -> str:
    """A paired interval of DnD − something, in a word: it excludes 0 above, below, or contains it."""
    return "wins" if ci[0] > 0 else "loses" if ci[1] < 0 else "no difference"
