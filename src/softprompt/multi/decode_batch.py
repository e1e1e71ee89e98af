"""The model-side state of a decoding batch: every row's KV cache, attention mask and adapter prefixes.

``GenerationEngine`` owns the requests and decides who joins and leaves; a batch object holds what the model needs
for those rows and runs the decoding forward. Two implementations share one small interface (``rows``, ``join``,
``keep``, ``forward``):

* :class:`DynamicBatch` (the default): transformers' ``DynamicCache``; rows are left-padded to one length, a join
  concatenates caches, a step grows every layer's cache by one column. Shapes change at every step.
* :class:`~softprompt.multi.static_batch.StaticBatch`: preallocated buffers of fixed shape, so that a decoding step
  can be captured once per batch-size bucket as a CUDA graph and replayed (no per-step Python or launch cost).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..engine.compose import Part, compose
from ..engine.state import STATE_KWARG
from .batch_prefixes import BatchPrefixes, concat


class DynamicBatch:
    """Rows left-padded in one ``DynamicCache``; the decode state is rebuilt only when rows join or leave."""

    def __init__(self, model, cache_arg: str):
        self.model = model
        self.cache_arg = cache_arg  # "cache" (transformers >= 5.24) or "past_key_values"
        self.rows = 0
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 = a position of the row's own sequence
        self._prefixes: BatchPrefixes | None = None  # the rows' adapters, as their prefill resolved them
        self._state = None  # the decode steps' InjectionState (None: no prefixes)
        self._stale = False  # rows changed since the state was built

    def join(self, cache: DynamicCache, mask: torch.Tensor, block: BatchPrefixes | None) -> None:
        """Append prefilled rows (their cache, [k, S] mask and prefixes): both caches are left-padded to one length
        and stacked, and the rows' prefixes are appended to the batch's."""
        k = mask.shape[0]
        self._prefixes = concat(self._prefixes, self.rows, block, k)
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self._cache.layers, cache.layers):
                mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
                mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
            self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self.rows += k
        self._stale = True  # rebuilt by the next forward (several groups may join before it)

    def keep(self, keep: list[int]) -> None:
        """Keep these rows (ascending), drop the others, and trim the padding every remaining row shares."""
        if not keep:
            self.rows, self._cache, self._mask, self._state, self._prefixes = 0, None, None, None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._prefixes = None if self._prefixes is None else self._prefixes.select(index)
        self.rows = len(keep)
        start = int((self._mask.sum(0) > 0).to(torch.int64).argmax())  # first column some row still uses
        if start:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self._mask = self._mask[:, start:]
        self._stale = True

    def forward(self, last: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [rows, V] of each row's next token, from its last token and its position ([rows, 1] each)."""
        if self._stale:  # the prefixes do not depend on the growing mask: steps where no row changes reuse the state
            prefixes = self._prefixes
            self._state = None if prefixes is None else compose([Part(prefixes.contribution())], self.rows, self._mask)
            self._stale = False
        self._mask = torch.cat([self._mask, self._mask.new_ones(self.rows, 1)], dim=1)
        kwargs = {STATE_KWARG: self._state} if self._state is not None else {}
        kwargs[self.cache_arg] = self._cache
        out = self.model.base_model(input_ids=last, attention_mask=self._mask, position_ids=positions,
                                    use_cache=True, **kwargs)
        return out.logits[:, -1]


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
