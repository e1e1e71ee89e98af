"""Prompt tokens inserted into the sequence (encoders, decoders, NPG, ModernBERT) against hand computations."""

import copy

import pytest
import torch
from conftest import tiny

import softprompt as sp


def test_encoder_insertion_equals_manual_layers():
    """T8: tokens inserted before layer m of BERT, by hand through the HF layers, equal the engine's result."""
    base = tiny("bert").eval()
    model = sp.wrap(copy.deepcopy(base), sp.LatePromptConfig(num_virtual_tokens=3, layer=1, init_std=1.0)).eval()
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    s = model.method.prompt.detach()
    bert = copy.deepcopy(base).bert
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        h = bert.embeddings(input_ids=ids)
        m4 = (mask[:, None, None, :] == 1).expand(2, 1, 6, 6)
        r = bert.encoder.layer[0](h, attention_mask=m4)
        h = r[0] if isinstance(r, tuple) else r
        h = torch.cat([h[:, :1], s[None].expand(2, -1, -1), h[:, 1:]], 1)
        mask2 = torch.cat([mask[:, :1], torch.ones(2, 3, dtype=mask.dtype), mask[:, 1:]], 1)
        m4 = (mask2[:, None, None, :] == 1).expand(2, 1, 9, 9)
        for layer in bert.encoder.layer[1:]:
            r = layer(h, attention_mask=m4)
            h = r[0] if isinstance(r, tuple) else r
        h = torch.cat([h[:, :1], h[:, 4:]], 1)
        ref = base.classifier(bert.pooler(h))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decoder_insertion_equals_full_sequence_through_late_layers():
    """Causal insertion = prompt in front from layer m on (prompt positions 0..t-1, real tokens keep theirs)."""
    base = tiny("llama").eval()
    model = sp.wrap(copy.deepcopy(base), sp.LatePromptConfig(num_virtual_tokens=3, layer=1, init_std=1.0)).eval()
    ids = torch.randint(3, 100, (2, 6))
    s = model.method.prompt.detach()[None].expand(2, -1, -1)
    inner = copy.deepcopy(base).model
    with torch.no_grad():
        out = model(input_ids=ids).logits
        h = inner.embed_tokens(ids)
        pos = torch.arange(6)[None].expand(2, -1)
        pe = inner.rotary_emb(h, pos)
        causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
        h = inner.layers[0](h, attention_mask=causal, position_embeddings=pe, position_ids=pos)
        h = h[0] if isinstance(h, tuple) else h
        h = torch.cat([s, h], 1)
        pos2 = torch.cat([torch.arange(3), torch.arange(6)])[None].expand(2, -1)
        pe2 = inner.rotary_emb(h, pos2)
        causal2 = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].expand(2, 1, 9, 9)
        for layer in inner.layers[1:]:
            h = layer(h, attention_mask=causal2, position_embeddings=pe2, position_ids=pos2)
            h = h[0] if isinstance(h, tuple) else h
        ref = base.lm_head(inner.norm(h[:, 3:]))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["front", "after_cls"])
def test_token_classification_with_input_prompt_equals_hand_insertion(position):
    """An input-layer prompt of t vectors at ``at`` (0 for "front", 1 for "after_cls"): the logits and loss equal the
    base model run by hand on [E[:at]; prompt; E[at:]] with the mask grown by t ones at ``at`` and token type 0
    there, the t prompt rows cut from the logits and no label on them. Right padding on row 1."""
    torch.manual_seed(0)
    model = sp.wrap(tiny("bert", task="tok", initializer_range=0.3, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0),
                    sp.PromptTuningConfig(num_virtual_tokens=4, position=position, init="random")).eval()
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    labels = torch.randint(0, 3, (2, 6)).masked_fill(mask == 0, -100)
    types = torch.ones_like(ids)
    at, t = (0 if position == "front" else 1), 4
    base = model.base_model
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, token_type_ids=types)
        e = base.get_input_embeddings()(ids)
        p = model.method.prompt[None].expand(2, -1, -1)
        grow = lambda x, fill: torch.cat([x[:, :at], fill, x[:, at:]], 1)
        hidden = base.bert(inputs_embeds=grow(e, p), attention_mask=grow(mask, torch.ones(2, t, dtype=mask.dtype)),
                           token_type_ids=grow(types, torch.zeros(2, t, dtype=types.dtype))).last_hidden_state
        logits = base.classifier(hidden)
        logits = torch.cat([logits[:, :at], logits[:, at + t:]], 1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1), ignore_index=-100)
    assert out.logits.shape == (2, 6, 3)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=1e-6)
    # The position matters (absolute positions): the other position gives other logits.
    other = sp.wrap(base, sp.PromptTuningConfig(num_virtual_tokens=4, init="random",
                                                position="after_cls" if position == "front" else "front")).eval()
    with torch.no_grad():
        other.method.prompt.copy_(model.method.prompt)
        assert (other(input_ids=ids, attention_mask=mask).logits - out.logits).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_npg_prompt_equals_float64_generator_of_the_layer_input(kind):
    """LPT's neural prompt generator at layer m: S = view(W_up relu(W_down pool(h_{m-1}) + b_down) + b_up, [t, d])
    with pool = position 0 (encoders) or the mean over real tokens (decoders), recomputed in float64 from the hidden
    states entering layer m, which is the only layer that generates."""
    base = tiny(kind).eval()
    model = sp.wrap(base, sp.LatePromptConfig(num_virtual_tokens=3, layer=1, generator="npg", bottleneck=8)).eval()
    torch.manual_seed(5)
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones_like(ids)
    if kind == "llama":
        mask[1, :2] = 0  # left padding: the mean must skip it
    else:
        mask[1, 4:] = 0
    seen = {}
    block = model.injector.blocks[1]

    def record(module, args, kwargs):
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    h = seen["h"].double()
    real = mask.bool()
    if kind == "llama":
        pooled = torch.stack([h[b][real[b]].mean(0) for b in range(2)])
    else:
        pooled = h[:, 0]
    sd = {k: v.double() for k, v in model.method.state_dict().items()}
    ref = torch.relu(pooled @ sd["down.weight"].T + sd["down.bias"]) @ sd["up.weight"].T + sd["up.bias"]
    ref = ref.view(2, 3, model.info.hidden_size)
    with torch.no_grad():
        _, state, _ = model.build_state(ids, mask, None)
        for index in (0, 2):
            state.layer_hook(index, seen["h"], state)
            assert state.insertion is None  # only layer m generates
        state.layer_hook(1, seen["h"], state)
    got = state.insertion
    assert got.layer == 1 and got.at == (0 if kind == "llama" else 1)
    assert (got.vectors.double() - ref).abs().max().item() < 1e-5
    assert not torch.allclose(got.vectors[0], got.vectors[1])  # input-dependent


