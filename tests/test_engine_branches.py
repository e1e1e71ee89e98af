"""The branches of the engine's attention function that no model test reaches on transformers 5.25, each checked
against a reference: a float64 attention formula, the same forward with tensors laid out by hand, or the plain model
(the injector's: test_engine_branches_injector.py). With the other files of the engine coverage set in .ci/run
(test_engine*.py, test_multi.py) they cover every line and branch of src/softprompt/engine/ (.ci/run checks it)."""

import pytest
import torch
from _helpers.engine_branches import F64, _randn
from conftest import tiny
from torch import nn

import softprompt as sp
from softprompt.engine import attention
from softprompt.engine.injector import attach
from softprompt.engine.state import InjectionState, LayerInjection

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(causal: bool) -> nn.Module:
    """A stand-in for a self-attention module: what the attention function reads from one (layer index, causality)."""
    module = nn.Module()
    module.is_causal = causal
    setattr(module, attention._LAYER_ATTR, 0)
    return module


def _formula(q, k, v, pk, pv, allowed, bias=None):
    """Attention over [prefix; keys] written out in float64: softmax(q K^T / sqrt(d) + bias) V over the allowed
    columns, returned as [B, q, H, D] like transformers' SDPA function."""
    keys = torch.cat([pk.expand(q.shape[0], -1, -1, -1), k], dim=2)
    values = torch.cat([pv.expand(q.shape[0], -1, -1, -1), v], dim=2)
    scores = q @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ values).transpose(1, 2)


# ---- attention.py ------------------------------------------------------------------------------------------------
def test_causal_chunk_without_a_mask_aligns_bottom_right():
    """Pitfall P2 in the attention function itself: 3 new queries over 4 cached + 3 new keys, no mask (a model that
    skips the mask for a causal chunk). Query i sees the whole prefix and real keys 0..4+i, as the formula says."""
    q, k, v = _randn(2, 2, 3, 4, seed=0), _randn(2, 2, 7, 4, seed=1), _randn(2, 2, 7, 4, seed=2)
    pk, pv = _randn(1, 2, 3, 4, seed=3), _randn(1, 2, 3, 4, seed=4)
    state = InjectionState(layers={0: LayerInjection(pk, pv)})
    out, _ = attention.softprompt_attention(_layer(True), q, k, v, None, softprompt_state=state)
    i, j = torch.arange(3)[:, None], torch.arange(7)[None, :]
    allowed = torch.cat([torch.ones(3, 3, dtype=torch.bool), j <= i + 4], dim=-1)
    torch.testing.assert_close(out, _formula(q, k, v, pk, pv, allowed), rtol=0, atol=1e-12)


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padding-mask"])
def test_additive_position_bias_gives_prefix_columns_zero(padded):
    """A T5-style ``position_bias`` [B, H, q, kv] covers the real keys only: the prefix columns get bias 0 (and stay
    visible through a padding mask), as in the formula with [0 | bias]. (No text family that the engine accepts on
    transformers 5.25 passes a bias; T5 computes attention in its own code.)"""
    q, k, v = _randn(2, 2, 5, 4, seed=5), _randn(2, 2, 5, 4, seed=6), _randn(2, 2, 5, 4, seed=7)
    pk, pv = _randn(1, 2, 2, 4, seed=8), _randn(1, 2, 2, 4, seed=9)
    bias = _randn(2, 2, 5, 5, seed=10)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False  # row 1: its last two keys are padding
    state = InjectionState(layers={0: LayerInjection(pk, pv)})
    out, _ = attention.softprompt_attention(_layer(False), q, k, v, mask if padded else None, position_bias=bias,
                                            softprompt_state=state)
    allowed = torch.cat([torch.ones(2, 1, 5, 2, dtype=torch.bool), mask if padded else torch.ones_like(mask)], -1)
    full_bias = torch.cat([torch.zeros(2, 2, 5, 2, dtype=F64), bias], dim=-1)
    torch.testing.assert_close(out, _formula(q, k, v, pk, pv, allowed, full_bias), rtol=0, atol=1e-12)


