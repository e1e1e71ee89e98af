"""One seed sets every random initialisation of a training run (issue 23): head, method parameters, generators,
prompt-init sampling. Two seeds give different initial trainable tensors; one seed twice gives identical ones."""

import pytest
import torch

from softprompt.loading import HeadSpec
from softprompt.train.runner import TrainConfig, build_model, seeded_options

SPEC = HeadSpec("classification", ["neg", "pos"])
CASES = [
    ("prompt", {"num_virtual_tokens": 4}),
    ("prompt", {"num_virtual_tokens": 4, "init": "random"}),
    ("ptuning", {"num_virtual_tokens": 4}),
    ("prefix", {"num_virtual_tokens": 4}),
    ("prefix", {"num_virtual_tokens": 4, "init": "random"}),
    ("prefix", {"num_virtual_tokens": 4, "projection": True, "projection_hidden_size": 16}),
    ("prefix", {"num_virtual_tokens": 4, "scale": 0.5}),
    ("apt", {"num_virtual_tokens": 4}),
    ("lpt", {"num_virtual_tokens": 3}),
    ("lpt", {"num_virtual_tokens": 3, "generator": "npg", "bottleneck": 8}),
    ("idspam", {"num_virtual_tokens": 3, "bottleneck": 8}),
    ("idspam", {"num_virtual_tokens": 3, "bottleneck": 8, "pooling": "mean", "up_activation": "none"}),
]


def initial(model_dir: str, method: str, options: dict, seed: int) -> tuple[dict, dict]:
    """(method tensors, head tensors) of a freshly built training model."""
    cfg = TrainConfig(method=method, model=model_dir, output="unused", seed=seed, method_options=options)
    model, _ = build_model(cfg, SPEC)
    tensors = {k: v.detach().clone() for k, v in model.trainable_parameters().items()}
    method_t = {k: v for k, v in tensors.items() if k.startswith("method.")}
    head_t = {k: v for k, v in tensors.items() if k.startswith("head.")}
    return method_t, head_t


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_seed_varies_every_initialisation(method, options, tiny_bert_dir):
    m1, h1 = initial(tiny_bert_dir, method, options, 1)
    m1b, h1b = initial(tiny_bert_dir, method, options, 1)
    m2, h2 = initial(tiny_bert_dir, method, options, 2)
    assert same(m1, m1b) and same(h1, h1b), "one seed twice must give identical initial tensors"
    assert m1 and h1
    assert not same(m1, m2), "the run's seed must reach the method's initialisation"
    assert not same(h1, h2), "the run's seed must reach the head's initialisation"


def test_an_explicit_method_seed_is_kept(tiny_bert_dir):
    """A user's ``seed`` option fixes the method's init across run seeds (the head still follows the run)."""
    assert seeded_options("prefix", {"seed": 7}, 3)["seed"] == 7
    assert seeded_options("prefix", {}, 3)["seed"] == 3
    m1, h1 = initial(tiny_bert_dir, "lpt", {"num_virtual_tokens": 3, "seed": 7}, 1)
    m2, h2 = initial(tiny_bert_dir, "lpt", {"num_virtual_tokens": 3, "seed": 7}, 2)
    assert same(m1, m2) and not same(h1, h2)


def test_seed_is_recorded_in_adapter_and_run_file(tiny_bert_dir, sentiment_csv, tmp_path):
    import json

    from softprompt.train import train

    out = tmp_path / "run"
    train(TrainConfig(method="lpt", model=tiny_bert_dir, output=str(out), file=sentiment_csv, text_column="sentence",
                      label_column="sentiment", max_steps=2, batch_size=8, max_length=16, seed=5,
                      method_options={"num_virtual_tokens": 2}))
    adapter = json.loads((out / "adapter_config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert adapter["config"]["seed"] == 5 and adapter["seed"] == 5 and adapter["readout"] == "pooler"
    assert metrics["seed"] == 5 and metrics["method_seed"] == 5
