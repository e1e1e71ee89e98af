"""Weight-space comparison of LoRA adapters: the cosine similarity of their updates ΔW = B·A over all modules.

Used by the leave-one-out study to ask what a generated adapter resembles: the held-out dataset's own LoRA (which
the generator never saw), or one of the training LoRAs it learned from (then generating is close to retrieval).
The Frobenius product of two updates needs only rank-by-rank products, ⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂) ∘ (A₁A₂ᵀ), so ΔW
itself (out x in per module, ~100M numbers per SmolLM2 adapter) is never formed. The LoRA scale α/r is the same
for adapters of one template and cancels in the cosine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

_A, _B = "lora_A.weight", "lora_B.weight"


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A [r, in], B [out, r])}`` of a PEFT LoRA state dict (keys ``*lora_A.weight``, ``*lora_B.weight``)."""
    out = {}
    for key, a in state.items():
        if key.endswith(_A):
            stem = key[: -len(_A)]
            if stem + _B not in state:
                raise ValueError(f"LoRA state has {key} but no {stem + _B}")
            out[stem] = (a, state[stem + _B])
    return out


def _dot(x: tuple[torch.Tensor, torch.Tensor], y: tuple[torch.Tensor, torch.Tensor]) -> float:
    (a1, b1), (a2, b2) = x, y
    device = a1.device
    a1, b1, a2, b2 = (t.to(device=device, dtype=torch.float64) for t in (a1, b1, a2, b2))
    return float(((b1.T @ b2) * (a1 @ a2.T)).sum())


def delta_cosine(x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> float:
    """Cosine similarity of the two adapters' updates, all modules concatenated (modules only one adapts count in
    its norm, as zeros in the other's update); 0.0 when either update is zero."""
    px, py = lora_pairs(x), lora_pairs(y)
    dot = sum(_dot(px[k], py[k]) for k in px.keys() & py.keys())
    nx, ny = (sum(_dot(p[k], p[k]) for k in p) for p in (px, py))
    return dot / math.sqrt(nx * ny) if nx > 0 and ny > 0 else 0.0


__all__ = ["delta_cosine", "lora_pairs"]