def test_prefixes_of_b_rows_serve_a_batch_of_k_times_b_rows():
    """Beam search repeats each example k times: prefixes of b rows are repeated row by row (row r serves rows
    r*k..r*k+k-1), exactly as prefixes laid out by hand; a batch that b does not divide is refused by name."""
    base = tiny("llama").double().eval()
    attach(base)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    k, v = _randn(2, 2, 3, 8, seed=11), _randn(2, 2, 3, 8, seed=12)

    def run(rows, key, value):
        state = InjectionState(layers={i: LayerInjection(key, value) for i in range(3)})
        return base(input_ids=rows, softprompt_state=state).logits

    with torch.no_grad():
        repeated = run(ids.repeat_interleave(2, 0), k, v)
        by_hand = run(ids.repeat_interleave(2, 0), k.repeat_interleave(2, 0), v.repeat_interleave(2, 0))
        alone = run(ids, k, v)
        with pytest.raises(RuntimeError) as err:
            run(ids.repeat_interleave(2, 0)[:3], k, v)
    assert str(err.value) == "prefix batch 2 does not divide attention batch 3"
    assert torch.equal(repeated, by_hand)
    torch.testing.assert_close(repeated[::2], alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(repeated[1::2], alone, rtol=0, atol=1e-12)


def test_state_counts_attention_calls_per_layer():
    """``InjectionState.calls`` counts the attention calls of each engine layer: one per layer and forward, with or
    without prefixes in that layer."""
    base = tiny("llama").eval()
    attach(base)
    k = torch.zeros(1, 2, 2, 8)
    state = InjectionState(layers={1: LayerInjection(k, k)}, calls={})
    with torch.no_grad():
        for _ in range(2):
            base(input_ids=torch.tensor([[5, 6, 7]]), softprompt_state=state)
    assert state.calls == {0: 2, 1: 2, 2: 2}


def test_per_forward_tensors_are_built_once_and_never_kept_while_compiling(monkeypatch):
    """``_reuse`` builds a per-forward tensor once for equal sources (compared by identity) and equal plain values,
    rebuilds it when either changes, keeping one slot per kind; under torch.compile it builds every time and stores
    nothing on the state (a stored tensor would be a graph output that CUDA graphs overwrite on replay)."""
    built = []

    def make():
        built.append(torch.zeros(1))
        return built[-1]

    a, b = torch.ones(2), torch.ones(2)
    state = InjectionState()
    first = attention._reuse(state, "mask", (a, None), (3, True), make)
    assert attention._reuse(state, "mask", (a, None), (3, True), make) is first and len(built) == 1
    assert attention._reuse(state, "mask", (b, None), (3, True), make) is built[1]  # equal values, other tensor
    assert attention._reuse(state, "mask", (b, None), (4, True), make) is built[2]
    assert list(state.scratch) == ["mask"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    fresh = InjectionState()
    assert attention._reuse(fresh, "mask", (a,), (), make) is built[3]
    assert attention._reuse(fresh, "mask", (a,), (), make) is built[4]
    assert fresh.scratch == {}


def test_inference_attention_calls_on_cuda_run_without_cudnn_and_restore_the_flag(monkeypatch):
    """cuDNN's SDPA backend is off during each call of the attention function where torch could pick it and build a
    host-side plan for a new shape (2.6 ms per layer call when decoding on an H100): CUDA tensors without gradients
    (decoding, serving, evaluation). The caller's setting is back afterwards, whether it was on or off. CPU calls,
    training (shapes repeat, plans are reused) and compiling write no flag."""
    q = torch.zeros(1, 2, 3, 8)
    with torch.no_grad():
        assert not attention._cudnn_could_plan(q)  # CPU
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        assert attention._cudnn_could_plan(q)
        with torch.enable_grad():
            assert not attention._cudnn_could_plan(q)  # training
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            assert not attention._cudnn_could_plan(q)
    monkeypatch.undo()

    seen = []

    def spy(module, query, key, value, mask, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return query, None

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        attention._sdpa(_layer(True), q, q, q, None)  # CPU: untouched
        assert seen == [True]
        monkeypatch.setattr(attention, "_cudnn_could_plan", lambda query: True)
        for setting in (True, False):
            torch.backends.cuda.enable_cudnn_sdp(setting)
            attention._sdpa(_layer(True), q, q, q, None)
            assert torch.backends.cuda.cudnn_sdp_enabled() is setting
        assert seen == [True, False, False]
        # The full attention function goes through it on the prefix path.
        torch.backends.cuda.enable_cudnn_sdp(True)
        inj = LayerInjection(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
        state = InjectionState(layers={0: inj}, calls={})
        attention.softprompt_attention(_layer(True), q, q, q, None, softprompt_state=state)
        assert seen[-1] is False
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def _gqa_layer(groups: int) -> nn.Module:
    module = _layer(True)
    module.num_key_value_groups = groups
    return module


def _repeating_stock(module, query, key, value, mask, dropout=0.0, scaling=None, **kwargs):
    """What transformers up to 5.23 does for a masked call on grouped heads: every key/value head copied once per
    query head it serves, then SDPA (output [B, q, H, D])."""
    key, value = (t.repeat_interleave(module.num_key_value_groups, dim=1) for t in (key, value))
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def test_single_masked_queries_on_grouped_heads_attend_on_the_key_value_heads(monkeypatch):
    """A decoding step under a mask (padded rows) on GQA heads: each group's query heads attend as query rows of
    their own key/value head, so no key/value head is copied per query head (58 MB per layer per step at 64 rows x
    256 columns of a Qwen2.5-0.5B layer). The outputs equal the copying computation in float64 for bool, additive
    and per-head masks; several query rows, no mask, ungrouped heads and compiling keep the stock function."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        seen.append((tuple(query.shape), key.shape[1]))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", _repeating_stock)  # the copying transformers
    q, k, v = _randn(3, 6, 1, 8, seed=1), _randn(3, 2, 9, 8, seed=2), _randn(3, 2, 9, 8, seed=3)
    allowed = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    allowed[0, ..., :4] = False
    allowed[2, ..., 6:] = False
    additive = torch.zeros(3, 1, 1, 9, dtype=F64).masked_fill(~allowed, torch.finfo(F64).min)
    per_head = allowed.expand(3, 6, 1, 9).clone()
    per_head[1, 4:, :, :2] = False  # the second key/value head's query heads hide two columns of row 1
    layer = _gqa_layer(3)
    masks = (allowed, additive, per_head)
    wanted = [_repeating_stock(layer, q, k, v, mask, scaling=0.3)[0] for mask in masks]
    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        for mask, want in zip(masks, wanted):
            out, _ = attention._sdpa(layer, q, k, v, mask, scaling=0.3, dropout=0.0)
            assert out.shape == want.shape == (3, 1, 6, 8) and out.is_contiguous()
            torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
        assert seen == [((3, 2, 3, 8), 2)] * 3  # the query heads of a group as rows; two key/value heads
        seen.clear()
        q2 = _randn(3, 6, 2, 8, seed=4)
        k6, v6 = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
        stock = [(q2, k, v, allowed.expand(3, 1, 2, 9), layer),  # two query rows
                 (q, k, v, None, layer),  # no mask: SDPA's own GQA support keeps its fused kernels
                 (q, k6, v6, allowed, _gqa_layer(1))]  # ungrouped heads
        for query, key, value, mask, module in stock:
            attention._sdpa(module, query, key, value, mask)
        assert [heads for _, heads in seen] == [6, 6, 6]
        seen.clear()
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        attention._sdpa(layer, q, k, v, allowed)
        assert seen == [((3, 6, 1, 8), 6)]


def test_prepend_views_adjacent_prefix_and_keys_and_concatenates_anything_else(monkeypatch):
    """A prefix that ends where the keys begin in one buffer ([B, H, P + T, D], as the fixed decoding buffers keep
    them) is read as one view, with the values torch.cat gives; any other pair (another buffer, a gap, a different
    layout, tensors recording gradients) is concatenated; while compiling, always concatenated (fake tensors have no
    addresses)."""
    buf = _randn(2, 3, 5 + 7, 4, seed=3)
    prefix, keys = buf[:, :, :5], buf[:, :, 5:9]
    joined = attention._prepend(prefix, keys)
    assert torch.equal(joined, torch.cat([prefix, keys], dim=2))
    assert joined.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # a view of the buffer
    assert joined.data_ptr() == buf.data_ptr()
    grad = buf.clone().requires_grad_()
    pairs = [(buf[:, :, :4], keys),  # a gap of one column
             (prefix, buf.clone()[:, :, 5:9]),  # the same layout in another buffer
             (prefix.clone(), keys),  # another layout
             (grad[:, :, :5], grad[:, :, 5:9])]  # adjacent, but recording gradients
    for first, rest in pairs:
        out = attention._prepend(first, rest)
        assert torch.equal(out, torch.cat([first, rest], dim=2))
        assert out.untyped_storage().data_ptr() not in (first.untyped_storage().data_ptr(),
                                                        rest.untyped_storage().data_ptr())  # a new tensor
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled = attention._prepend(prefix, keys)
    assert torch.equal(compiled, joined) and compiled.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()


def test_key_padding_masks_of_one_query_row_grow_like_the_2d_mask():
    """A mask the caller builds as [B, 1, 1, N] (one row broadcast over the queries; bool, or additive float) grows
    by visible columns for the inserted prompt, giving the same logits as the plain 2D padding mask."""
    model = sp.wrap(tiny("bert").double(), sp.LatePromptConfig(num_virtual_tokens=3, layer=1, init_std=1.0)).eval()
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    keep = mask[:, None, None, :].bool()
    additive = torch.zeros(keep.shape, dtype=F64).masked_fill(~keep, torch.finfo(F64).min)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        for four_d in (keep, additive):
            torch.testing.assert_close(model(input_ids=ids, attention_mask=four_d).logits, want, rtol=0, atol=1e-12)
        assert (model(input_ids=ids[1:, :4]).logits - want[1:]).abs().max() < 1e-12  # padding is really hidden
