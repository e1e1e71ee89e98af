"""APT's per-layer cuts (issue 18, session 16), each checked against the computation it replaced.

* Key and value gated in one multiply of compose's joint [2, B, H, P, D] view: the same products as two multiplies
  (outputs and the tables' gradients bit for bit); the gate's gradient is one reduction over key and value instead
  of two and a sum, exact where every partial sum is (dyadic values), within float rounding otherwise.
* lambda_i out of the layer call: APT's forward scales all layers' stacked tables by their lambdas in one multiply
  (keys and values, or values only), and the layer's gate is alpha alone. Same numbers as lambda * alpha up to float
  rounding; exact where the products are (dyadic values); the saved adapter is unchanged. Through the whole model,
  APT equals a plain prefix model given the same factorisation bit for bit (moved here from ``test_apt.py``).
"""

from __future__ import annotations

import pytest
import torch
from _helpers.apt import apt, bert, last_hidden, right_padded
from conftest import OpRecorder, tiny

import softprompt as sp
from softprompt.engine import attention
from softprompt.engine.compose import Contribution, Part, compose
from softprompt.engine.state import InjectionState, LayerInjection
from softprompt.methods.base import MethodInputs

B, H, P, D = 3, 2, 4, 5


def _leaves(seed: int, gate_shape: tuple, dyadic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's table [2, 1, H, P, D] (key, value) and a gate, float64 leaves. Dyadic: multiples of 1/4 in [-2, 2],
    whose products and sums of a few dozen terms are exact in float64, so any summation order gives one result."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        if dyadic:
            return torch.randint(-8, 9, shape, generator=gen).double() / 4
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return draw(2, 1, H, P, D).requires_grad_(), draw(*gate_shape).requires_grad_()


def _loss(pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """Weighs keys and values differently (the gate's gradient sums both); dyadic weights (see ``_leaves``)."""
    w = (torch.arange(pk.numel(), dtype=pk.dtype).view(pk.shape) % 9 - 4) / 4
    return (pk * w).sum() + (pv * (1 - w)).pow(2).sum()


def _plain(table: torch.Tensor, gate: torch.Tensor, values_only: bool):
    """The reference: expand, then one multiply per gated tensor."""
    g = gate.reshape(gate.shape[0], -1 if gate.dim() > 2 else 1, gate.shape[-1], 1)
    k, v = table.expand(-1, B, -1, -1, -1).unbind(0)
    return (k if values_only else k * g), v * g


def _engine(table: torch.Tensor, gate: torch.Tensor, values_only: bool, joint: bool):
    """compose (a contribution with a layer hook: the joint view is made) and attention's gate application."""
    hook = (lambda *_: None) if joint else None
    key, value = table.unbind(0)
    state = compose([Part(Contribution(prefixes={0: (key, value)}, layer_hook=hook))], B)
    inj = state.layers[0]
    assert (inj.key_value is not None) == joint
    inj.gate, inj.gate_values_only = gate, values_only
    counter = OpRecorder()
    with counter:
        pk, pv = attention._compute_gated_prefix(inj, B, torch.float64, table.device)
    return pk, pv, counter.ops


def _run(fn, table, gate):
    pk, pv, *_ = fn(table, gate)
    grads = torch.autograd.grad(_loss(pk, pv), [table, gate])
    return pk.detach(), pv.detach(), grads


@pytest.mark.parametrize("gate_shape", [(B, P), (B, H, P)], ids=["per-row", "per-head"])
@pytest.mark.parametrize("dyadic", [True, False], ids=["dyadic", "random"])
def test_joint_gate_is_one_multiply_with_the_two_multiplies_numbers(gate_shape, dyadic):
    table, gate = _leaves(0, gate_shape, dyadic)
    want_k, want_v, (want_table, want_gate) = _run(lambda t, g: _plain(t, g, False), table, gate)
    for joint in (True, False):
        got_k, got_v, (got_table, got_gate) = _run(lambda t, g, j=joint: _engine(t, g, False, j), table, gate)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        assert torch.equal(got_table, want_table)
        if dyadic or not joint:
            assert torch.equal(got_gate, want_gate)
        else:  # one reduction over key and value: another summation order
            torch.testing.assert_close(got_gate, want_gate, rtol=1e-14, atol=1e-14)
    ops = _engine(table, gate, False, True)[2]
    assert ops == ["aten.view.default", "aten.mul.Tensor", "aten.unbind.int"]  # was a view and two multiplies


def test_values_only_gating_keeps_its_single_multiply():
    table, gate = _leaves(1, (B, P), False)
    want_k, want_v, want = _run(lambda t, g: _plain(t, g, True), table, gate)
    got_k, got_v, got = _run(lambda t, g: _engine(t, g, True, True), table, gate)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert _engine(table, gate, True, True)[2] == ["aten.view.default", "aten.mul.Tensor"]


def test_joint_view_only_for_contributions_with_a_layer_hook():
    """Prefix tuning (no hook) keeps its ops; an injection without a joint view gates key and value separately."""
    table, _ = _leaves(2, (B, P), False)
    key, value = table.detach().unbind(0)
    plain = compose([Part(Contribution(prefixes={0: (key, value), 1: (key, value)}))], B)
    assert all(inj.key_value is None for inj in plain.layers.values())
    hooked = compose([Part(Contribution(prefixes={0: (key, value), 1: (key, value)}, layer_hook=lambda *_: None))],
                     B)
    for inj in hooked.layers.values():
        assert inj.key_value.shape == (2, B, H, P, D)
        assert torch.equal(inj.key_value[0], inj.key) and torch.equal(inj.key_value[1], inj.value)
    assert LayerInjection().key_value is None


# ---- lambda_i scales the stacked tables once per forward ---------------------------------------------------------
def _dyadic_apt(target: str, lengths=None, double: bool = True):
    """A tiny BERT with APT whose tables and lambdas are multiples of 1/4 (exact products, see ``_leaves``)."""
    cfg = {"layer_lengths": lengths} if lengths else {"num_virtual_tokens": 4}
    model = sp.wrap(tiny("bert", task="cls"), sp.APTConfig(gate_target=target, init="random", **cfg))
    if double:
        model.method.double()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in model.method.tables.values():
            t.copy_(torch.randint(-8, 9, t.shape, generator=gen) / 4)
        for lam in model.method.gate_lambda.values():
            lam.fill_(float(torch.randint(1, 12, (), generator=gen)) / 4)
    return model


def _inputs(model):
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    return MethodInputs(ids, (ids > 0).long(), model.base_model.get_input_embeddings(), 2)


@pytest.mark.parametrize("target", ["kv", "v"])
@pytest.mark.parametrize("lengths", [None, [4, 0, 2]], ids=["one-length", "lengths-differ"])
def test_lambda_scales_the_tables_and_the_gate_is_alpha(target, lengths):
    """The contribution's key and value of layer i are lambda_i * table (keys unscaled for 'v'), values and gradients
    equal to a plain float64 computation; the hook's gate is alpha, bit for bit what ``compute_gate`` gives."""
    model = _dyadic_apt(target, lengths)
    method = model.method
    contrib = method(_inputs(model))
    tables, lams = dict(method.tables.items()), dict(method.gate_lambda.items())
    assert sorted(contrib.prefixes) == sorted(int(i) for i in tables)
    weights = {}
    for i, (k, v) in contrib.prefixes.items():
        t, lam = tables[str(i)], lams[str(i)]
        assert torch.equal(k, (t[:1] * lam) if target == "kv" else t[:1]) and torch.equal(v, t[1:] * lam)
        weights[i] = torch.randint(-4, 5, (2, *k.shape[1:]), generator=torch.Generator().manual_seed(i)) / 4
    loss = sum((k * weights[i][:1]).sum() + (v * weights[i][1:]).pow(2).sum() for i, (k, v) in contrib.prefixes.items())
    loss.backward()
    for i in contrib.prefixes:
        t, lam, w = tables[str(i)].detach(), lams[str(i)].detach(), weights[i]
        key_scale = lam if target == "kv" else 1.0
        want_t = torch.cat([w[:1] * key_scale, 2 * (t[1:] * lam) * w[1:] ** 2 * lam])
        want_lam = 2 * ((t[1:] * lam) * w[1:] ** 2 * t[1:]).sum() + ((t[:1] * w[:1]).sum() if target == "kv" else 0)
        assert torch.equal(tables[str(i)].grad, want_t) and torch.equal(lams[str(i)].grad, want_lam)
    state = InjectionState(attention_mask=_inputs(model).attention_mask)
    hidden = torch.randn(2, 5, model.info.hidden_size, dtype=torch.float64)
    for i in contrib.prefixes:
        contrib.layer_hook(i, hidden, state)
        alpha, _ = method.compute_gate(i, hidden, state.attention_mask)
        assert torch.equal(state.layers[i].gate, alpha)


def test_lambda_costs_no_op_per_layer_in_the_forward():
    """The contribution's ops do not grow with the layers (the lambdas are stacked and applied once)."""
    counts = []
    for lengths in ([3, 0, 0], [3, 3, 3]):  # one prefixed layer, three
        model = sp.wrap(tiny("bert", task="cls"), sp.APTConfig(layer_lengths=lengths))
        inputs = _inputs(model)
        counter = OpRecorder()
        with counter:
            model.method(inputs)
        counts.append(len(counter.ops))
    assert counts[0] == counts[1]


def test_saved_adapter_holds_the_unscaled_tables_and_every_lambda(tmp_path):
    """What is saved did not change: the tables as trained (not scaled by lambda) and one lambda per layer."""
    model = _dyadic_apt("kv", double=False)
    saved = model.method.export_state_dict()
    assert sorted(k for k in saved if k.startswith("gate_lambda.")) == [f"gate_lambda.{i}" for i in range(3)]
    for i, t in model.method.tables.items():
        assert torch.equal(saved[f"tables.{i}"], t.detach())
        assert torch.equal(saved[f"gate_lambda.{i}"], model.method.gate_lambda[i].detach())
    ids = _inputs(model)
    model.save_pretrained(tmp_path)
    loaded = sp.load(tiny("bert", task="cls"), tmp_path)
    with torch.no_grad():
        model.eval()
        assert torch.equal(loaded(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits,
                           model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits)


@pytest.mark.parametrize("target", ["kv", "v"])
def test_gate_target_matches_hand_gated_prefix_through_engine(target):
    """APT's output equals, bit for bit, a plain prefix model whose tables are scaled by lambda (values only for 'v')
    and whose engine gate is alpha: APT's own factorisation (lambda scales the stacked tables once per forward). Fed
    lambda * alpha on unscaled tables instead (the factorisation before session 16), the same model agrees within
    float rounding (1.1e-6 here, on hidden states of magnitude ~2). kv != v."""
    outs = {}
    ids, mask = right_padded()
    for tgt in ("kv", "v"):
        model = apt(bert(), p=4, gate_target=tgt)
        with torch.no_grad(), model.method.recording() as gates:
            outs[tgt] = last_hidden(model, input_ids=ids, attention_mask=mask)
        if tgt != target:
            continue
        refs = {}
        for factorised in (True, False):
            plain = sp.wrap(bert(), sp.PrefixConfig(num_virtual_tokens=4))
            with torch.no_grad():
                for i, t in plain.method.tables.items():
                    t.copy_(model.method.tables[i])
                    if factorised:
                        (t if tgt == "kv" else t[1]).mul_(model.method.gate_lambda[i])
                inputs, state, _ = plain.build_state(ids, mask, None)
                for i, g in gates.items():
                    state.layers[i].gate = g["alpha"] if factorised else g["lambda"] * g["alpha"]
                    state.layers[i].gate_values_only = tgt == "v"
                refs[factorised] = last_hidden(plain.base_model, **inputs, softprompt_state=state)
                ungated = last_hidden(plain, input_ids=ids, attention_mask=mask)
        assert torch.equal(outs[tgt], refs[True])
        assert (outs[tgt] - refs[False]).abs().max().item() <= 1e-5
        assert (outs[tgt] - ungated).abs().max().item() > 1e-2  # the gate really acts
    assert (outs["kv"] - outs["v"]).abs().max().item() > 1e-2

