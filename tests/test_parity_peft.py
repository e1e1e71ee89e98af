"""Prefix tuning through our engine equals PEFT's cache-based prefix tuning (same prefix values)."""

import copy

import pytest
import torch
from conftest import tiny
from peft import PrefixTuningConfig, get_peft_model

import softprompt as sp
from softprompt.engine.injector import attach
from softprompt.engine.state import InjectionState, LayerInjection


def peft_and_tables(base, p):
    pm = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p))
    torch.nn.init.normal_(pm.prompt_encoder["default"].embedding.weight)
    pm.eval()
    cfg = base.config
    layers = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dim = cfg.hidden_size // cfg.num_attention_heads
    # PEFT's layout: [P, 2L, H_kv, D] -> (key, value) of layer i at 2i, 2i+1.
    w = pm.prompt_encoder["default"].embedding.weight.detach().view(p, 2 * layers, heads, dim).permute(1, 2, 0, 3)
    return pm, w


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("padded", [True, False])
def test_prefix_logits_equal_peft(kind, padded, batch):
    ids, mask = batch
    if not padded:
        mask = torch.ones_like(ids)
    base = tiny(kind).eval()
    p = 5
    pm, w = peft_and_tables(base, p)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits
    # Through the public API: a prefix adapter whose tables hold PEFT's values.
    model = sp.wrap(copy.deepcopy(base), sp.PrefixConfig(num_virtual_tokens=p, init="random")).eval()
    with torch.no_grad():
        for i, table in model.method.tables.items():
            table.copy_(torch.stack([w[2 * int(i)], w[2 * int(i) + 1]]))
    # PEFT shifts real positions by P (pitfall P8); give the same positions for parity.
    pos = torch.arange(p, p + ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (out - ref)[real].abs().max().item() <= 1e-5


def test_engine_state_directly_equals_peft_bitwise(batch):
    """With a mask present the engine calls the very same SDPA kernel on the same tensors: max diff 0.0."""
    ids, mask = batch
    base = tiny("llama").eval()
    pm, w = peft_and_tables(base, 4)
    ours = copy.deepcopy(base)
    attach(ours)
    state = InjectionState(attention_mask=mask)
    for i in range(base.config.num_hidden_layers):
        state.layers[i] = LayerInjection(key=w[2 * i][None], value=w[2 * i + 1][None])
    pos = torch.arange(4, 4 + ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids, attention_mask=mask, position_ids=pos, softprompt_state=state).logits
    assert (out - ref)[mask.bool()].abs().max().item() == 0.0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shift_positions_reproduces_peft_without_explicit_positions(kind, batch):
    ids, mask = batch
    base = tiny(kind).eval()
    pm, w = peft_and_tables(base, 3)
    model = sp.wrap(copy.deepcopy(base), sp.PrefixConfig(num_virtual_tokens=3, shift_positions=True)).eval()
    with torch.no_grad():
        for i, table in model.method.tables.items():
            table.copy_(torch.stack([w[2 * int(i)], w[2 * int(i) + 1]]))
        ref = pm(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=ids, attention_mask=mask).logits
    assert (out - ref)[mask.bool()].abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="shift_positions"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_projection_prefix_logits_equal_peft(batch):
    """The reparameterisation MLP (Embedding(P, d) -> Linear(d, h) -> Tanh -> Linear(h, L*2*H*D)) with PEFT's weights
    gives PEFT's prefix_projection logits: same activation and the same [P, L, 2, H, D] layout of its output. GPT-2
    (PEFT's projection output is sized by the hidden size, which differs from H_kv * D on grouped-query models)."""
    ids, mask = batch
    base = tiny("gpt2").eval()
    p, h = 4, 16
    pm = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p,
                                                                 prefix_projection=True, encoder_hidden_size=h))
    enc = pm.prompt_encoder["default"]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in (enc.embedding.weight, *enc.transform.parameters()):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
    pm.eval()
    model = sp.wrap(copy.deepcopy(base), sp.PrefixConfig(num_virtual_tokens=p, projection=True,
                                                         projection_hidden_size=h, shift_positions=True)).eval()
    with torch.no_grad():
        model.method.wte.weight.copy_(enc.embedding.weight)
        model.method.mlp.load_state_dict(enc.transform.state_dict())
        ref = pm(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=ids, attention_mask=mask).logits
    assert (out - ref)[mask.bool()].abs().max().item() <= 1e-5
    assert (ref - base(input_ids=ids, attention_mask=mask).logits)[mask.bool()].abs().max().item() > 1e-2
