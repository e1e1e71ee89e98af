"""The hyper-convolutional decoder of DnD (spec ``dnd.md`` §1(d)-(e)) and the zoo checkpoints it learns, as token
grids. Split out of :mod:`.generator` so that the training loop (:mod:`.gen_train`) and the public entry points
(:mod:`.generator`) both build on it without importing each other.

Input per sample: the condition map [N, L, D] (N prompts × L tokens × D hidden, from :mod:`.condition`); output:
the token grid [T, r+2, c+2] of :mod:`.tokenizer`. The chain of shapes (N, H, W) goes from the condition shape to
the target shape through ``n_layers`` :class:`HyperConvLayer` s; heights and widths are interpolated geometrically
and the channel counts are ``width, 2·width, 4·width, …`` (the size knob), ending at T.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .export import read_lora_tensors
from .tokenizer import TokenLayout, canonicalize_state, detokenize, from_grid, to_grid, tokenize

Shape = tuple[int, int, int]


def plan_chain(in_shape: Shape, out_shape: Shape, width: int = 64, n_layers: int = 4) -> list[Shape]:
    """Shapes (N, H, W) from the condition map to the token grid: ``n_layers + 1`` entries.

    Intermediate channels are ``width·2^i``; H and W move geometrically from input to target."""
    if n_layers < 1:
        raise ValueError("n_layers >= 1")
    (_n0, h0, w0), (_nt, ht, wt) = in_shape, out_shape
    chain = [tuple(in_shape)]
    for i in range(1, n_layers):
        f = i / n_layers
        chain.append((width * 2 ** (i - 1), max(1, round(h0 * (ht / h0) ** f)), max(1, round(w0 * (wt / w0) ** f))))
    chain.append(tuple(out_shape))
    return chain


def layer_parameters(i: Shape, o: Shape, k: int) -> int:
    """Parameter count of one :class:`HyperConvLayer` (hand formula)."""
    (n, h, w), (n2, h2, w2) = i, o
    return (2 * h * w  # LayerNorm over (H, W)
            + 2 * (w * w2 * k * k + w2)  # width convs of both branches
            + 2 * (h * h2 * k * k + h2)  # height convs of both branches
            + h2 * w2  # branch bias
            + n * n2 * k * k + n2)  # channel conv


def chain_parameters(chain: Sequence[Shape], k: int) -> int:
    """Parameter count of a whole decoder chain."""
    return sum(layer_parameters(a, b, k) for a, b in itertools.pairwise(chain))


class HyperConvLayer(nn.Module):
    """(N, H, W) -> (N′, H′, W′); see the module docstring."""

    def __init__(self, in_shape: Shape, out_shape: Shape, kernel: int = 9) -> None:
        super().__init__()
        (n, h, w), (n2, h2, w2) = in_shape, out_shape
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.norm = nn.LayerNorm([h, w])
        pad = "same"
        self.a_width = nn.Conv2d(w, w2, kernel, padding=pad)
        self.a_height = nn.Conv2d(h, h2, kernel, padding=pad)
        self.b_height = nn.Conv2d(h, h2, kernel, padding=pad)
        self.b_width = nn.Conv2d(w, w2, kernel, padding=pad)
        self.bias = nn.Parameter(torch.zeros(h2, w2))
        self.channel = nn.Conv2d(n, n2, kernel, padding=pad)
        self.residual = self.in_shape == self.out_shape

    @staticmethod
    def _width(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:  # [B,N,H,W] -> [B,N,H,W']
        return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    @staticmethod
    def _height(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:  # [B,N,H,W] -> [B,N,H',W]
        return conv(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, H, W] -> [B, N′, H′, W′]."""
        y = self.norm(x)
        a = self._height(self.a_height, self._width(self.a_width, y))
        b = torch.tanh(self._width(self.b_width, self._height(self.b_height, y)))
        y = self.channel((a + b + self.bias) / 3)
        return y + x if self.residual else y


class HyperConvDecoder(nn.Module):
    """A chain of :class:`HyperConvLayer` s: condition [B, N, L, D] -> token grid [B, T, r+2, c+2]."""

    def __init__(self, chain: Sequence[Shape], kernel: int = 9) -> None:
        super().__init__()
        self.chain = [tuple(int(v) for v in s) for s in chain]
        self.kernel = kernel
        self.layers = nn.ModuleList(HyperConvLayer(a, b, kernel) for a, b in zip(self.chain[:-1], self.chain[1:]))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition [B, N, L, D] -> grid [B, T, r+2, c+2]."""
        x = cond
        for layer in self.layers:
            x = layer(x)
        return x

    def count_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def load_zoo_tensors(entries: Sequence[Mapping], chunk: int, target: str = "ab",
                     cache: dict | None = None, stats_code: str = "relative",
                     workers: int | None = None) -> tuple[TokenLayout, torch.Tensor, list[str]]:
    """Tokenise every zoo checkpoint: (layout, grids [M, T, r+2, c+2] float32, dataset of each).

    ``cache`` (optional) maps ``(path, chunk, target, stats_code)`` to a checkpoint's grid: hits are not
    re-tokenised and misses are added, so several generators trained in one process tokenise each checkpoint once.
    ``workers`` threads tokenise the misses (default: up to 8 CPU cores); each grid depends on its own checkpoint
    alone, so the result does not depend on the thread count."""
    from concurrent.futures import ThreadPoolExecutor

    if not entries:
        raise ValueError("empty zoo")
    keys = [(str(e["path"]), chunk, target, stats_code) for e in entries]
    first = canonicalize_state(read_lora_tensors(entries[0]["path"]), target)
    layout = TokenLayout.from_state_dict(first, chunk, stats_code)  # from the first checkpoint's tensors

    def grid_of(path: str) -> torch.Tensor:
        return _grid(path, layout, target)

    known = dict(cache or {})
    todo = list(dict.fromkeys(k for k in keys if k not in known))
    n = workers if workers is not None else min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, n)) as pool:
        for k, g in zip(todo, pool.map(grid_of, [k[0] for k in todo])):
            known[k] = g
            if cache is not None:
                cache[k] = g
    return layout, torch.stack([known[k] for k in keys]), [e["dataset"] for e in entries]


def _grid(path: str, layout: TokenLayout, target: str) -> torch.Tensor:
    """One zoo checkpoint as the generator's regression target (a float32 token grid)."""
    return to_grid(tokenize(canonicalize_state(read_lora_tensors(path), target), layout), layout.stats_code)


def grid_mean_state(entries: Sequence[Mapping], layout: TokenLayout, target: str = "ab",
                    workers: int | None = None) -> dict[str, torch.Tensor]:
    """The adapter a generator makes for a condition it ignores: the constant output that minimises its (weighted)
    MSE over checkpoints drawn uniformly from ``entries`` is the elementwise mean of their token grids, decoded as a
    generated grid is (:func:`.tokenizer.from_grid`, :func:`.tokenizer.detokenize`). Unlike the mean of the
    checkpoints' A and B, this is exact in the generator's own token space (statistics code and all). The grids
    are summed in float64 in the entries' order, so the result does not depend on ``workers`` (threads)."""
    from concurrent.futures import ThreadPoolExecutor

    if not entries:
        raise ValueError("empty zoo")
    n = workers if workers is not None else min(8, os.cpu_count() or 1)
    total = None
    with ThreadPoolExecutor(max(1, n)) as pool:
        for g in pool.map(lambda e: _grid(str(e["path"]), layout, target), entries):
            total = g.double() if total is None else total + g.double()
    return detokenize(from_grid(total / len(entries), layout), layout, dtype=torch.float32)
