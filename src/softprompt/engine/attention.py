"""The attention function registered with transformers' AttentionInterface.

It wraps the stock SDPA function: prefixes are concatenated in front of the layer's keys/values and the call is
routed so that fused kernels stay usable:

* causal self-attention with no mask (no padding, prefill): the prefix is given P dummy query rows so that SDPA's
  top-left ``is_causal`` alignment becomes exactly "every real query sees the whole prefix and the causal past".
  No mask is materialised, so the flash / memory-efficient kernels stay on (the dummy rows are dropped).
* no mask and a single query, or bidirectional attention with no padding: plain concatenation, no mask.
* a mask is present (padding, chunked prefill): P always-visible columns are prepended to it (pitfalls P1-P3 of
  the injection spec: never hand SDPA ``mask=None`` with kv_len > q_len and ``is_causal``, as it crops the keys).

Host cost per layer call matters at small shapes (steps wait on the host): what every layer would rebuild identically
(the dummy query rows, the mask grown by the prefix columns) is built once per forward and reused (``_reuse``), and
prefixes that ``compose`` already cast and expanded pass through without an op.

A single query row under a mask on grouped key/value heads (every decoding step of a padded batch) runs on the
key/value heads themselves, without the copy per query head that transformers up to 5.23 makes (``_attend``).

Inference calls on CUDA run with cuDNN's SDPA backend switched off (``_sdpa``): cuDNN builds an execution plan on
the host for each new shape, and decoding changes the key length every step. On an H100 (torch 2.11) that plan cost
62.7 ms of a 67 ms eager decoding step of a 24-layer model (2.6 ms per layer call); with flash / memory-efficient
kernels the step took 22 ms, for about 5% more device time (``benchmarks/results/serve_generation.md``, session 9).
Training keeps torch's choice: its shapes repeat (length buckets), so cuDNN's plans are built once, and training
steps compare with PEFT's on the same kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .state import STATE_KWARG, InjectionState, LayerInjection

ATTN_NAME = "softprompt"
_LAYER_ATTR = "_softprompt_layer"  # set on each self-attention module by the injector


def _expand_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a [1 or b, ...] prefix to ``batch`` rows; b must divide batch (beam search repeats examples)."""
    b = t.shape[0]
    if b == batch:
        return t
    if b == 1:
        return t.expand(batch, *t.shape[1:])
    if batch % b:
        raise RuntimeError(f"prefix batch {b} does not divide attention batch {batch}")
    return t.repeat_interleave(batch // b, dim=0)


def gated_prefix(inj: LayerInjection, batch: int, dtype: torch.dtype, device: torch.device):
    """The prefix (key, value) of one layer as attention uses it: cast, gated and expanded to ``batch`` rows."""
    if torch.is_grad_enabled():
        return _compute_gated_prefix(inj, batch, dtype, device)
    # Without gradients (generate(), evaluation) a state's prefix is fixed: cast/gate/expand it once, not at every
    # decoding step of every layer.
    key = (batch, dtype, device, id(inj.key), id(inj.value), id(inj.gate), id(inj.key_value))  # ids are stable:
    # they are those of the tensors inj holds
    if inj.cache is None or inj.cache[0] != key:
        inj.cache = (key, _compute_gated_prefix(inj, batch, dtype, device))
    return inj.cache[1]


def _cast(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Compared here rather than left to .to(): the common case (already cast, see compose) then costs no op call.
    return t if t.dtype == dtype and t.device == device else t.to(device=device, dtype=dtype)


def _compute_gated_prefix(inj: LayerInjection, batch: int, dtype: torch.dtype, device: torch.device):
    if inj.gate is None:
        pk, pv = _cast(inj.key, dtype, device), _cast(inj.value, dtype, device)
        return _expand_batch(pk, batch), _expand_batch(pv, batch)
    g = _cast(inj.gate, dtype, device)
    # Straight to [B, H|1, P, 1] in one reshape (a view of a contiguous gate): one op and one backward node per
    # layer call, where a reshape and an unsqueeze cost two of each.
    g = g.reshape(g.shape[0], -1 if g.dim() > 2 else 1, g.shape[-1], 1)
    if inj.key.shape[0] not in (1, g.shape[0]):
        # Beam search (generate with num_beams or num_return_sequences): the prefixes have the prompt's rows, the
        # gate, computed from the hidden states, the repeated rows. Bring both to the attention batch first.
        pk, pv = _expand_batch(_cast(inj.key, dtype, device), batch), _expand_batch(_cast(inj.value, dtype, device),
                                                                                   batch)
        g = _expand_batch(g, batch)
        return (pk if inj.gate_values_only else pk * g), pv * g
    if inj.key_value is not None and not inj.gate_values_only:
        # Key and value gated in one multiply of their joint [2, B, H, P, D] view (compose's): the same products,
        # element by element, as two multiplies; the backward makes one product and one reduction for the gate
        # instead of two of each and their sum (that reduction runs over key and value at once, so the gate's
        # gradient may differ from the two-multiply form's in float rounding).
        pk, pv = (_cast(inj.key_value, dtype, device) * g).unbind(0)
    else:
        pk, pv = _cast(inj.key, dtype, device), _cast(inj.value, dtype, device) * g
        if not inj.gate_values_only:
            pk = pk * g
    return _expand_batch(pk, batch), _expand_batch(pv, batch)


def _prepend(prefix: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``cat([prefix, t], dim=2)``, as a view without a copy when ``prefix`` ends where ``t`` begins in one buffer.

    The fixed decoding buffers (``multi.static_batch``) keep each row's prefix right before its cache, so a decoding
    step reads both without copying every row's whole cache in every layer. Not while compiling (fake tensors have no
    addresses; checked first, so that no stride is compared and guarded), and not for tensors that record gradients
    (a view reaching outside ``t`` would not route the prefix's gradient). The checks are cheap, and the stride check
    fails for almost any other pair (a prefix and a cache of different lengths have different strides).
    """
    if (not torch.compiler.is_compiling() and prefix.stride() == t.stride() and prefix.shape[:2] == t.shape[:2]
            and prefix.shape[3] == t.shape[3] and not (prefix.requires_grad or t.requires_grad)
            and prefix.dtype == t.dtype
            and prefix.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            and prefix.storage_offset() + prefix.shape[2] * prefix.stride(2) == t.storage_offset()):
        shape = (*t.shape[:2], prefix.shape[2] + t.shape[2], t.shape[3])
        return t.as_strided(shape, t.stride(), prefix.storage_offset())
    return torch.cat([prefix, t], dim=2)


def _reuse(state: InjectionState, kind: str, sources: tuple, rest: tuple, make: Callable[[], torch.Tensor]
           ) -> torch.Tensor:
    """``make()``, built once per forward and shared by every layer that asks with the same ``sources`` (tensors or
    None, compared by identity) and ``rest`` (plain values). One slot per ``kind``: a different source replaces it,
    so a state that lives on (generate()'s decoding steps) holds one copy, not one per step.

    A compiled forward builds it in place: the graph is traced once (and inductor shares equal subexpressions), while a
    tensor stored on the state would become an extra graph output that CUDA graphs overwrite on their next replay."""
    if torch.compiler.is_compiling():
        return make()
    slot = state.scratch.get(kind)
    if slot is None or slot[1] != rest or any(a is not b for a, b in zip(slot[0], sources)):
        slot = state.scratch[kind] = (sources, rest, make())
    return slot[2]


def _grow_mask_for_insertion(mask: torch.Tensor | None, t: int, at: int) -> torch.Tensor | None:
    """Mask built for N tokens -> N + t: inserted columns are visible to all, inserted rows copy row ``at``."""
    if mask is None:
        return None
    visible = True if mask.dtype == torch.bool else 0.0
    cols = mask.new_full((*mask.shape[:-1], t), visible)
    mask = torch.cat([mask[..., :at], cols, mask[..., at:]], dim=-1)
    if mask.shape[-2] > 1:
        rows = mask[..., at : at + 1, :].expand(*mask.shape[:-2], t, mask.shape[-1])
        mask = torch.cat([mask[..., :at, :], rows, mask[..., at:, :]], dim=-2)
    return mask


def _prepend_visible_columns(mask: torch.Tensor, p: int) -> torch.Tensor:
    visible = True if mask.dtype == torch.bool else 0.0
    cols = mask.new_full((*mask.shape[:-1], p), visible)
    return torch.cat([cols, mask], dim=-1)


def _prefix_mask(mask: torch.Tensor | None, prefix_mask: torch.Tensor | None, p: int, batch: int, q_len: int,
                 real_kv: int, causal: bool, device: torch.device) -> torch.Tensor:
    """The mask of the P + real_kv key columns. Without a mask from the model (rows that hide some prefix columns;
    causal chunked prefill, where q_len != real kv), the base pattern is built first: bottom-right causal (P2) or
    all visible."""
    if mask is None:
        qi = torch.arange(q_len, device=device)[:, None]
        kj = torch.arange(real_kv, device=device)[None, :]
        mask = (kj <= qi + (real_kv - q_len)) if causal else (kj >= 0)
        mask = mask.expand(q_len, real_kv)[None, None]
    return _prepend_prefix_columns(mask, prefix_mask, p, batch)


def _prepend_prefix_columns(mask: torch.Tensor, prefix_mask: torch.Tensor | None, p: int, batch: int) -> torch.Tensor:
    """Prepend the P prefix columns to a materialised mask: all visible, or per row as ``prefix_mask`` says."""
    if prefix_mask is None:
        return _prepend_visible_columns(mask, p)
    visible = _expand_batch(prefix_mask.to(device=mask.device, dtype=torch.bool), batch)[:, None, None, :]
    if mask.dtype == torch.bool:
        cols = visible
    else:
        cols = torch.zeros(visible.shape, dtype=mask.dtype, device=mask.device)
        cols = cols.masked_fill(~visible, torch.finfo(mask.dtype).min)
    mask = _expand_batch(mask, batch)
    cols = cols.expand(batch, mask.shape[1], mask.shape[2], p)
    return torch.cat([cols, mask], dim=-1)


def softprompt_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
):
    """AttentionInterface function: stock SDPA plus the prefixes/insertions of the current ``InjectionState``."""
    state: InjectionState | None = kwargs.pop(STATE_KWARG, None)
    index = getattr(module, _LAYER_ATTR, None)
    if state is None or index is None:
        return _sdpa(module, query, key, value, attention_mask, **kwargs)
    if state.calls is not None:
        state.calls[index] = state.calls.get(index, 0) + 1
    if state.capture is not None:
        state.capture[index] = (key, value)
    inj = state.layers.get(index)
    if inj is None:
        return _sdpa(module, query, key, value, attention_mask, **kwargs)
    if inj.inserted:
        t, at, mask = inj.inserted, inj.insert_at, attention_mask
        attention_mask = _reuse(state, "grown", (mask,), (t, at), lambda: _grow_mask_for_insertion(mask, t, at))
    p = inj.prefix_length
    if p == 0:
        return _sdpa(module, query, key, value, attention_mask, **kwargs)

    batch, _, q_len, _ = query.shape
    pk, pv = gated_prefix(inj, batch, key.dtype, key.device)
    key, value = _prepend(pk, key), _prepend(pv, value)
    if kwargs.get("position_bias") is not None:  # T5-style additive bias: prefix columns get 0
        pb = kwargs["position_bias"]
        kwargs["position_bias"] = torch.cat([pb.new_zeros((*pb.shape[:-1], p)), pb], dim=-1)
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", False) if causal is None else causal
    real_kv = key.shape[2] - p
    hidden = inj.prefix_mask  # rows hiding prefix columns need a materialised mask (the fused paths cannot do it)
    if attention_mask is None and hidden is None:
        if causal and q_len > 1 and q_len == real_kv:
            # Fused path: dummy query rows for the prefix turn top-left causal alignment into the wanted pattern.
            shape = (batch, query.shape[1], p, query.shape[3])
            dummy = _reuse(state, "dummy", (), (shape, query.dtype, query.device), lambda: query.new_zeros(shape))
            out, weights = _sdpa(
                module, torch.cat([dummy, query], dim=2), key, value, None, is_causal=True, **kwargs
            )
            return out[:, p:], weights
        if q_len == 1 or not causal:
            return _sdpa(module, query, key, value, None, is_causal=False, **kwargs)
    mask, device = attention_mask, query.device
    mask = _reuse(state, "mask", (mask, hidden), (p, batch, q_len, real_kv, causal, device),
                  lambda: _prefix_mask(mask, hidden, p, batch, q_len, real_kv, causal, device))
    return _sdpa(module, query, key, value, mask, is_causal=False, **kwargs)


def _cudnn_could_plan(query: torch.Tensor) -> bool:
    """Whether torch might pick cuDNN's SDPA for this call and build it a plan: a CUDA tensor, no gradient recorded
    (training keeps torch's choice, see the module docstring), and not compiling (a flag write there would break the
    graph, which fixes its kernels once anyway)."""
    return query.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          mask: torch.Tensor | None, **kwargs):
    """The stock SDPA function (single masked queries on grouped heads: ``_attend``), with cuDNN's backend off for
    the call where it could build a plan (why: module docstring). Two flag writes cost well under a microsecond; CPU
    calls make none."""
    if not _cudnn_could_plan(query):
        return _attend(module, query, key, value, mask, **kwargs)
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return _attend(module, query, key, value, mask, **kwargs)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def _attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: torch.Tensor | None, **kwargs):
    """Stock SDPA, except for one query row under a mask with grouped key/value heads (GQA: decoding steps of
    padded batches, the serving engine's every step).

    For such a call transformers up to 5.23 copies every key/value head once per query head it serves (``repeat_kv``)
    before SDPA, since SDPA's own GQA support falls back to the math kernel under a mask: at 64 rows x 256 columns
    of a Qwen2.5-0.5B layer (14 query heads, 2 key/value heads) that writes and reads 58 MB per layer per step.
    Instead, the query heads of one group become the query rows of their key/value head ([B, H, 1, D] -> [B, H_kv,
    G, D], a view): the same dot products, no copy. transformers 5.24+ does the same (``pack_gqa``); this gives every
    supported version that path. Not while compiling (transformers skips it there too, so compiled graphs keep their
    shapes), and not with T5-style position biases (no GQA model has them)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or query.shape[2] != 1 or mask is None or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions") or torch.compiler.is_compiling()):
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    b, heads, _, d = query.shape
    if mask.shape[1] != 1:  # per-head masks follow their heads: [B, H, 1, K] -> [B, H_kv, G, K]
        mask = mask.reshape(mask.shape[0], heads // groups, groups, mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, heads // groups, groups, d), key, value, attn_mask=mask,
        dropout_p=kwargs.get("dropout", 0.0), scale=kwargs.get("scaling"))
    # [B, H_kv, G, Dv] -> [B, 1, H, Dv]: the layout the stock function returns (contiguous: the moved axis has size 1)
    return out.reshape(out.shape[0], heads, 1, out.shape[-1]).transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the attention function and its mask builder (idempotent).

    The mask function must be registered too: without it transformers hands the function ``attention_mask=None``
    and causality is lost silently.
    """
    AttentionInterface.register(ATTN_NAME, softprompt_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
