"""Task heads of many adapters on one base model: each row's own head, applied where the model applies its head."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import AdapterMismatchError

# Logit value of the label columns a row's head does not have (heads of different widths in one batch).
PAD_LOGIT = float("-inf")


class RoutedHead(nn.Module):
    """Stands in for a task-head module of the base model and applies each row's own head.

    ``routes`` is set for one forward pass: (head module, row indices) pairs that cover every row. The model's own
    forward calls this module exactly where it called its head (after its pooling), so pooling stays the model's.
    """

    def __init__(self, default: nn.Module):
        super().__init__()
        self.default = default  # the base model's own head: rows naming None, adapters saved without a head
        self.routes: list[tuple[nn.Module, torch.Tensor]] = []

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routes = self.routes or [(self.default, None)]
        if len(routes) == 1:
            return routes[0][0](hidden, *args, **kwargs)
        outs = [(idx, head(hidden[idx], *args, **kwargs)) for head, idx in routes]
        width = max(o.shape[-1] for _, o in outs)
        first = outs[0][1]
        out = first.new_full((hidden.shape[0], *first.shape[1:-1], width), PAD_LOGIT)
        for idx, o in outs:
            out[idx, ..., : o.shape[-1]] = o
        return out


def head_like(template: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """A copy of ``template`` with its Linear layers resized to ``tensors`` (heads differ in their label count)."""
    head = copy.deepcopy(template)
    for mod_name, mod in list(head.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        w = tensors.get(f"{mod_name}.weight" if mod_name else "weight")
        if w is None or tuple(w.shape) == tuple(mod.weight.shape):
            continue
        if w.dim() != 2:
            raise AdapterMismatchError(f"{where}: head tensor {mod_name}.weight has shape {tuple(w.shape)}")
        new = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device=mod.weight.device,
                        dtype=mod.weight.dtype)
        if mod_name:
            parent_name, _, attr = mod_name.rpartition(".")
            setattr(head.get_submodule(parent_name) if parent_name else head, attr, new)
        else:
            head = new
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise AdapterMismatchError(f"{where}: head tensors do not fit the base model's head ({exc})") from exc
    return head


def route_heads(routers: dict[str, RoutedHead], rows: dict, heads_of) -> None:
    """Set every router's routes for one pass: ``rows`` maps an adapter name (None = bare) to its row indices and
    ``heads_of(name)`` gives that adapter's head modules by name (empty for None)."""
    for head_name, router in routers.items():
        by_head: dict[int, tuple[nn.Module, list[torch.Tensor]]] = {}
        for name, sub in rows.items():
            head = heads_of(name).get(head_name, router.default)
            by_head.setdefault(id(head), (head, []))[1].append(sub)
        router.routes = [(head, torch.cat(parts) if len(parts) > 1 else parts[0]) for head, parts in by_head.values()]


def scatter_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], batch: int, in_order: bool = False) -> torch.Tensor:
    """Put the outputs of each pass back in batch order, padding label columns with -inf. ``in_order``: the caller
    knows (on the host) that a single part holds rows 0..batch-1 in order; then its output is returned as it is."""
    if len(parts) == 1 and in_order:
        return parts[0][1]
    first = parts[0][1]
    width = max(p.shape[-1] for _, p in parts)
    inner = max(p.shape[1] for _, p in parts) if first.dim() == 3 else None
    shape = (batch, inner, width) if inner is not None else (batch, width)
    out = first.new_full(shape, PAD_LOGIT)
    for idx, p in parts:
        if inner is not None:
            out[idx, : p.shape[1], : p.shape[-1]] = p
        else:
            out[idx, : p.shape[-1]] = p
    return out
