"""APT (adaptive prefix tuning): gates against hand computations, parity with prefix tuning, padding, gradients and
checkpointing, save/load, generation, mixed precision (probing and PT-2* allocation: test_apt_tools.py). Tiny random
models only."""

import copy
import json

import pytest
import torch
from _helpers.apt import SHARP_LM, apt, bert, last_hidden, left_padded, llama_lm, right_padded

import softprompt as sp
from softprompt.errors import ConfigError
from softprompt.methods import METHODS, config_from_dict, method_classes
from softprompt.methods.apt import APT, APTConfig


# ---- builders ------------------------------------------------------------------------------------------------------
def pool64(h, mask, how):
    """Float64 reference pooling written independently of the library."""
    rows = []
    for b in range(h.shape[0]):
        real = [j for j in range(h.shape[1]) if mask[b, j] > 0]
        if how == "mean":
            rows.append(h[b, real].mean(0))
        elif how == "first":
            rows.append(h[b, real[0]])
        else:
            rows.append(h[b, real[-1]])
    return torch.stack(rows)


def capture_block_inputs(model):
    """Forward pre-hooks on every transformer block recording the hidden states entering it."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.injector.blocks):
        def hook(module, args, kwargs, i=i):
            seen[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


# ---- registration and config ---------------------------------------------------------------------------------------
def test_registered_and_lazy_config():
    assert sp.APTConfig is APTConfig
    assert method_classes("apt") == (APTConfig, APT) and "apt" in METHODS
    cfg = config_from_dict("apt", {"num_virtual_tokens": 5, "gate_pool": "first", "gate_target": "v"})
    assert isinstance(cfg, APTConfig) and cfg.method == "apt" and cfg.gate_target == "v"
    defaults = APTConfig()
    assert (defaults.gate_pool, defaults.gate_target, defaults.lambda_init, defaults.gate_init, defaults.gate_bias) == (
        "mean", "kv", 1.0, "normal", True)
    for bad in ({"gate_pool": "max"}, {"gate_target": "logit"}, {"gate_init": "ones"}, {"lambda_init": float("nan")},
                {"num_virtual_tokens": -1}):
        with pytest.raises(ConfigError):
            APTConfig(**bad)


def test_init_options():
    """gate_init='zeros' gives alpha = 0.5 exactly; every lambda starts at lambda_init."""
    base = bert()
    model = sp.wrap(base, APTConfig(num_virtual_tokens=3, gate_init="zeros", lambda_init=2.0))
    ids, mask = right_padded()
    with torch.no_grad(), model.method.recording() as gates:
        model(input_ids=ids, attention_mask=mask)
    assert sorted(gates) == [0, 1, 2]
    for g in gates.values():
        assert torch.equal(g["alpha"], torch.full((2, 3), 0.5)) and g["lambda"] == 2.0
    normal = sp.wrap(bert(), APTConfig(num_virtual_tokens=3))
    w = normal.method.gate_proj["0"].weight
    assert 0.005 < w.std().item() < 0.05 and torch.all(normal.method.gate_proj["0"].bias == 0)


@pytest.mark.parametrize("bias", [True, False])
def test_trainable_parameter_count_formula(bias):
    base = bert()
    p = 5
    model = sp.wrap(base, APTConfig(num_virtual_tokens=p, gate_bias=bias))
    info = model.info
    L, d, h, D = info.num_layers, info.hidden_size, info.num_kv_heads, info.head_dim
    prefix = L * 2 * h * p * D
    gates = L * (d * p + 1) + (L * p if bias else 0)  # spec section 1: L*(d*l + 1) [+ L*l bias]
    method, _head, _ = model.num_parameters_summary()
    assert method == prefix + gates
    assert model.method.num_gate_parameters() == gates
    # Per-layer lengths (0 = no prefix, no gate there).
    lengths = [2, 0, 3]
    model = sp.wrap(bert(), APTConfig(layer_lengths=lengths, gate_bias=bias))
    expect = sum(2 * h * n * D + d * n + (n if bias else 0) + 1 for n in lengths if n)
    assert model.num_parameters_summary()[0] == expect
    assert sorted(model.method.gate_proj) == ["0", "2"]


# ---- the gate formula ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["mean", "first", "last"])
def test_gate_equals_float64_formula(pool):
    """alpha_i = sigmoid(W_i . pool(h_{i-1}) + b_i), recomputed in float64 from the captured layer inputs."""
    base = bert().double()
    model = apt(base, p=4, gate_pool=pool)
    model.method.double()
    ids, mask = right_padded()
    seen, handles = capture_block_inputs(model)
    try:
        with torch.no_grad(), model.method.recording() as gates:
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    for i in range(model.info.num_layers):
        lin = model.method.gate_proj[str(i)]
        pooled = pool64(seen[i].double(), mask, pool)
        ref = torch.sigmoid(pooled @ lin.weight.double().T + lin.bias.double())
        got = gates[i]["alpha"].double()
        assert (got - ref.float().double()).abs().max().item() < 1e-6  # record stores float32
        assert gates[i]["lambda"] == pytest.approx(model.method.gate_lambda[str(i)].item())
    assert not torch.allclose(gates[0]["alpha"][0], gates[0]["alpha"][1])  # input-dependent: differs per example


@pytest.mark.parametrize("target", ["kv", "v"])
def test_gated_attention_equals_float64_hand_computation(target):
    """One layer's attention output = softmax(q [g*Pk ; K]^T / sqrt(D)) [g*Pv ; V] with g = lambda*alpha (keys
    scaled only for target 'kv'), computed by hand in float64."""
    base = bert().double()
    model = apt(base, p=3, gate_target=target)
    model.method.double()
    ids, mask = right_padded()
    layer = 1
    att = model.injector.attention_modules[layer]
    store = {}
    h1 = att.register_forward_pre_hook(lambda m, a, k: store.__setitem__("h", (a[0] if a else k["hidden_states"])),
                                       with_kwargs=True)
    h2 = att.register_forward_hook(lambda m, a, o: store.__setitem__("out", o[0]))
    try:
        with torch.no_grad(), model.method.recording() as gates:
            model(input_ids=ids, attention_mask=mask)
    finally:
        h1.remove()
        h2.remove()
    h = store["h"].double()
    B, N, _ = h.shape
    H, D = model.info.num_heads, model.info.head_dim
    split = lambda x: x.view(B, N, H, D).transpose(1, 2)
    with torch.no_grad():
        q, k, v = split(att.query(h)), split(att.key(h)), split(att.value(h))
        table = model.method.tables[str(layer)].double()  # [2, H, P, D]
        # BERT is post-LN: the attention input is the layer input h_{i-1}, so the gate is recomputed from it here.
        lin = model.method.gate_proj[str(layer)]
        alpha = torch.sigmoid(pool64(h, mask, "mean") @ lin.weight.T + lin.bias)
        assert (alpha.float() - gates[layer]["alpha"]).abs().max().item() < 1e-6
        g = (model.method.gate_lambda[str(layer)] * alpha)[:, None, :, None]  # [B, 1, P, 1]
        pk = table[0][None] * (g if target == "kv" else 1.0)
        pv = table[1][None] * g
        keys, values = torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv, v], 2)
        scores = q @ keys.transpose(-1, -2) / D**0.5
        visible = torch.cat([torch.ones(B, 3, dtype=torch.bool), mask.bool()], 1)[:, None, None, :]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        ref = (probs @ values).transpose(1, 2).reshape(B, N, H * D)
    out = store["out"].double()
    real = mask.bool()
    assert (out - ref)[real].abs().max().item() < 1e-10


def test_lambda_one_alpha_one_is_prefix_tuning_bit_for_bit():
    """W = 0, a huge bias (sigmoid = 1.0 exactly) and lambda = 1: outputs equal prefix tuning with the same tables."""
    for build, batch in ((bert, right_padded), (llama_lm, left_padded)):
        ids, mask = batch()
        ours = sp.wrap(build(), APTConfig(num_virtual_tokens=4, gate_init="zeros", lambda_init=1.0))
        with torch.no_grad():
            for lin in ours.method.gate_proj.values():
                lin.bias.fill_(1e4)
        plain = sp.wrap(build(), sp.PrefixConfig(num_virtual_tokens=4))
        with torch.no_grad():
            for i, t in plain.method.tables.items():
                t.copy_(ours.method.tables[i])
            a = ours(input_ids=ids, attention_mask=mask).logits
            b = plain(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("pool", ["mean", "first", "last"])
def test_pooling_ignores_padding(pool):
    """A right-padded row gives the same gates and logits as the same row without padding."""
    model = apt(bert(), p=4, gate_pool=pool)
    ids, mask = right_padded()
    n = int(mask[1].sum())
    with torch.no_grad():
        with model.method.recording() as padded:
            a = model(input_ids=ids, attention_mask=mask).logits[1]
        with model.method.recording() as alone:
            b = model(input_ids=ids[1:, :n], attention_mask=mask[1:, :n]).logits[0]
    assert (a - b).abs().max().item() < 1e-5
    for i in padded:
        assert (padded[i]["alpha"][1] - alone[i]["alpha"][0]).abs().max().item() < 1e-6


# ---- training: gradients, checkpointing, mixed precision ------------------------------------------------------------
def _grads(model, ids, mask, **kw):
    model.train()
    out = model(input_ids=ids, attention_mask=mask, **kw)
    loss = out.loss if out.loss is not None else out.logits.square().mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.method.named_parameters()}


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_gradients_reach_gates_and_tables_with_and_without_checkpointing(kind):
    if kind == "bert":
        build, (ids, mask), kw = bert, right_padded(), {"labels": torch.tensor([0, 2])}
    else:
        build, (ids, mask) = llama_lm, left_padded()
        kw = {"labels": ids.masked_fill(mask == 0, -100)}
    plain = apt(build(), p=3)
    ref = _grads(plain, ids, mask, **kw)
    names = set(ref)
    assert any(n.startswith("gate_proj.") and n.endswith("weight") for n in names)
    assert any(n.startswith("gate_lambda.") for n in names) and any(n.startswith("prefix.tables.") for n in names)
    for n, g in ref.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, n

    ckpt = apt(build(), p=3)
    ckpt.gradient_checkpointing_enable()
    calls = []
    original = ckpt.method.compute_gate
    ckpt.method.compute_gate = lambda *a, **k: (calls.append(a[0]), original(*a, **k))[1]
    attn_calls = []
    handles = [m.register_forward_pre_hook(lambda *_, i=i: attn_calls.append(i))
               for i, m in enumerate(ckpt.injector.attention_modules)]
    got = _grads(ckpt, ids, mask, **kw)
    for h in handles:
        h.remove()
    # Checkpointing is really on: every block ran twice (forward + recompute in backward).
    assert sorted(attn_calls) == sorted(list(range(3)) * 2)
    # transformers 5.x checkpoints the block's forward, not its __call__, so the gate (a module pre-hook) runs once
    # and keeps its small graph; versions that checkpoint __call__ recompute it. Both give the same gradients.
    assert set(calls) == {0, 1, 2} and all(calls.count(i) in (1, 2) for i in range(3))
    assert set(got) == names
    for n in names:
        assert (got[n] - ref[n]).abs().max().item() <= 1e-6, n


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_bf16_autocast_forward_and_backward(kind):
    model = apt(bert() if kind == "bert" else llama_lm(), p=3)
    ids, mask = right_padded() if kind == "bert" else left_padded()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(logits.float()).all()
    logits.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.method.gate_proj.parameters())
    # A model loaded in bf16 works too (gates computed in the method's float32, cast by the engine).
    model = apt((bert() if kind == "bert" else llama_lm()).to(torch.bfloat16), p=3)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits.float()).all()


# ---- save / load, generation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [False, True])
def test_save_load_round_trip_identical(tmp_path, projection):
    ids, mask = right_padded()
    model = apt(bert(), p=4, gate_pool="first", gate_target="v", lambda_init=0.7, projection=projection,
                projection_hidden_size=16)
    with torch.no_grad():
        model.base_model.classifier.weight.normal_()
        ref = model.eval()(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["method"] == "apt" and saved["config"]["gate_target"] == "v"
    loaded = sp.load(bert(), tmp_path)
    assert isinstance(loaded.method, APT) and loaded.method_config == model.method_config
    with torch.no_grad():
        out = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out, ref)


def test_generate_same_tokens_with_and_without_cache():
    model = apt(llama_lm(**SHARP_LM), p=3, init="random", init_std=1.0)
    ids, mask = left_padded()
    calls = []
    original = model.method.compute_gate
    model.method.compute_gate = lambda *a, **k: (calls.append(a[0]), original(*a, **k))[1]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, attention_mask=mask, use_cache=True, **kw)
    # Gates are computed at prefill only and reused by every decoding step.
    assert sorted(calls) == [0, 1, 2]
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    assert cached.shape == (2, ids.shape[1] + 4)
    assert torch.equal(cached, uncached)
    # The first generated token is the argmax of an ordinary forward (same prefill gates), given the positions
    # generate() gives left-padded rows (counting real tokens only; a forward alone numbers the padding too).
    with torch.no_grad():
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    assert torch.equal(cached[:, ids.shape[1]], logits.argmax(-1))


def test_deepcopy_and_state_cache_isolated():
    """Two forwards never share gates: the cache lives on the per-forward state, not on the module."""
    model = apt(bert(), p=2)
    ids, mask = right_padded()
    with torch.no_grad():
        a = last_hidden(model, input_ids=ids, attention_mask=mask)
        b = last_hidden(model, input_ids=ids[:, :4], attention_mask=mask[:, :4])
        c = last_hidden(copy.deepcopy(model), input_ids=ids, attention_mask=mask)
    assert (a[:, :4] - b).abs().max() > 1e-2 and torch.equal(a, c)


def test_gate_init_std_scales_the_normal_gate_init_exactly():
    """gate_init='normal' draws W_i ~ N(0, 1) * gate_init_std from a generator seeded with seed + 1 (independent of
    the prefix tables), one [P, d] draw per prefixed layer in layer order; the bias starts at 0."""
    p, seed = 3, 4
    model = sp.wrap(bert(), APTConfig(num_virtual_tokens=p, gate_init_std=0.37, seed=seed))
    d = model.info.hidden_size
    gen = torch.Generator().manual_seed(seed + 1)
    for i in sorted(model.method.gate_proj, key=int):
        want = torch.randn(p, d, generator=gen) * 0.37
        assert torch.equal(model.method.gate_proj[i].weight.detach(), want)
        assert torch.equal(model.method.gate_proj[i].bias.detach(), torch.zeros(p))
