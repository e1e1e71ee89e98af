"""Which rows of a mixed batch can share one backbone pass, decided from each adapter's shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.state import LayerInjection
from ..methods import MethodInputs, PromptMethod

# True when the engine can hide prefix columns per row (``LayerInjection.prefix_mask``, [B or 1, P] bool, True =
# visible): then adapters with different prefix lengths, prompts and bare rows share one forward pass.
ENGINE_PREFIX_MASK = "prefix_mask" in {f.name for f in dataclasses.fields(LayerInjection)}


@dataclass(frozen=True)
class AdapterShape:
    """How an adapter enters the forward pass; it decides which rows can share a pass.

    prompt: input-layer prompt length t (0 = none), placed at position ``prompt_at``.
    prefix: prefix length of every layer (all 0 = none).
    insertion: (layer, length, position) of vectors inserted into the hidden states, or None.
    gate: "kv" / "v" when the method gates its prefixes (APT), else None.
    solo: the method uses a layer hook this module does not know; its rows never share a pass with another adapter.
    """

    prompt: int = 0
    prompt_at: int = 0
    prefix: tuple[int, ...] = ()
    insertion: tuple[int, int, int] | None = None
    gate: str | None = None
    solo: bool = False

    @property
    def extra_positions(self) -> int:
        """Positions the adapter adds to the sequence (counts against the model's position limit)."""
        return self.prompt + (self.insertion[1] if self.insertion else 0)


def adapter_shape(method: PromptMethod, info, embed: nn.Module) -> AdapterShape:
    """Probe a method with a dummy one-row batch and read the shape of its contribution; what its layer hook does
    comes from the method itself (:meth:`PromptMethod.hook_shape`)."""
    device = embed.weight.device
    ids = torch.ones(1, 2, dtype=torch.long, device=device)
    with torch.inference_mode():
        c = method(MethodInputs(ids, torch.ones_like(ids), embed, 1))
    prompt = int(c.input_prompt.shape[1]) if c.input_prompt is not None else 0
    prefix = [0] * info.num_layers
    for i, (k, _) in c.prefixes.items():
        prefix[i] = int(k.shape[-2])
    insertion = None
    if c.insertion is not None:
        insertion = (c.insertion.layer, int(c.insertion.vectors.shape[1]), c.insertion.at)
    gate, solo = None, False
    if c.layer_hook is not None:
        hook = method.hook_shape()
        if hook is None:
            solo = True  # a hook nobody described: its rows never share a pass with another adapter
        else:
            gate, insertion = hook.gate, hook.insertion or insertion
    return AdapterShape(prompt=prompt, prompt_at=c.prompt_at if prompt else 0, prefix=tuple(prefix),
                        insertion=insertion, gate=gate, solo=solo)


def group_key(name: str | None, shape: AdapterShape | None, num_layers: int) -> tuple:
    """Rows whose adapters have equal keys can share a pass (``name``/``shape`` None: the bare model)."""
    if shape is None:
        return ("flat", None if ENGINE_PREFIX_MASK else (0,) * num_layers, None)
    if shape.solo:
        return ("solo", name)
    if shape.insertion is not None:
        return ("insertion", *shape.insertion)
    return ("flat", None if ENGINE_PREFIX_MASK else shape.prefix, shape.gate)


def plan_rows(keys: Sequence[tuple]) -> list[list[int]]:
    """Row indices of each forward pass, given every row's group key (first-row order)."""
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    # Ungated rows join a gated group with the same prefix lengths (their gate is 1): one pass instead of two.
    for key in [k for k in groups if k[0] == "flat" and k[2] is None]:
        target = next((k for k in groups if k[0] == "flat" and k[1] == key[1] and k[2] is not None), None)
        if target is not None:
            groups[target] = sorted(groups[target] + groups.pop(key))
    return sorted(groups.values(), key=lambda rows: rows[0])
