"""APT's tools: gate probing, prefix lengths allocated to a budget, pruning to a PT-2* config and the gate plot."""

import json

import pytest
import torch
from _helpers.apt import apt, bert, right_padded

import softprompt as sp
from softprompt.errors import ConfigError
from softprompt.methods.apt.tools import allocate_lengths, plot_gates, probe_gates, prune, save_layer_lengths


# ---- probing and PT-2* ---------------------------------------------------------------------------------------------
def _batches():
    ids, mask = right_padded()
    return [{"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])},
            {"input_ids": ids[:1], "attention_mask": mask[:1]}]


def test_probe_gates_averages_examples():
    model = apt(bert(), p=4)
    model.train()
    gates = probe_gates(model, _batches())
    assert model.training  # mode restored
    assert gates["num_examples"] == 3 and gates["num_layers"] == 3 and gates["lengths"] == [4, 4, 4]
    ids, mask = right_padded()
    model.eval()
    with torch.no_grad(), model.method.recording() as rec:
        model(input_ids=ids, attention_mask=mask)
    for i in range(3):
        a = rec[i]["alpha"].double()
        mean = (a.sum(0) + a[0]) / 3  # row 0 appears twice (second batch)
        assert torch.allclose(torch.tensor(gates["alpha"][i], dtype=torch.float64), mean, atol=1e-6)
        lam = model.method.gate_lambda[str(i)].item()
        assert gates["lambda"][i] == pytest.approx(lam)
        assert gates["layer_mass"][i] == pytest.approx(abs(lam) * mean.mean().item(), rel=1e-6)
        assert torch.allclose(torch.tensor(gates["gate"][i], dtype=torch.float64), lam * mean, atol=1e-6)
    json.dumps(gates)  # JSON-ready
    with pytest.raises(ConfigError):
        probe_gates(sp.wrap(bert(), sp.PrefixConfig(num_virtual_tokens=2)), _batches())


def test_allocate_lengths_sums_to_budget_and_follows_mass():
    gates = {"layer_mass": [0.1, 0.6, 0.0, 0.3]}
    assert allocate_lengths(gates, 10) == [1, 6, 0, 3]
    for budget in (1, 7, 13, 50, 101):
        lengths = allocate_lengths(gates, budget)
        assert sum(lengths) == budget and all(n >= 0 for n in lengths)
        assert lengths[1] >= lengths[3] >= lengths[0] >= lengths[2] == 0
    # Largest remainder: quotas 7*[1/3, 1/3, 1/3] = 2.33 each -> 3, 2, 2 (ties to the lower layer).
    assert allocate_lengths({"layer_mass": [1.0, 1.0, 1.0]}, 7) == [3, 2, 2]
    assert allocate_lengths({"layer_mass": [0.0, 0.0]}, 5) == [3, 2]  # no signal: equal shares
    assert allocate_lengths(gates, 12, min_length=1) == [2, 6, 1, 3]
    for bad in (0, -3, 2.5):
        with pytest.raises(ConfigError):
            allocate_lengths(gates, bad)
    with pytest.raises(ConfigError):
        allocate_lengths(gates, 3, min_length=1)


def test_prune_writes_prefix_config_that_trains(tmp_path):
    model = apt(bert(), p=4)
    with torch.no_grad():  # alpha = 0.5 everywhere; lambda 0, 1, 3 -> masses 0, 0.5, 1.5 -> quotas 0, 2, 6 of 8
        for lin in model.method.gate_proj.values():
            lin.weight.zero_()
            lin.bias.zero_()
        for i, lam in enumerate((0.0, 1.0, 3.0)):
            model.method.gate_lambda[str(i)].fill_(lam)
    path = tmp_path / "lengths.json"
    lengths = prune(model, _batches(), budget=8, path=path)
    assert lengths == [0, 2, 6]
    data = json.loads(path.read_text())
    assert data == {"layer_lengths": lengths}
    pt2 = sp.wrap(bert(), sp.PrefixConfig(**data))
    assert pt2.method.lengths == lengths
    ids, mask = right_padded()
    assert pt2(input_ids=ids, attention_mask=mask).logits.shape == (2, 3)
    save_layer_lengths([1, 2, 3], tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"layer_lengths": [1, 2, 3]}


def test_plot_gates_writes_png(tmp_path):
    model = apt(bert(), layer_lengths=[3, 0, 5])
    gates = probe_gates(model, _batches())
    assert gates["alpha"][1] == [] and gates["lambda"][1] is None and gates["layer_mass"][1] == 0.0
    path = tmp_path / "sub" / "gates.png"
    plot_gates(gates, path, title="tiny BERT")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
