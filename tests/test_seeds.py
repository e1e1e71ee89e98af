"""One seed sets every random initialisation of a training run (issue 23): head, method parameters, generators,
prompt-init sampling. Two seeds give different initial trainable tensors; one seed twice gives identical ones. Also
what each initialisation puts in the tables (embedding rows, the frozen model's keys/values, P-tuning's encoder)."""

import pytest
import torch
from conftest import tiny

import softprompt as sp
from softprompt.loading import HeadSpec, load_base, load_tokenizer
from softprompt.methods.base import MethodInputs
from softprompt.train.runner import TrainConfig, build_model, seeded_options

SPEC = HeadSpec("classification", ["neg", "pos"])
CASES = [
    ("prompt", {"num_virtual_tokens": 4}),
    ("prompt", {"num_virtual_tokens": 4, "init": "random"}),
    ("ptuning", {"num_virtual_tokens": 4}),
    ("ptuning", {"num_virtual_tokens": 4, "encoder": "lstm", "encoder_hidden_size": 8, "encoder_num_layers": 1}),
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
    # Every drawn tensor, not just one of them (APT's gates draw apart from its tables): all but those initialised
    # to one constant by design (biases at 0, APT's lambda at lambda_init) differ between the two seeds.
    drawn = [k for k, v in m1.items() if v.unique().numel() > 1]
    assert drawn and [k for k in drawn if torch.equal(m1[k], m2[k])] == []


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_an_explicit_method_seed_fixes_every_method_tensor(method, options, tiny_bert_dir):
    """With the method's ``seed`` option set, every method tensor (P-tuning's encoder included) is the same under two
    run seeds, and differs from another method seed's."""
    m1, h1 = initial(tiny_bert_dir, method, {**options, "seed": 7}, 1)
    m2, h2 = initial(tiny_bert_dir, method, {**options, "seed": 7}, 2)
    m3, _ = initial(tiny_bert_dir, method, {**options, "seed": 8}, 1)
    assert same(m1, m2) and not same(h1, h2)
    assert not same(m1, m3)


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


# ---- what each initialisation puts in the tables ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_prompt_init_copies_embedding_rows(method, tiny_bert_dir):
    """init="vocab": every prompt row is exactly the embedding of some vocabulary token (rows differ); init="text":
    the embeddings of the text's tokens, repeated to the prompt length."""
    tok = load_tokenizer(tiny_bert_dir)
    cls = sp.PromptTuningConfig if method == "prompt" else sp.PTuningConfig
    base = load_base(tiny_bert_dir, SPEC)[0]
    table = base.get_input_embeddings().weight.detach()
    vocab = sp.wrap(base, cls(num_virtual_tokens=5, init="vocab"))
    rows = vocab.method.prompt if method == "prompt" else vocab.method.embedding
    rows = rows.detach()
    assert all((table == r).all(-1).any() for r in rows)
    assert len({tuple(r.tolist()) for r in rows}) > 1
    text = sp.wrap(load_base(tiny_bert_dir, SPEC)[0], cls(num_virtual_tokens=5, init="text", init_text="good movie"),
                   tokenizer=tok)
    ids = tok("good movie", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    got = text.method.prompt if method == "prompt" else text.method.embedding
    assert torch.equal(got.detach(), table[[ids[0], ids[1], ids[0], ids[1], ids[0]]])


def test_prefix_text_init_holds_the_frozen_model_keys_and_values(tiny_bert_dir):
    """PrefixConfig(init="text"): layer i's key table is the frozen model's keys of the text's tokens at layer i (run
    alone, no special tokens, repeated to P) and its value table their values, recomputed here from the hidden states
    entering each layer and the layer's own key/value projections."""
    tok = load_tokenizer(tiny_bert_dir)
    model = sp.wrap(load_base(tiny_bert_dir, SPEC)[0],
                    sp.PrefixConfig(num_virtual_tokens=3, init="text", init_text="good movie"), tokenizer=tok)
    ids = tok("good movie", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[ids[0], ids[1], ids[0]]])
    bert = model.base_model.bert
    with torch.no_grad():
        hidden = bert(input_ids=ids, output_hidden_states=True).hidden_states
        for i, layer in enumerate(bert.encoder.layer):
            att = layer.attention.self
            k, v = (x.view(1, 3, att.num_attention_heads, -1).transpose(1, 2)[0]
                    for x in (att.key(hidden[i]), att.value(hidden[i])))
            table = model.method.tables[str(i)]
            torch.testing.assert_close(table[0], k, rtol=0, atol=1e-6)
            torch.testing.assert_close(table[1], v, rtol=0, atol=1e-6)
    assert not torch.allclose(model.method.tables["0"], model.method.tables["1"])


def test_ptuning_mlp_encoder_equals_float64_formula():
    """P-tuning's MLP encoder (PEFT's form): prompt = W3 relu(W2 relu(W1 e + b1) + b2) + b3 of the free embeddings e,
    recomputed in float64; the forward hands exactly that prompt to the engine."""
    model = sp.wrap(tiny("bert"), sp.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8, init="random"))
    m = model.method
    sd = {k: v.double() for k, v in m.state_dict().items()}
    lin = lambda x, i: x @ sd[f"mlp.{i}.weight"].T + sd[f"mlp.{i}.bias"]
    ref = lin(torch.relu(lin(torch.relu(lin(sd["embedding"], 0)), 2)), 4)
    with torch.no_grad():
        inputs = MethodInputs(None, torch.ones(1, 3, dtype=torch.long), model.base_model.get_input_embeddings(), 1)
        got = m(inputs).input_prompt
    assert got.shape == (1, 4, model.info.hidden_size)
    assert (got[0].double() - ref).abs().max().item() < 1e-6
    assert (ref < 0).any()  # the last layer has no activation


