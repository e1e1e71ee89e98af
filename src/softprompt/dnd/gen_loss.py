"""Loss pieces of the hyper-convolutional generator: per-token weights, masked weighted MSE, lr schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def token_weights(grids: torch.Tensor, datasets: Sequence[str]) -> torch.Tensor:
    """Per-token loss weight [T]: each token's std across a dataset's checkpoints (mean over its entries),
    normalised to mean 1 per dataset, averaged over datasets; uniform where undefined."""
    per = []
    for d in dict.fromkeys(datasets):
        g = grids[[i for i, x in enumerate(datasets) if x == d]]
        if g.shape[0] < 2:
            continue
        s = torch.nan_to_num(g.std(dim=0), nan=0.0)
        cnt = (~torch.isnan(g[0])).sum(dim=(1, 2)).clamp_min(1)
        s = s.sum(dim=(1, 2)) / cnt
        if s.mean() > 0:
            per.append(s / s.mean())
    if not per:
        return torch.ones(grids.shape[1])
    w = torch.stack(per).mean(0)
    return torch.where(w > 0, w, torch.full_like(w, 1e-3))


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ w_t·m·(p−y)² / Σ w_t·m over the batch; ``target`` may hold NaN where ``mask`` is False."""
    mask = mask.expand_as(pred)
    m = mask.to(torch.float32) * weight.to(pred.dtype)[:, None, None]
    diff = torch.where(mask, pred.float() - torch.nan_to_num(target.float()),
                       torch.zeros_like(pred, dtype=torch.float32))
    return (diff.pow(2) * m).sum() / m.sum().clamp_min(1e-12)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))


__all__ = ["token_weights", "warmup_cosine", "weighted_mse"]
