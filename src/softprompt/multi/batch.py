"""One mixed batch through the backbone: split by the plan, composed into one state per pass (engine/compose)."""

from __future__ import annotations

import torch
from torch import nn

from ..engine.compose import Part, compose, insert_row_prompts
from ..engine.state import STATE_KWARG
from ..errors import SequenceTooLongError
from .adapters import LoadedAdapter
from .heads import route_heads


def row_indices(groups: list[list[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Index tensors of several row lists on ``device``, from one host-to-device copy (views of one tensor)."""
    flat = torch.tensor([i for rows in groups for i in rows], dtype=torch.long).to(device, non_blocking=True)
    return flat.split([len(rows) for rows in groups])


def run_rows(model: nn.Module, idx: torch.Tensor, names: list, ids: torch.Tensor, mask: torch.Tensor,
             token_types: torch.Tensor | None, trim_mask: torch.Tensor | None = None
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One planned group of ``model`` (a :class:`~softprompt.multi.MultiAdapterModel`): (row indices, logits)
    pairs. The group is split further only if padding its rows to the longest prompt would exceed the model's
    position limit. ``trim_mask``: the same rows' mask where reading it costs no device sync (a host copy), if any."""
    limit = model.info.max_positions
    entries = [None if n is None else model.adapter(n) for n in names]
    extra = [0 if e is None else e.shape.extra_positions for e in entries]
    lo, hi = trim_bounds(mask if trim_mask is None else trim_mask)
    needed = (hi - lo) + max(extra)
    if limit is None or needed <= limit or len(set(extra)) == 1:
        # A single extra length that does not fit is the caller's fault: raise with the numbers.
        if limit is not None and needed > limit:
            raise SequenceTooLongError(
                f"sequence of {hi - lo} tokens + {max(extra)} prompt tokens = {needed} exceeds the position limit "
                f"{limit} of {model.info.model_type}; truncate inputs to at most {limit - max(extra)} tokens"
            )
        out = run_group(model, entries, ids[:, lo:hi], mask[:, lo:hi],
                        token_types[:, lo:hi] if token_types is not None else None)
        return [(idx, untrim(out, lo, hi, ids.shape[1]))]
    # Rows padded by slots would pass the limit: run each prompt length on its own (each fits alone).
    result = []
    lengths = sorted(set(extra))
    selections = [[i for i, x in enumerate(extra) if x == e] for e in lengths]
    for sel, s in zip(selections, row_indices(selections, idx.device)):
        result.extend(run_rows(model, idx[s], [names[i] for i in sel], ids[s], mask[s],
                               token_types[s] if token_types is not None else None))
    return result


def run_group(model: nn.Module, entries: list[LoadedAdapter | None], ids: torch.Tensor, mask: torch.Tensor,
              token_types: torch.Tensor | None) -> torch.Tensor:
    """One backbone pass for rows that can share it: each adapter's method runs on its own rows, the composer
    stacks their contributions, and each row's own head reads the output."""
    g = ids.shape[0]
    device = ids.device
    embed = model.base_model.get_input_embeddings()
    # Rows of each adapter, in first-appearance order (None = the bare model).
    order: dict[str | None, list[int]] = {}
    for i, e in enumerate(entries):
        order.setdefault(None if e is None else e.name, []).append(i)
    rows = dict(zip(order, row_indices(list(order.values()), device)))
    parts = []
    for name, sub in rows.items():
        if name is not None:
            entry = model.adapter(name)
            contribution = entry.contribution(ids, mask, sub, embed)
            parts.append(Part(contribution, sub, entry.method.hook_shape()))
    inputs: dict = {"attention_mask": mask}
    if token_types is not None:
        inputs["token_type_ids"] = token_types
    prompts = [(p.rows, p.contribution.input_prompt, p.contribution.prompt_at) for p in parts
               if p.contribution.input_prompt is not None]
    keep = None
    if prompts:
        inputs.update(insert_row_prompts(embed(ids), mask, prompts, causal=model.info.is_causal,
                                         token_types=token_types))
        keep = inputs.pop("keep")
    else:
        inputs["input_ids"] = ids
    if model.info.is_causal:
        # Positions count real tokens only (as generate() does for left padding): prefix keys carry no position,
        # so a row must see the same query positions as when it runs alone, unpadded.
        inputs["position_ids"] = (inputs["attention_mask"].long().cumsum(1) - 1).clamp(min=0)
    state = compose(parts, g, inputs["attention_mask"], dtype=model.base_model.dtype)
    route_heads(model.routers, rows, lambda n: {} if n is None else dict(model.adapter(n).modules.heads))
    try:
        out = model.base_model(**inputs, **{STATE_KWARG: state})
    finally:
        for router in model.routers.values():
            router.routes = []
    model.stats.backbone_passes += 1
    logits = out.logits
    if keep is not None and logits.dim() == 3 and logits.shape[1] == inputs["attention_mask"].shape[1]:
        # Token-level outputs: drop prompt and slot positions, row by row.
        logits = logits.gather(1, keep[..., None].expand(-1, -1, logits.shape[-1]))
    return logits


def trim_bounds(mask: torch.Tensor) -> tuple[int, int]:
    """Column range [lo, hi) outside which every row is padding (at least one column). One read of three numbers
    (a single device sync for a device mask)."""
    cols = mask.any(0).to(torch.uint8)
    found, lo, back = torch.stack([cols.max(), cols.argmax(), cols.flip(0).argmax()]).tolist()
    return (lo, cols.shape[0] - back) if found else (0, cols.shape[0])


def untrim(logits: torch.Tensor, lo: int, hi: int, length: int) -> torch.Tensor:
    """Give token-level outputs of a trimmed batch their padding columns back (logits 0 there)."""
    if logits.dim() != 3 or (lo == 0 and hi == length) or logits.shape[1] != hi - lo:
        return logits
    out = logits.new_zeros(logits.shape[0], length, logits.shape[2])
    out[:, lo:hi] = logits
    return out