def test_data_order_follows_the_seed_and_the_epoch(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    """The training order is a function of (run seed, epoch): one seed twice gives one order, another seed or the next
    epoch another; the Trainer's sampler is built from the run's ``--seed``."""
    from softprompt.train import train, trainer

    def order(seed: int, epoch: int = 0) -> list[int]:
        sampler = trainer.EpochShuffleSampler(50, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1) == order(1) and sorted(order(1)) == list(range(50))
    assert order(1) != order(2) and order(1, 0) != order(1, 1)

    seen = []

    class Recording(trainer.EpochShuffleSampler):
        def __init__(self, n, seed, full_batches=0):
            seen.append((n, seed))
            super().__init__(n, seed, full_batches)

    monkeypatch.setattr(trainer, "EpochShuffleSampler", Recording)
    train(TrainConfig(method="prefix", model=tiny_bert_dir, output=str(tmp_path / "run"), file=sentiment_csv,
                      text_column="sentence", label_column="sentiment", max_steps=1, batch_size=8, max_length=16,
                      seed=7, method_options={"num_virtual_tokens": 2}))
    assert seen and {s for _, s in seen} == {7}


def test_random_prompt_inits_are_the_documented_draws_of_the_seed():
    """init='random' of prompt tuning is uniform in [-init_range, init_range] (both signs, the option's own range),
    and LPT's static prompt is N(0, 1) * init_std: exactly the draws of a generator seeded with the method's seed."""
    t, seed = 6, 5
    model = sp.wrap(tiny("bert", "cls"), sp.PromptTuningConfig(num_virtual_tokens=t, init="random", init_range=0.3,
                                                                 seed=seed))
    d = model.info.hidden_size
    want = torch.empty(t, d).uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(seed))
    got = model.method.prompt.detach()
    assert torch.equal(got, want)
    assert got.min() < -0.15 and got.max() > 0.15 and got.abs().max() <= 0.3
    lpt = sp.wrap(tiny("llama"), sp.LatePromptConfig(num_virtual_tokens=3, init_std=0.7, seed=seed))
    d = lpt.info.hidden_size
    want = torch.randn(3, d, generator=torch.Generator().manual_seed(seed)) * 0.7
    assert torch.equal(lpt.method.prompt.detach(), want)
