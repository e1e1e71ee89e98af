"""The injector's branches that no model test reaches, each against a reference (engine coverage set: .ci/run)."""

import pytest
import torch
from _helpers.engine_branches import _randn
from conftest import tiny
from torch import nn

import softprompt as sp
from softprompt.engine.injector import _block_of, attach
from softprompt.engine.state import InjectionState, Insertion

pytestmark = pytest.mark.usefixtures("one_thread")


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
