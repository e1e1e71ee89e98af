"""Paired bootstrap intervals over evaluated examples, the cloze study's one test of "beats" (issue 21)."""

from __future__ import annotations

import random
from collections.abc import Sequence


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> list[float]:
    """Percentile interval (in points) of mean(a) − mean(b) over examples, resampling examples with replacement
    (the same indices for both, since a and b score the same examples). Entries may be fractions (an example's
    mean correctness over several adapters)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired bootstrap needs two equal, non-empty lists (got {len(a)} and {len(b)})")
    n = len(a)
    diff = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    stats = sorted(sum(diff[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = stats[int((1 - level) / 2 * n_boot)]
    hi = stats[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return [round(100 * lo, 2), round(100 * hi, 2)]


def verdict(ci: Sequence[float]) -> str:
    """A paired interval of DnD − something, in a word: it excludes 0 above, below, or contains it."""
    return "wins" if ci[0] > 0 else "loses" if ci[1] < 0 else "no difference"