def _tiny_modernbert(**kw):
    import transformers as tf

    kw.setdefault("num_hidden_layers", 3)
    cfg = tf.ModernBertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                              num_labels=2, **kw)
    torch.manual_seed(0)
    return tf.ModernBertForSequenceClassification(cfg).eval()


def test_modernbert_prefix_matches_the_row_alone():
    model = sp.wrap(_tiny_modernbert(), sp.PrefixConfig(num_virtual_tokens=4)).eval()
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :5]).logits
    torch.testing.assert_close(out[1], alone[0], atol=1e-5, rtol=1e-5)


def test_modernbert_mid_layer_insertion_matches_a_direct_computation():
    """Late prompt tokens inserted before layer 1 of a rotary encoder (ModernBERT, global and local layers): the
    engine's output equals running the model's own modules by hand with the t vectors inserted after [CLS], their
    rotary position that of the token they precede, the real tokens keeping theirs, and padding masked."""
    from transformers.masking_utils import create_bidirectional_mask

    # 5 layers: after the insertion before layer 1, local and global layers alternate, so each grown cos/sin pair
    # is reused by a later layer of the same type.
    base = _tiny_modernbert(num_hidden_layers=5, global_attn_every_n_layers=2, local_attention=64)
    with torch.no_grad():  # peaked attention, so that a wrong rotary position changes the output (init is ~uniform)
        for layer in base.model.layers:
            layer.attn.Wqkv.weight.mul_(30)
    model = sp.wrap(base, sp.LatePromptConfig(num_virtual_tokens=3, layer=1)).eval()
    ids = torch.randint(3, 100, (2, 7))
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :5]).logits
        prompt = model.method.prompt
        t, at, n = prompt.shape[0], 1, ids.shape[1]
        mb = base.model
        h = mb.embeddings(input_ids=ids)
        pos = torch.arange(n)[None]
        for i, layer in enumerate(mb.layers):
            if i == 1:
                h = torch.cat([h[:, :at], prompt[None].expand(2, t, -1), h[:, at:]], dim=1)
                pos = torch.cat([pos[:, :at], torch.full((1, t), at), pos[:, at:]], dim=1)
                mask2 = torch.cat([mask[:, :at], torch.ones(2, t, dtype=mask.dtype), mask[:, at:]], dim=1)
            m = mask if i < 1 else mask2
            attn = create_bidirectional_mask(config=base.config, inputs_embeds=h, attention_mask=m)
            cos_sin = mb.rotary_emb(h, pos, layer.attention_type)
            h = layer(h, attention_mask=attn, position_embeddings=cos_sin)
        h = mb.final_norm(torch.cat([h[:, :at], h[:, at + t:]], dim=1))
        want = base.classifier(base.drop(base.head(h[:, 0])))
    assert {layer.attention_type for layer in mb.layers} == {"full_attention", "sliding_attention"}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], alone[0], atol=1e-5, rtol=1e-5)
    # A local window shorter than the sequence (the inserted columns stay visible to every row): a padded row
    # still equals the same row alone.
    narrow = sp.wrap(_tiny_modernbert(global_attn_every_n_layers=2, local_attention=4),
                     sp.LatePromptConfig(num_virtual_tokens=3, layer=1)).eval()
    with torch.no_grad():
        torch.testing.assert_close(narrow(input_ids=ids, attention_mask=mask).logits[1],
                                   narrow(input_ids=ids[1:, :5]).logits[0], atol=1e-5, rtol=1e-5)
    # ID-SPAM on the same encoder trains: the loss moves the generator
    idspam = sp.wrap(_tiny_modernbert(), sp.IDSPAMConfig(num_virtual_tokens=3, layer=2)).train()
    out = idspam(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert idspam.method.up.weight.grad.abs().sum() > 0
