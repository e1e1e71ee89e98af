"""Which adapter does DnD answer like? Example-level agreement of correctness (issue 21's "why").

Accuracy alone cannot tell a generated adapter that copies one training LoRA from one that averages the zoo when the
two score alike. Their answers can: for every evaluated example, is DnD right where that adapter is right? Cohen's
kappa removes the agreement two adapters would show by chance at their accuracies. DnD's correctness per example is
its mean over draws (a fraction), so agreement is the probability that a DnD draw and the other adapter agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .intervals import bootstrap_interval


def soft_kappa(x: Sequence[float], y: Sequence[float]) -> float:
    """Cohen's kappa of two per-example correctness vectors with entries in [0, 1] (fractions: the share of draws
    that are right): observed agreement ``mean(x·y + (1−x)(1−y))`` against ``p·q + (1−p)(1−q)`` expected from the
    two accuracies. Equals Cohen's kappa on 0/1 entries; 0.0 when chance agreement is already 1."""
    if len(x) != len(y) or not x:
        raise ValueError(f"soft_kappa needs two equal, non-empty lists (got {len(x)} and {len(y)})")
    n = len(x)
    observed = sum(a * b + (1 - a) * (1 - b) for a, b in zip(x, y)) / n
    p, q = sum(x) / n, sum(y) / n
    expected = p * q + (1 - p) * (1 - q)
    return 0.0 if expected >= 1 else (observed - expected) / (1 - expected)


def kappa_gap_interval(x: Sequence[float], y: Sequence[float], z: Sequence[float], n_boot: int = 2000,
                       seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of ``soft_kappa(x, y) − soft_kappa(x, z)``, resampling examples (the same
    indices for all three: they score the same examples)."""
    if not len(x) == len(y) == len(z):
        raise ValueError(f"kappa_gap_interval needs three equal lists (got {len(x)}, {len(y)}, {len(z)})")

    def gap(idx: list[int]) -> float:
        xs = [x[i] for i in idx]
        return soft_kappa(xs, [y[i] for i in idx]) - soft_kappa(xs, [z[i] for i in idx])

    lo, hi = bootstrap_interval(gap, len(x), n_boot, seed, level)
    return [round(lo, 3), round(hi, 3)]


def answer_agreement(per_dnd: Sequence[float], zoo_mean: Sequence[float], loras: Mapping[str, Sequence[float]],
                     nearest: str) -> dict[str, Any]:
    """DnD's kappa with each training LoRA and with the zoo mean on the held-out examples; the LoRA it answers most
    like (picked on these examples: descriptive); and, for the nearest LoRA (chosen from the prompts before any
    answer was seen), an interval of its kappa minus the zoo mean's: above 0, DnD answers like that LoRA rather
    than like an average of the zoo."""
    kappas = {d: round(soft_kappa(per_dnd, v), 3) for d, v in loras.items()}
    return {"kappa_zoo_mean": round(soft_kappa(per_dnd, zoo_mean), 3), "kappa_lora": kappas,
            "most_alike": max(kappas, key=kappas.__getitem__),
            "ci_kappa_nearest_minus_zoo_mean": kappa_gap_interval(per_dnd, loras[nearest], zoo_mean)}


__all__ = ["answer_agreement", "kappa_gap_interval", "soft_kappa"]
