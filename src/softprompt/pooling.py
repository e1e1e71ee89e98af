"""Pooling of token states [B, N, d] into one vector per row, one function per meaning.

``mask`` is the padding mask [B, N] (1 = real token); every function works with left and right padding.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

POOLS = ("mean", "first", "last", "cls")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens (a row without any real token pools to zeros)."""
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def mean_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, N] weights such that ``weights @ hidden`` is :func:`masked_mean` (1 / count on real tokens, 0 on
    padding): layers of one forward that pool the same rows can share them (APT's gates)."""
    m = mask.to(torch.promote_types(dtype, torch.float32))
    return (m / m.sum(1, keepdim=True).clamp(min=1)).to(dtype)[:, None, :]


def first_real(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The first real token of each row ([CLS] under right padding)."""
    if mask is None:
        return hidden[:, 0]
    idx = (mask > 0).to(torch.int64).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def last_real(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The last real token of each row (the summary token of causal decoders)."""
    if mask is None:
        return hidden[:, -1]
    idx = (hidden.shape[1] - 1) - (mask > 0).flip(1).to(torch.int64).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """Pool by name: "mean", "first", "last", or "cls" (position 0 whatever the padding, as encoder heads read)."""
    if how == "mean":
        return masked_mean(hidden, mask)
    if how == "first":
        return first_real(hidden, mask)
    if how == "last":
        return last_real(hidden, mask)
    if how == "cls":
        return hidden[:, 0]
    raise ConfigError(f"pooling must be one of {POOLS}, got {how!r}")
