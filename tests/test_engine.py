"""Engine behaviour: generate, checkpointing, padding, per-example prefixes, gates, insertion, unsupported models
(insertion against hand computations and ModernBERT: test_engine_insertion.py)."""

import copy

import pytest
import torch
from conftest import tiny

import softprompt as sp
from softprompt.engine.injector import attach
from softprompt.engine.state import InjectionState, LayerInjection

DECODERS = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]
CONFIGS = [
    sp.PromptTuningConfig(num_virtual_tokens=4),
    sp.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16),
    sp.PrefixConfig(num_virtual_tokens=5),
    sp.PrefixConfig(layer_lengths=[0, 3, 6]),
    sp.LatePromptConfig(num_virtual_tokens=3, layer=1),
]


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
def test_generate_same_tokens_with_and_without_cache(kind, config, batch):
    ids, mask = batch
    model = sp.wrap(tiny(kind), config).eval()
    # The scores of every step too: cached decode steps that lost the prefix once gave GPT-2 the uncached tokens (with
    # the nearly uniform attention of a default-init tiny model, their scores moved by ~1e-2). Logits of the sharp
    # tiny models are ~10x larger than at the default init: float32 differences of ~2e-5 are rounding.
    scores = {True: [], False: []}
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    a, b = (model.generate(ids, use_cache=cache, logits_processor=[lambda _, s, r=scores[cache]: r.append(s) or s],
                           **kw) for cache in (True, False))
    assert a.shape == (3, ids.shape[1] + 6)
    assert torch.equal(a, b)
    torch.testing.assert_close(torch.stack(scores[True]), torch.stack(scores[False]), rtol=0, atol=1e-4)
    assert torch.equal(a[:, : ids.shape[1]], ids)
    if not isinstance(config, (sp.PromptTuningConfig, sp.PTuningConfig)):
        return
    # Input-layer prompts generate from embeddings, where transformers keeps a cache even with use_cache=False, so
    # the comparison above is cached against cached. The uncached reference: each row alone, unpadded, a greedy
    # loop of full forwards (the prompt inserted anew each time), compared token by token and score by score.
    with torch.no_grad():
        for r in range(ids.shape[0]):
            tokens = ids[r][mask[r].bool()].tolist()
            for step in range(6):
                logits = model(input_ids=torch.tensor([tokens])).logits[0, -1]
                torch.testing.assert_close(logits, scores[True][step][r], rtol=0, atol=1e-4)
                tokens.append(int(logits.argmax()))
            assert tokens[-6:] == a[r, ids.shape[1]:].tolist(), (kind, r)


def _grads(model, ids, mask):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.trainable_parameters().items() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
def test_gradient_checkpointing_gives_same_gradients(kind, config, batch):
    ids, mask = batch
    plain = sp.wrap(tiny(kind), config).train()
    ckpt = sp.wrap(tiny(kind), config).train()
    ckpt.method.load_state_dict(plain.method.state_dict())
    ckpt.gradient_checkpointing_enable()
    g1, g2 = _grads(plain, ids, mask), _grads(ckpt, ids, mask)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        assert g1[name].abs().sum() > 0, name
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_checkpointing_probe_follows_toggles_after_wrapping(kind):
    """The probe caches which modules carry the flag, not the flag: enabling/disabling later, on the wrapper or on
    the base model directly, is seen; it agrees with transformers' own property every time."""
    model = sp.wrap(tiny(kind), sp.PrefixConfig(num_virtual_tokens=2)).train()
    base = model.base_model
    assert model._checkpointing() is False
    model.gradient_checkpointing_enable()
    assert model._checkpointing() is True and base.is_gradient_checkpointing
    base.gradient_checkpointing_disable()
    assert model._checkpointing() is False and not base.is_gradient_checkpointing
    base.gradient_checkpointing_enable()
    assert model._checkpointing() is True


