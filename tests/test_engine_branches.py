"""The branches of the engine's attention function and injector that no model test reaches on transformers 5.25,
each checked against a reference: a float64 attention formula, the same forward with tensors laid out by hand, the
plain model, or the exact one-line error a user gets. With test_engine.py, test_engine_paths.py, test_multi.py and
test_engine_compose.py they cover every line and branch of src/softprompt/engine/ (.ci/run checks it)."""

import pytest
import torch
from conftest import tiny
from torch import nn

import softprompt as sp
from softprompt.engine import attention
from softprompt.engine.injector import _block_of, attach
from softprompt.engine.state import InjectionState, Insertion, LayerInjection

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


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


# ---- injector.py -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,expected", [
    ("llama", dict(model_type="llama", num_heads=4, num_kv_heads=2, head_dim=8, is_causal=True, max_positions=128,
                   has_rotary=True)),
    ("qwen3", dict(model_type="qwen3", num_heads=4, num_kv_heads=2, head_dim=16, is_causal=True, max_positions=128,
                   has_rotary=True)),
    ("gpt2", dict(model_type="gpt2", num_heads=4, num_kv_heads=4, head_dim=8, is_causal=True, max_positions=128,
                  has_rotary=False)),
    ("bert", dict(model_type="bert", num_heads=4, num_kv_heads=4, head_dim=8, is_causal=False, max_positions=512,
                  has_rotary=False)),
])
def test_probe_reports_the_model_shapes(kind, expected):
    """The probe forward measures each family's shapes from the keys it produces (Qwen3's head_dim 16 is not
    hidden/heads = 8), and ``ModelInfo.to_dict`` gives them as a plain dict."""
    info = attach(tiny(kind)).info
    assert info.to_dict() == dict(expected, num_layers=3, hidden_size=32)


def test_block_of_finds_the_module_list_element_or_names_the_module():
    """The transformer block of an attention module is the element of the innermost ``nn.ModuleList`` above it; a
    module outside any list is refused with its name."""
    llama = tiny("llama").model
    assert _block_of(llama, "layers.2.self_attn") == ("layers.2", llama.layers[2])
    bert = tiny("bert").bert
    assert _block_of(bert, "encoder.layer.1.attention.self") == ("encoder.layer.1", bert.encoder.layer[1])
    flat = nn.Module()
    flat.attn = nn.Linear(2, 2)
    with pytest.raises(sp.UnsupportedModelError) as err:
        _block_of(flat, "attn")
    assert str(err.value) == "could not find the transformer block that holds attn"


def test_a_module_without_the_attention_interface_is_refused_in_one_line():
    with pytest.raises(sp.UnsupportedModelError) as err:
        attach(nn.Linear(4, 4))
    assert str(err.value) == ("Linear cannot use a custom attention function: 'Linear' object has no attribute "
                              "'set_attn_implementation'")


