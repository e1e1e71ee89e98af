"""APT's host work per layer call (issue 18, part 2): the gate reaches attention's shape in one reshape, APT's gate
pooling skips casts that would do nothing, and ``benchmarks/apt_host_ops.py`` (aten ops per layer call) runs.

Every check of a cut compares against the computation it replaced, bit for bit (outputs and gradients)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import OpRecorder, load_benchmark, tiny

import softprompt as sp
from softprompt.engine import attention
from softprompt.engine.state import LayerInjection
from softprompt.pooling import pool


def _old_gated_prefix(key, value, gate, values_only, dtype):
    """The gate application before the cut: cast, reshape to [B, H|1, P], then a trailing unsqueeze."""
    g = gate.to(dtype=dtype)
    g = g.reshape(g.shape[0], -1 if g.dim() > 2 else 1, g.shape[-1])[..., None]
    return (key if values_only else key * g), value * g


def _leaves(seed, gate_shape, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    key, value = (torch.randn(2, 3, 4, 5, generator=gen, dtype=dtype).requires_grad_() for _ in range(2))
    gate = torch.rand(*gate_shape, generator=gen).requires_grad_()
    return key, value, gate


@pytest.mark.parametrize("gate_shape", [(2, 4), (2, 3, 4)], ids=["per-row", "per-head"])
@pytest.mark.parametrize("values_only", [False, True])
def test_gate_is_one_reshape_and_equal_to_the_computation_it_replaced(gate_shape, values_only):
    key, value, gate = _leaves(0, gate_shape)
    inj = LayerInjection(key=key, value=value, gate=gate, gate_values_only=values_only)
    counter = OpRecorder()
    with counter:
        pk, pv = attention._compute_gated_prefix(inj, 2, torch.float32, key.device)
    products = ["aten.mul.Tensor"] * (1 if values_only else 2)
    assert counter.ops == ["aten.view.default", *products]  # was a view and an unsqueeze
    rk, rv, rg = _leaves(0, gate_shape)
    want_k, want_v = _old_gated_prefix(rk, rv, rg, values_only, torch.float32)
    assert torch.equal(pk, want_k) and torch.equal(pv, want_v)
    ((pk * 1.5).sum() + (pv ** 2).sum()).backward()
    ((want_k * 1.5).sum() + (want_v ** 2).sum()).backward()
    for got, want in ((key, rk), (value, rv), (gate, rg)):
        assert torch.equal(got.grad, want.grad)


def test_a_gate_of_another_dtype_is_still_cast_first():
    key, value, gate = _leaves(1, (2, 4), dtype=torch.bfloat16)
    inj = LayerInjection(key=key, value=value, gate=gate)
    pk, pv = attention._compute_gated_prefix(inj, 2, torch.bfloat16, key.device)
    want_k, want_v = _old_gated_prefix(key, value, gate, False, torch.bfloat16)
    assert pk.dtype == torch.bfloat16 and torch.equal(pk, want_k) and torch.equal(pv, want_v)


def test_apt_gate_pools_in_the_dtype_it_always_used():
    """The gate of a float32 method: bf16 hidden states are cast to float32 before pooling without shared pool
    weights, and after the pooling product with them (exact values)."""
    model = sp.wrap(tiny("llama"), sp.APTConfig(num_virtual_tokens=3)).eval()
    method = model.method
    hidden = torch.randn(2, 5, model.info.hidden_size)
    weights = torch.full((2, 1, 5), 0.2)
    lin = method.gate_proj["0"]
    with torch.no_grad():
        alpha, lam = method.compute_gate(0, hidden, None, pool_weights=weights)
        assert torch.equal(alpha, torch.sigmoid(lin(torch.bmm(weights, hidden).squeeze(1))))
        low = hidden.to(torch.bfloat16)
        mask = torch.ones(2, 5, dtype=torch.long)
        got, _ = method.compute_gate(0, low, mask)
        assert torch.equal(got, torch.sigmoid(lin(pool(low.to(torch.float32), mask, "mean"))))
        got, _ = method.compute_gate(0, low, None, pool_weights=weights.to(torch.bfloat16))
        want = torch.sigmoid(lin(torch.bmm(weights.to(torch.bfloat16), low).squeeze(1).to(torch.float32)))
        assert torch.equal(got, want)
    assert lam is method.gate_lambda["0"]


def test_apt_host_ops_script_runs_at_tiny_settings(tmp_path, capsys):
    """Smoke run: counts come back per case and variant; nothing about time is measured or asserted."""
    module = load_benchmark("apt_host_ops")
    out = tmp_path / "ops.json"
    threads = torch.get_num_threads()
    cases = module.main(["--layers", "2", "--short-layers", "1", "--seq", "4", "--tokens", "2", "--models", "decoder",
                         "--breakdown", "--kernels", "--json", str(out)])
    assert torch.get_num_threads() == threads
    assert json.loads(out.read_text()) == json.loads(json.dumps(cases))
    assert set(cases) == {"decoder/train", "decoder/forward"}
    for case in cases.values():
        assert set(case) == set(module.VARIANTS)
        bare, prefix, apt = (case[v]["per_layer"] for v in module.VARIANTS)
        assert 0 < bare < prefix < apt
        assert all(sum(case[v]["by_op"].values()) == case[v]["per_layer"] for v in module.VARIANTS)
        assert all(0 < case[v]["non_view_per_layer"] < case[v]["per_layer"] for v in module.VARIANTS)
    printed = capsys.readouterr().out
    assert "| decoder/train |" in printed and "decoder/forward: " in printed and "without view ops" in printed
    with pytest.raises(SystemExit):
        module.main(["--layers", "2", "--short-layers", "2"])


def test_apt_rounding_script_runs_against_a_commit(capsys):
    """Smoke run against HEAD (another import of the package): both versions close to float64 in fp32."""
    module = load_benchmark("apt_rounding")
    rows = module.main(["--baseline", "HEAD", "--layers", "2", "--models", "encoder"])
    assert [r["case"] for r in rows] == [f"encoder {t} {p}" for t in ("kv", "v") for p in ("fp32", "bf16 autocast")]
    for r in rows[::2]:  # fp32
        assert r["now"]["logits"] < 1e-5 and r["before"]["logits"] < 1e-5 and r["max_abs_logit_diff"] < 1e-6
        assert {"tables", "gate_proj", "gate_lambda"} <= set(r["now"])
    assert "relative error against float64" in capsys.readouterr().out