@pytest.fixture
def hooks_inside_checkpoint(monkeypatch):
    """Checkpoint the whole ``__call__`` of every layer, module hooks included, as transformers 5.17 does (5.24
    checkpoints ``forward`` only, so hooks run once). One-shot steps in our layer pre-hooks must then replay
    identically: the GPU run under 5.17 failed with "A different number of tensors was saved" before the fix."""
    from functools import partial

    from transformers.modeling_layers import GradientCheckpointingLayer

    def call_517(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(partial(torch.nn.Module.__call__, self, **kwargs), *args)
        return torch.nn.Module.__call__(self, *args, **kwargs)

    def patch(model):
        for block in attach(model).blocks:
            cls = type(block)
            assert issubclass(cls, GradientCheckpointingLayer)
            monkeypatch.setattr(cls, "forward", getattr(cls.forward, "__wrapped__", cls.forward))
            monkeypatch.setattr(cls, "__call__", call_517)

    return patch


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("config", [
    sp.LatePromptConfig(num_virtual_tokens=3, layer=1, dropout=0.2),
    sp.LatePromptConfig(num_virtual_tokens=3, layer=1, generator="npg", bottleneck=8),
    sp.IDSPAMConfig(num_virtual_tokens=3, layer=1, bottleneck=8),
    sp.IDSPAMConfig(num_virtual_tokens=3, layer=1, bottleneck=8, embed_source="full"),
    sp.APTConfig(num_virtual_tokens=3),
], ids=lambda c: f"{c.method}-{getattr(c, 'generator', '')}{getattr(c, 'embed_source', '')}")
def test_checkpointing_with_hooks_inside_the_checkpoint(kind, config, batch, hooks_inside_checkpoint):
    ids, mask = batch
    torch.manual_seed(0)
    plain = sp.wrap(tiny(kind), config).train()
    ckpt = sp.wrap(tiny(kind), config).train()
    ckpt.method.load_state_dict(plain.method.state_dict())
    hooks_inside_checkpoint(ckpt.base_model)
    ckpt.gradient_checkpointing_enable()
    labels = torch.tensor([0, 1, 0]) if kind == "bert" else ids.masked_fill(mask == 0, -100)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same dropout masks in both runs (checkpointing restores the RNG for the replay)
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.method.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("config", [sp.IDSPAMConfig(num_virtual_tokens=3, layer=1, bottleneck=8),
                                    sp.LatePromptConfig(num_virtual_tokens=3, layer=1)], ids=lambda c: c.method)
def test_checkpointed_insertion_frees_the_model_after_backward(config, batch, hooks_inside_checkpoint):
    """The GPU benchmark kept ~3 GiB per ID-SPAM/LPT case alive: a checkpoint nested inside the replay of layer m
    (the insertion-to-prefix conversion) held its frames, and through them the whole model, after backward."""
    import gc
    import weakref

    ids, mask = batch

    def train_once():
        base = tiny("llama")
        model = sp.wrap(base, config).train()
        hooks_inside_checkpoint(base)
        model.gradient_checkpointing_enable()
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        return weakref.ref(base)

    ref = train_once()
    gc.collect()
    assert ref() is None


def test_no_grad_prefix_cache_follows_the_state(batch):
    """Without gradients the attention function keeps the cast/gated/expanded prefix of a state between calls
    (generate() steps); a new gate or a new batch size in the same state must not reuse it."""
    ids, mask = batch
    base = tiny("llama").eval()
    attach(base)
    k = torch.randn(1, 2, 3, 8)
    v = torch.randn(1, 2, 3, 8)
    state = InjectionState(layers={i: LayerInjection(k, v) for i in range(2)}, attention_mask=mask)
    with torch.no_grad():
        first = base(input_ids=ids, attention_mask=mask, softprompt_state=state).logits
        again = base(input_ids=ids, attention_mask=mask, softprompt_state=state).logits
        for i in range(2):
            state.layers[i].gate = torch.full((1, 3), 0.5)
        gated = base(input_ids=ids, attention_mask=mask, softprompt_state=state).logits
        fresh = InjectionState(layers={i: LayerInjection(k, v, gate=torch.full((1, 3), 0.5)) for i in range(2)},
                               attention_mask=mask)
        expected = base(input_ids=ids, attention_mask=mask, softprompt_state=fresh).logits
        one = base(input_ids=ids[:1], attention_mask=mask[:1], softprompt_state=state).logits
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(gated, expected, atol=0, rtol=0)
    assert not torch.allclose(gated, first)
    torch.testing.assert_close(one, expected[:1], atol=1e-5, rtol=1e-5)


def test_zero_length_prefix_is_the_base_model(batch):
    """T4: a prefix of length 0 at every layer (and layers without an entry) leave the model exactly as it was."""
    ids, mask = batch
    base = tiny("llama").eval()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    attach(base)
    empty = torch.zeros(1, 2, 0, 8)
    state = InjectionState(layers={i: LayerInjection(empty, empty) for i in range(2)}, attention_mask=mask)
    with torch.no_grad():
        out = base(input_ids=ids, attention_mask=mask, softprompt_state=state).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_encoder_prefix_changes_output_and_padding_is_respected():
    base = tiny("bert").eval()
    ids = torch.randint(3, 100, (1, 7))
    model = sp.wrap(copy.deepcopy(base), sp.PrefixConfig(num_virtual_tokens=4, init="random")).eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        ours = model(input_ids=ids).logits
        # The same row with right padding must give the same output (masked columns, prefix visible).
        padded = torch.cat([ids, torch.full((1, 3), 1)], 1)
        pmask = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], 1).long()
        ours_padded = model(input_ids=padded, attention_mask=pmask).logits
    assert (ours - plain).abs().max() > 1e-4
    torch.testing.assert_close(ours, ours_padded, atol=1e-5, rtol=1e-5)


def test_fused_causal_path_equals_masked_path():
    """P1/P2 regression: with no padding the engine takes the dummy-row is_causal route; it must equal the
    explicit-mask route (and must not crop the keys to the query length)."""
    base = tiny("llama").eval()
    attach(base)
    ids = torch.randint(3, 100, (2, 8))
    torch.manual_seed(3)
    layers = {i: LayerInjection(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)) for i in range(3)}
    state = InjectionState(layers=layers)
    with torch.no_grad():
        fused = base(input_ids=ids, softprompt_state=state).logits
        # An all-ones mask of a different dtype forces transformers to build a mask (the explicit route).
        mask = torch.ones_like(ids)
        mask_4d = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
        explicit = base(input_ids=ids, attention_mask=mask_4d, softprompt_state=state).logits
        no_prefix = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert (fused - no_prefix).abs().max() > 1e-3


