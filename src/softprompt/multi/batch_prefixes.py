"""The per-layer prefixes of a decoding batch's rows, kept stacked the way the KV cache is.

After prefill every adapter is a per-layer key/value prefix (``engine.compose.resolved_prefixes``). A decoding batch
needs those of all its rows as one [B, H, P, D] table per layer. Rebuilding the tables from each row's own prefixes
whenever a row joins or leaves costs a stack and a write per row, which at saturation (rows change at nearly every
step) is host time the bare model does not pay. Here the tables live as one tensor [B, 2L, H, P_max, D] that grows
by concatenation when rows join and shrinks by one selection when rows leave, with a visibility mask per layer for
rows that see fewer columns (shorter prefixes, a layer without prefix, bare rows). Layers with the same visibility
share one mask tensor, so attention builds its mask once per forward, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.compose import Contribution, resolved_prefixes
from ..engine.state import InjectionState


@dataclass
class BatchPrefixes:
    """Prefix tables of ``rows`` rows.

    layers: engine layer indices with a prefix for some row (ascending).
    table: [rows, 2 * len(layers), H_kv, P, D]: key then value of each layer.
    masks: per layer, [rows, P] bool (True = the row sees the column) or None (every row sees every column); layers
        with equal visibility hold the same tensor object.
    """

    layers: tuple[int, ...]
    table: torch.Tensor
    masks: tuple[torch.Tensor | None, ...]

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    @property
    def width(self) -> int:
        return self.table.shape[-2]

    @classmethod
    def from_state(cls, state: InjectionState | None, rows: int, dtype: torch.dtype, device: torch.device
                   ) -> BatchPrefixes | None:
        """The prefixes attention used in a finished no-grad forward of ``rows`` rows (cast, gated, insertions turned
        into prefixes); None when that forward had none."""
        if state is None:
            return None
        resolved = resolved_prefixes(state, dtype, device, rows)
        if not resolved:
            return None
        layers = tuple(sorted(resolved))
        width = max(resolved[i][0].shape[-2] for i in layers)
        if all(resolved[i][0].shape[-2] == width for i in layers):
            table = torch.stack([t for i in layers for t in resolved[i]], dim=1)  # one op in the common case
        else:
            k0 = resolved[layers[0]][0]
            table = k0.new_zeros(rows, 2 * len(layers), k0.shape[1], width, k0.shape[3])
            for j, i in enumerate(layers):
                key, value = resolved[i]
                table[:, 2 * j, :, : key.shape[-2]] = key
                table[:, 2 * j + 1, :, : value.shape[-2]] = value
        shared: dict = {}
        masks = []
        for i in layers:
            own, n = state.layers[i].prefix_mask, resolved[i][0].shape[-2]
            key = (id(own), n)
            if key not in shared:
                shared[key] = _visible(own, n, width, rows, device)
            masks.append(shared[key])
        return cls(layers, table, tuple(masks))

    def select(self, index: torch.Tensor) -> BatchPrefixes:
        """The rows at ``index`` (rows leaving the batch); shared masks stay shared."""
        picked: dict[int, torch.Tensor] = {}
        masks = tuple(None if m is None else picked.setdefault(id(m), m[index]) for m in self.masks)
        return BatchPrefixes(self.layers, self.table[index], masks)

    def contribution(self) -> Contribution:
        """The tables as one contribution covering every row (see ``engine.compose.compose``)."""
        flat = self.table.unbind(1)  # one op for every layer's views
        prefixes = {i: (flat[2 * j], flat[2 * j + 1]) for j, i in enumerate(self.layers)}
        masks = {i: m for i, m in zip(self.layers, self.masks) if m is not None}
        return Contribution(prefixes=prefixes, prefix_mask=masks)


def concat(first: BatchPrefixes | None, first_rows: int, second: BatchPrefixes | None, second_rows: int
           ) -> BatchPrefixes | None:
    """Rows of ``second`` after rows of ``first`` (either may be None: rows without prefixes)."""
    if first_rows == 0 or second_rows == 0:  # an empty batch takes the rows' own tables (and masks: often None)
        return second if first_rows == 0 else first
    if first is None and second is None:
        return None
    blocks = [(first, first_rows), (second, second_rows)]
    layers = tuple(sorted({i for b, _ in blocks if b is not None for i in b.layers}))
    width = max(b.width for b, _ in blocks if b is not None)
    like = (first or second).table
    tables, mask_parts = [], []
    for block, n in blocks:
        if block is not None and block.layers == layers and block.width == width:
            tables.append(block.table)
        else:
            table = like.new_zeros(n, 2 * len(layers), like.shape[2], width, like.shape[4])
            if block is not None:
                where = [2 * layers.index(i) + kv for i in block.layers for kv in (0, 1)]
                table[:, where, :, : block.width] = block.table
            tables.append(table)
        mask_parts.append(_layer_masks(block, n, layers, width, like.device))
    # Layers whose two halves are the same pair of (shared) masks get one shared result.
    joined: dict[tuple, torch.Tensor | None] = {}
    masks = []
    for a, b in zip(*mask_parts):
        key = (id(a), id(b))
        if key not in joined:
            joined[key] = None if a is None and b is None else torch.cat([
                _all(first_rows, width, like.device) if a is None else a,
                _all(second_rows, width, like.device) if b is None else b])
        masks.append(joined[key])
    return BatchPrefixes(layers, torch.cat(tables), tuple(masks))


def _layer_masks(block: BatchPrefixes | None, rows: int, layers: tuple[int, ...], width: int, device: torch.device
                 ) -> list[torch.Tensor | None]:
    """``block``'s visibility per layer of ``layers`` at ``width`` columns (None = all visible); a layer the block
    has no prefix in, or a block of rows without prefixes, sees nothing."""
    hidden = torch.zeros(rows, width, dtype=torch.bool, device=device)
    if block is None:
        return [hidden] * len(layers)
    widened: dict[int, torch.Tensor | None] = {}
    out = []
    for i in layers:
        if i not in block.layers:
            out.append(hidden)
            continue
        m = block.masks[block.layers.index(i)]
        if block.width == width:
            out.append(m)
            continue
        if id(m) not in widened:
            base = _all(rows, block.width, device) if m is None else m
            widened[id(m)] = torch.cat([base, hidden[:, : width - block.width]], dim=1)
        out.append(widened[id(m)])
    return out


def _visible(own: torch.Tensor | None, n: int, width: int, rows: int, device: torch.device) -> torch.Tensor | None:
    """A layer's [rows, width] visibility from its prefill mask ([1|rows, n] or None) and its length n."""
    if own is None and n == width:
        return None
    seen = _all(rows, n, device) if own is None else own.to(device=device, dtype=torch.bool).expand(rows, n)
    if n == width:
        return seen
    return torch.cat([seen, torch.zeros(rows, width - n, dtype=torch.bool, device=device)], dim=1)


def _all(rows: int, width: int, device: torch.device) -> torch.Tensor:
    return torch.ones(rows, width, dtype=torch.bool, device=device)
