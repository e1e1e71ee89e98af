"""Fixed-shape decoding buffers, so that a decoding step can be captured as a CUDA graph and replayed.

An eager decoding step of a small model is host-bound: the GPU waits while Python and the launch queue issue a few
thousand kernels (about 100 ms per step for a 0.5B model on an H200, ``benchmarks/results/serve_generation.md``). A
replayed CUDA graph issues them in one call, but every tensor it touches must keep its shape and address from step
to step. So here, unlike :class:`~softprompt.multi.decode_batch.DynamicBatch`:

* all layers' keys and values live in one buffer [2L, R, H, P + T, D] (R = ``max_rows``, P prefix columns, T =
  ``capacity`` cache columns). The cache holds real tokens only: columns P.. are what the model's cache returns.
  Rows are left-padded so that every row writes its next token at one shared column ``col`` (a device scalar the
  graph reads), and attention reads all T columns under a [R, T] mask;
* each row's prefix sits in the P columns right before its cache, so attention reads [prefix; cache] as one view of
  the buffer instead of concatenating them in every layer of every step (a copy of every row's whole cache: the
  engine's ``_prepend`` sees that they are adjacent); per-layer visibility is [R, L, P] (all layers, so that the
  state's shape does not depend on which adapters are in the batch);
* a step runs the rows in the smallest bucket (1, 2, 4, ... ``max_rows``) that holds them; rows past the live ones
  compute finite garbage that nobody reads.

Rows join by copying their prefill cache into free rows, leave by moving the remaining rows to the front, and when
``col`` reaches T the columns that no live row uses are cut from the front (a copy inside the same buffers, so the
graphs stay valid). Without CUDA (or with ``cuda_graphs=False``) the same buffers run eagerly, reading only the
columns written so far: that is how the CPU tests check the layout against each adapter's own ``generate()``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..engine.compose import Contribution, Part, compose
from ..engine.state import STATE_KWARG, InjectionState
from ..errors import ConfigError, SequenceTooLongError
from ..memory import free_bytes
from .batch_prefixes import BatchPrefixes


class _BufferCache:
    """The two methods a transformers decoder calls on its cache: ``update`` writes the step's key/value at the
    shared column and returns the layer's buffers as attention reads them; ``get_seq_length`` is only asked for when
    position ids are missing (never: the batch passes them)."""

    def __init__(self, batch: StaticBatch, rows: int, columns: int):
        self.batch, self.rows, self.columns = batch, rows, columns

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        b, t = self.rows, self.columns
        keys, values = self.batch._keys[layer_idx][:b], self.batch._values[layer_idx][:b]
        keys.index_copy_(2, self.batch._col, key_states)
        values.index_copy_(2, self.batch._col, value_states)
        return keys[:, :, :t], values[:, :, :t]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.batch.col


class StaticBatch:
    """Decoding rows in preallocated buffers (see the module doc); ``cuda_graphs`` replays one graph per bucket."""

    def __init__(self, model, cache_arg: str, max_rows: int, capacity: int, cuda_graphs: bool):
        self.model = model
        self.cache_arg = cache_arg
        self.max_rows, self.capacity = max_rows, capacity
        self.graphs = cuda_graphs and model.device.type == "cuda"
        self.rows = 0
        self.col = 0  # the column the next decoding step writes (every live row's last token is at col - 1)
        self._kv: torch.Tensor | None = None  # [2L, R, H, P + T, D]: layer i's keys at 2i, values at 2i + 1
        self._keys: list[torch.Tensor] = []  # views of the cache columns of _kv, per layer
        self._values: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None  # [R, T] bool: the row's own columns
        self._visible: torch.Tensor | None = None  # [R, L, P] bool
        # True while every row sees the same prefix columns in every layer (adapters with a prefix in all layers,
        # bare rows): the state then hands every layer one visibility tensor, so attention builds its mask once per
        # step instead of once per layer. Cleared for good by the first row whose layers differ.
        self._same_in_every_layer = True
        self._ids: torch.Tensor | None = None  # [R, 1] each row's last token, [R, 1] its position, [1] the column
        self._positions: torch.Tensor | None = None
        self._col: torch.Tensor | None = None  # ``col`` on the device: the graphs read it, so it cannot be a number
        self._states: dict[int, InjectionState | None] = {}
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    # ---- buffers -----------------------------------------------------------------------------------------------
    def _allocate(self, cache: DynamicCache) -> None:
        k0 = cache.layers[0].keys
        r, t, device = self.max_rows, self.capacity, k0.device
        if any(layer.keys.shape[1::2] != k0.shape[1::2] for layer in cache.layers):
            raise ConfigError("fixed decoding buffers need the same key/value heads and head size in every layer; "
                              "this model's layers differ: use decoding='dynamic'")
        self._kv = k0.new_zeros(2 * len(cache.layers), r, k0.shape[1], t, k0.shape[3])
        self._cache_views()
        self._mask = torch.zeros(r, t, dtype=torch.bool, device=device)
        self._ids = torch.zeros(r, 1, dtype=torch.long, device=device)
        self._positions = torch.zeros(r, 1, dtype=torch.long, device=device)
        self._col = torch.zeros(1, dtype=torch.long, device=device)
        self._visible = torch.zeros(r, len(cache.layers), 0, dtype=torch.bool, device=device)

    @property
    def _width(self) -> int:
        """P, the prefix columns in front of every row's cache."""
        return self._kv.shape[3] - self.capacity

    def _cache_views(self) -> None:
        p = self._width
        self._keys = [self._kv[i, :, :, p:] for i in range(0, len(self._kv), 2)]
        self._values = [self._kv[i, :, :, p:] for i in range(1, len(self._kv), 2)]

    def _widen_prefixes(self, width: int) -> None:
        """Room for prefixes of ``width`` columns: a new buffer (the rows' prefixes and caches copied; for a moment
        both buffers are held), new states and graphs. Happens once per wider adapter than any before."""
        old, seen, p = self._kv, self._visible, self._width
        self._kv = old.new_zeros(*old.shape[:3], width + self.capacity, old.shape[4])
        self._kv[..., :p, :] = old[..., :p, :]
        self._kv[..., width:, :] = old[..., p:, :]
        self._cache_views()
        self._visible = seen.new_zeros(*seen.shape[:2], width)
        self._visible[..., : seen.shape[2]] = seen
        self._states.clear()
        self._captured.clear()

    # ---- rows join and leave -----------------------------------------------------------------------------------
    def join(self, cache: DynamicCache, mask: torch.Tensor, block: BatchPrefixes | None) -> None:
        """Copy prefilled rows (their cache, [k, S] mask and prefixes) into the free rows, right-aligned at ``col``."""
        if self._mask is None:
            self._allocate(cache)
        k, width = mask.shape
        n = self.rows
        if self.col >= self.capacity:
            self._cut_unused_columns()
        if self.col < width:  # the new rows are longer than the batch so far: move the live rows right
            self._move_columns(0, self.col, width - self.col)
        start, end = self.col - width, self.col
        for mine, theirs in zip(self._keys + self._values, [layer.keys for layer in cache.layers] +
                                [layer.values for layer in cache.layers]):
            mine[n : n + k, :, start:end] = theirs
        self._mask[n : n + k] = False
        self._mask[n : n + k, start:end] = mask.bool()
        self._visible[n : n + k] = False
        if block is not None:
            if block.width > self._width:
                self._widen_prefixes(block.width)
            every_layer = block.layers == tuple(range(self._visible.shape[1]))
            # All layers: a slice. A list index would be copied to the device first (a blocking copy).
            where = slice(None) if every_layer else [2 * i + kv for i in block.layers for kv in (0, 1)]
            self._kv[where, n : n + k, :, : block.width] = block.table.transpose(0, 1)
            if every_layer and len({id(seen) for seen in block.masks}) == 1:  # one write for all layers
                seen = block.masks[0]
                self._visible[n : n + k, :, : block.width] = True if seen is None else seen[:, None]
            else:
                if self._same_in_every_layer:  # the states' shared visibility no longer holds
                    self._same_in_every_layer = False
                    self._states.clear()
                    self._captured.clear()
                for i, seen in zip(block.layers, block.masks):
                    self._visible[n : n + k, i, : block.width] = True if seen is None else seen
        self.rows += k

    def keep(self, keep: list[int]) -> None:
        """Keep these rows (ascending), moved to the front of the buffers."""
        self.rows = len(keep)
        if not keep:
            self.col = 0
            return
        first = next((i for i, row in enumerate(keep) if row != i), None)  # rows before it stay where they are
        if first is None:
            return
        # A non-blocking copy: a blocking one would wait for all the work queued on the device.
        index = torch.tensor(keep[first:]).to(self._mask.device, non_blocking=True)
        m = len(keep)
        # Layer by layer (each with its prefix columns): one copy of all layers at once would hold a second buffer
        # of the whole cache for a moment, memory the size check at startup does not count.
        for buf in (*self._kv, self._mask, self._visible):
            buf[first:m] = buf[index]

    def _move_columns(self, start: int, end: int, by: int) -> None:
        """Move the live rows' columns [start, end) by ``by`` (negative: left); the vacated columns are hidden."""
        if end + by > self.capacity:
            raise SequenceTooLongError(
                f"the decoding batch needs {end + by} columns but its static capacity is {self.capacity}; create the "
                f"GenerationEngine with a larger max_context")
        n = self.rows
        for buf in (*self._keys, *self._values):
            buf[:n, :, start + by : end + by] = buf[:n, :, start:end].clone()
        self._mask[:n, start + by : end + by] = self._mask[:n, start:end].clone()
        if by > 0:
            self._mask[:n, start : start + by] = False
        else:
            self._mask[:n, end + by : end] = False
        self.col += by

    def _cut_unused_columns(self) -> None:
        first = int(self._mask[: self.rows, : self.col].any(0).to(torch.int64).argmax())  # first column in use
        if first == 0:
            raise SequenceTooLongError(
                f"a row of the decoding batch would pass its static capacity of {self.capacity} columns; create the "
                "GenerationEngine with a larger max_context")
        self._move_columns(first, self.col, -first)

    # ---- one decoding step -------------------------------------------------------------------------------------
    def forward(self, last: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [rows, V] of each row's next token, from its last token and its position ([rows, 1] each)."""
        n = self.rows
        if self.col >= self.capacity:
            self._cut_unused_columns()
        self._ids[:n] = last
        self._positions[:n] = positions
        bucket = self._bucket(n) if self.graphs else n
        # Rows past the live ones see their own current column, so that no attention row is fully masked: a NaN
        # written into a buffer would reach live rows later through masked columns (0 weight x NaN = NaN).
        self._mask[: self.max_rows if self.graphs else bucket, self.col] = True
        self._col.fill_(self.col)
        if self.graphs:
            # The model's device, not the calling thread's current one: a server steps the engine in a worker thread,
            # whose current device is cuda:0 whatever the model's, and side streams and captures follow it.
            with torch.cuda.device(self.model.device):
                if not self._captured:  # every bucket at once, so that no later step of a running server stalls
                    for b in sorted({self._bucket(k) for k in range(1, self.max_rows + 1)}):
                        self._capture(b)
                graph, logits = self._captured[bucket]
                graph.replay()
        else:
            logits = self._run(bucket, self.col + 1)
        self.col += 1
        return logits[:n]

    def _bucket(self, n: int) -> int:
        b = 1
        while b < n:
            b *= 2
        return min(b, self.max_rows)

    def _state(self, b: int) -> InjectionState | None:
        """The prefixes of the first ``b`` rows, as views of the buffers (one state per bucket, reused)."""
        if b not in self._states:
            kv, seen, p = self._kv, self._visible, self._width
            shared = seen[:b, 0] if self._same_in_every_layer else None
            layers = range(seen.shape[1])
            rows = Contribution(prefixes={i: (kv[2 * i, :b, :, :p], kv[2 * i + 1, :b, :, :p]) for i in layers},
                                prefix_mask={i: seen[:b, i] if shared is None else shared for i in layers})
            self._states[b] = None if p == 0 else compose([Part(rows)], b)
        return self._states[b]

    def _run(self, b: int, columns: int) -> torch.Tensor:
        kwargs = {self.cache_arg: _BufferCache(self, b, columns)}
        state = self._state(b)
        if state is not None:
            kwargs[STATE_KWARG] = state
        out = self.model.base_model(input_ids=self._ids[:b], attention_mask=self._mask[:b, None, None, :columns],
                                    position_ids=self._positions[:b], use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1]

    def _capture(self, b: int) -> None:
        """Capture bucket ``b``'s step after one warm-up run on a side stream. Both compute this step's values for
        the live rows (the later replay writes the same keys and values again) and finite garbage for the others."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run(b, self.capacity)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._run(b, self.capacity)
        self._pool = graph.pool()
        self._captured[b] = (graph, logits)


def buffer_bytes(model, rows: int, columns: int, prefix_columns: int = 0) -> int:
    """Bytes of fixed decoding buffers: keys and values of every layer, ``rows`` x (``columns`` + prefix columns)."""
    info = model.info
    itemsize = next(model.base_model.parameters()).element_size()
    return 2 * info.num_layers * rows * info.num_kv_heads * (columns + prefix_columns) * info.head_dim * itemsize


def check_buffer_size(model, rows: int, columns: int, prefix_columns: int = 0) -> None:
    """Fixed decoding buffers (keys and values of every layer, ``rows`` x (``columns`` + the loaded adapters' widest
    prefix)) must fit the memory that is free now: checked before anything is allocated, with the numbers and the
    fix in the message. (An adapter with a wider prefix, added later, widens the buffers when its first row joins.)"""
    if columns < 1:
        raise ConfigError(f"max_context must be at least 1, got {columns}")
    need = buffer_bytes(model, rows, columns, prefix_columns)
    free = free_bytes(model.device)
    if free is not None and need > free:
        prefix = f" (+ {prefix_columns} prefix columns)" if prefix_columns else ""
        raise ConfigError(f"fixed decoding buffers of {rows} rows x {columns} columns{prefix} need "
                          f"{need / 2**30:.1f} GiB, "
                          f"more than the {free / 2**30:.1f} GiB free on {model.device}; lower max_context (or the "
                          "rows decoded together)")


def choose_decoding(model, rows: int, columns: int, prefix_columns: int = 0) -> tuple[str, str]:
    """What ``decoding="auto"`` means for ``model``, and why (servers print it at startup): CUDA graphs on a GPU,
    where a small model's eager steps wait on the host (mixed-adapter goodput 48 req/s with graphs on an H100, 8 req/s
    eagerly on an H200: ``benchmarks/results/serve_generation.md``), unless the model's layers differ in shape (fixed
    buffers need one) or the buffers would take more than half the free memory (the rest is for prefill
    activations); otherwise the growing cache."""
    if model.device.type != "cuda":
        return "dynamic", f"a growing KV cache (auto: the model is on {model.device.type}; CUDA graphs need a GPU)"
    text = model.base_model.config
    text = text.get_text_config() if hasattr(text, "get_text_config") else text
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    heads = getattr(text, "num_key_value_heads", None)  # a list where layers differ (e.g. OpenELM)
    if kinds != {"full_attention"} or (heads is not None and not isinstance(heads, int)):
        return "dynamic", (f"a growing KV cache (auto: layers of different shapes or attention types, "
                           f"{sorted(map(str, kinds))}; fixed buffers need one)")
    need, free = buffer_bytes(model, rows, columns, prefix_columns), free_bytes(model.device)
    size = f"{rows} rows x {columns} columns, {need / 2**30:.2f} GiB"
    if free is not None and need > free / 2:
        return "dynamic", (f"a growing KV cache (auto: fixed buffers of {size} would take more than half the "
                           f"{free / 2**30:.1f} GiB free; lower max_context or the rows to get CUDA graphs)")
    return "cuda_graphs", f"CUDA graphs over fixed buffers of {size} (auto)"