def test_per_example_prefixes_equal_running_rows_alone(batch):
    ids, mask = batch
    base = tiny("llama").eval()
    attach(base)
    torch.manual_seed(4)
    k, v = torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8)
    state = InjectionState(layers={i: LayerInjection(k, v) for i in range(3)}, attention_mask=mask)
    with torch.no_grad():
        together = base(input_ids=ids, attention_mask=mask, softprompt_state=state).logits
        for r in range(3):
            alone_state = InjectionState(layers={i: LayerInjection(k[r:r + 1], v[r:r + 1]) for i in range(3)})
            alone = base(input_ids=ids[r:r + 1], attention_mask=mask[r:r + 1], softprompt_state=alone_state).logits
            real = mask[r].bool()
            torch.testing.assert_close(together[r][real], alone[0][real], atol=1e-5, rtol=1e-5)


def test_layer_hook_sees_layer_inputs_and_gates_scale_the_prefix(batch):
    ids, mask = batch
    base = tiny("llama").eval()
    attach(base)
    torch.manual_seed(5)
    k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    gate = torch.rand(3, 4)
    seen = []

    def hook(index, hidden, state):
        seen.append((index, tuple(hidden.shape)))
        state.layers[index].gate = gate

    gated = InjectionState(layers={i: LayerInjection(k, v) for i in range(3)}, layer_hook=hook)
    g = gate[:, None, :, None]
    manual = InjectionState(layers={i: LayerInjection(k * g, v * g) for i in range(3)})
    values_only = InjectionState(layers={i: LayerInjection(k, v * g) for i in range(3)})
    with torch.no_grad():
        a = base(input_ids=ids, attention_mask=mask, softprompt_state=gated).logits
        b = base(input_ids=ids, attention_mask=mask, softprompt_state=manual).logits
        gated_v = InjectionState(layers={i: LayerInjection(k, v, gate_values_only=True) for i in range(3)},
                                 layer_hook=lambda i, h, s: setattr(s.layers[i], "gate", gate))
        c = base(input_ids=ids, attention_mask=mask, softprompt_state=gated_v).logits
        d = base(input_ids=ids, attention_mask=mask, softprompt_state=values_only).logits
    assert seen == [(i, (3, 9, 32)) for i in range(3)]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-4


def test_bf16_autocast_runs_and_is_close(batch):
    ids, mask = batch
    # Default init here: the claim is about bf16 rounding, which the sharp tiny models' peaked softmax amplifies
    # (8% of the largest logit against 0.4% at the default init).
    model = sp.wrap(tiny("llama", initializer_range=0.02), sp.PrefixConfig(num_virtual_tokens=4)).eval()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(low).all()
    assert (low.float() - ref)[mask.bool()].abs().max() < 0.1


def test_unsupported_family_raises_naming_the_class():
    import transformers as tf

    cfg = tf.DebertaV2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4)
    with pytest.raises(sp.UnsupportedModelError, match="DebertaV2"):
        sp.wrap(tf.DebertaV2ForSequenceClassification(cfg), sp.PrefixConfig())


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta"])
def test_encoder_families_train_all_methods(kind):
    from softprompt.engine.injector import backbone_of

    ids = torch.randint(3, 100, (2, 6))
    for config in CONFIGS:
        model = sp.wrap(tiny(kind), config).train()
        out = model(input_ids=ids, labels=torch.tensor([0, 2]))
        out.loss.backward()
        assert out.logits.shape == (2, 3)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.method.parameters())
        assert all(p.grad is None for p in backbone_of(model.base_model).parameters())  # the base stays frozen


_COMPILE_METHODS = [sp.PromptTuningConfig(num_virtual_tokens=4), sp.PrefixConfig(num_virtual_tokens=4),
                    sp.APTConfig(num_virtual_tokens=4), sp.LatePromptConfig(num_virtual_tokens=3, layer=1),
                    sp.IDSPAMConfig(num_virtual_tokens=3, layer=1)]


@pytest.mark.parametrize("kind", ["qwen2", "bert"])
@pytest.mark.parametrize("config", _COMPILE_METHODS, ids=lambda c: type(c).__name__)
def test_wrapped_training_forward_is_one_graph_for_torch_compile(kind, config):
    """Every method's training forward (hooks, attention function, gates, insertion) traces into a single
    torch.compile graph with no graph break, so `torch.compile(mode="reduce-overhead")` can capture whole steps."""
    model = sp.wrap(tiny(kind, task="lm" if kind == "qwen2" else "cls"), copy.deepcopy(config)).train()
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids if kind == "qwen2" else torch.tensor([0, 1])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels)
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_apt_step_matches_eager():
    model = sp.wrap(tiny("qwen2"), sp.APTConfig(num_virtual_tokens=4)).train()
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    eager = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    loss = torch.compile(model)(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    torch._dynamo.reset()
    torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)