def test_shared_layers_are_refused_and_the_model_still_computes_the_same():
    """ALBERT runs one attention module for all its layers: the probe sees 1 module for 2 layers, and the engine
    refuses it with the counts (prefixes per layer would be impossible). The refused model gives the same output."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4)
    model = tf.AlbertModel(cfg).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    with pytest.raises(sp.UnsupportedModelError) as err:
        attach(model)
    assert str(err.value) == (
        "AlbertModel (model_type='albert'): 1 of 2 attention layers called transformers' AttentionInterface during "
        "the probe. This family bypasses the interface (e.g. DeBERTa, Falcon, Bloom) and cannot take prefixes; use a "
        "supported family (BERT, RoBERTa, XLM-R, ModernBERT, GPT-2, Llama, Qwen2/3, Mistral).")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, before, rtol=0, atol=1e-6)


def test_hidden_states_given_by_keyword_get_the_insertion():
    """A block called with ``hidden_states=`` as a keyword (as some models call their layers) gets the insertion
    as one called positionally does: the last block equals the plain block on the grown sequence, inserted rows
    removed from its output."""
    base = tiny("bert").double().eval()
    block = attach(base).blocks[2]
    h, s = _randn(2, 5, 32, seed=13), _randn(1, 2, 32, seed=14)

    def state():
        return InjectionState(insertion=Insertion(2, s, at=1))

    with torch.no_grad():
        by_keyword = block(hidden_states=h, softprompt_state=state())
        positional = block(h, softprompt_state=state())
        plain = block(torch.cat([h[:, :1], s.expand(2, -1, -1), h[:, 1:]], dim=1))
    want = torch.cat([plain[:, :1], plain[:, 3:]], dim=1)
    torch.testing.assert_close(by_keyword, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(positional, want, rtol=0, atol=1e-12)


def test_tuple_and_model_outputs_of_the_last_block_lose_the_inserted_rows():
    """Layers of transformers 5.17 return tuples (5.25: tensors): the inserted rows are cut from the hidden states
    (the first element) and the other elements pass through untouched; likewise for a ModelOutput's first field."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    inj = attach(tiny("bert").eval())
    h = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    state = InjectionState(insertion=Insertion(1, torch.zeros(1, 2, 3), at=1))
    want = torch.cat([h[:, :1], h[:, 3:]], dim=1)
    extra = object()
    out = inj._after_last_layer(state, (h, extra))
    assert isinstance(out, tuple) and len(out) == 2 and torch.equal(out[0], want) and out[1] is extra
    cache = torch.ones(1)
    modeled = inj._after_last_layer(state, BaseModelOutputWithPast(last_hidden_state=h, past_key_values=cache))
    assert torch.equal(modeled.last_hidden_state, want) and torch.equal(modeled[0], want)
    assert modeled.past_key_values is cache


def test_detach_unwraps_every_block_and_gives_back_a_forward_set_before():
    """After ``detach`` a forward ignores the state's layer hook and insertion (the logits are the plain model's),
    and a block whose ``forward`` was already replaced before attaching (as accelerate's device hooks do) gets that
    same forward back; while attached, such a block still runs the layer hook."""
    base = tiny("bert").double().eval()
    block = base.bert.encoder.layer[0]
    replaced = block.forward  # a bound method stored on the instance, like accelerate's wrapper
    block.forward = replaced
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    inj = attach(base)
    seen = []

    vectors = _randn(1, 2, 32, seed=15)

    def state():
        return InjectionState(layer_hook=lambda i, h, s: seen.append(i), insertion=Insertion(1, vectors))

    with torch.no_grad():
        inserted = base(input_ids=ids, softprompt_state=state()).logits
        assert seen == [0, 1, 2] and (inserted - plain).abs().max() > 1e-6
        inj.detach()
        seen.clear()
        after = base(input_ids=ids, softprompt_state=state()).logits
    assert seen == [] and torch.equal(after, plain)
    assert block.forward is replaced and "forward" not in base.bert.encoder.layer[1].__dict__


def _modernbert():
    import transformers as tf

    cfg = tf.ModernBertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                              num_hidden_layers=3, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                              sep_token_id=2, num_labels=2)
    torch.manual_seed(0)
    return tf.ModernBertForSequenceClassification(cfg).eval()


def test_rotary_encoder_layer_without_cos_sin_keyword_is_refused_in_one_line():
    """Inserting into a rotary encoder needs each later layer's (cos, sin) as ``position_embeddings=``: a layer
    called without them cannot take the inserted rows, and the error names the class and the alternatives."""
    model = _modernbert()
    blocks = attach(model).blocks
    state = InjectionState(insertion=Insertion(1, torch.zeros(1, 2, 32)))
    with pytest.raises(sp.UnsupportedModelError) as err, torch.no_grad():
        blocks[2](torch.zeros(1, 4, 32), softprompt_state=state)
    assert str(err.value) == (
        "inserting prompt tokens into the rotary encoder ModernBertForSequenceClassification needs its layers to "
        "receive `position_embeddings=(cos, sin)` as a keyword argument; use prefix or prompt tuning on it, or a "
        "BERT/RoBERTa encoder")
