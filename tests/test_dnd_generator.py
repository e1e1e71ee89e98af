"""DnD part B: weight tokeniser, condition encoder, hyper-conv generator, export (tiny random Llama, tiny BERT)."""

import itertools
import json
import math
from argparse import Namespace

import pytest
import torch
from conftest import tiny

from softprompt.dnd.cli import generate_main, train_main
from softprompt.dnd.export import (
    read_lora_tensors,
    read_zoo,
    sanity_report,
    write_adapter,
)
from softprompt.dnd.generator import (
    HyperConvDecoder,
    chain_parameters,
    generate,
    plan_chain,
    train_generator,
)
from softprompt.dnd.tokenizer import (
    TokenLayout,
    assert_shared_init,
    canonicalize_svd,
    detokenize,
    from_grid,
    to_grid,
    tokenize,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
POS = "good great fine"
NEG = "bad awful poor"


def _peft_model(seed: int = 42):
    from peft import LoraConfig, get_peft_model

    base = tiny("llama")
    torch.manual_seed(seed)  # shared initialisation for the whole zoo
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.0))


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """2 datasets × 3 checkpoints from one initialisation, saved as PEFT folders + manifest.json."""
    root = tmp_path_factory.mktemp("zoo")
    model = _peft_model()
    init = {n: p.detach().clone() for n, p in _lora_params(model).items()}
    g = torch.Generator().manual_seed(0)
    direction = {d: {n: torch.randn(p.shape, generator=g) for n, p in init.items()} for d in ("pos", "neg")}
    entries = []
    for d in ("pos", "neg"):
        for step in (1, 2, 3):
            with torch.no_grad():
                for n, p in _lora_params(model).items():
                    p.copy_(init[n] + 0.05 * step * direction[d][n] + 0.005 * torch.randn(p.shape, generator=g))
            path = root / f"{d}-{step}"
            model.save_pretrained(path)
            entries.append({"dataset": d, "step": step, "path": f"{d}-{step}", "score": 0.0})
    (root / "manifest.json").write_text(json.dumps(entries))
    prompts = {"pos": [f"the movie was very {w}" for w in POS.split()] + [f"a {w} film" for w in POS.split()],
               "neg": [f"the film was {w}" for w in NEG.split()] + [f"not a {w} movie" for w in NEG.split()]}
    for d, ps in prompts.items():
        (root / f"{d}.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ps))
    return root


KW = {"n_prompts": 4, "max_length": 8, "batch_size": 4, "width": 8, "n_layers": 2, "kernel": 3, "chunk": 16,
      "lr": 1e-2, "warmup": 2, "log_every": 0, "verbose": False}


@pytest.fixture(scope="module")
def trained(zoo, tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    res = train_generator(zoo, None, out, steps=30, prompts=zoo, encoder=tiny_bert_dir, **KW)
    return out, res


def test_tokenizer_round_trip_exact(zoo):
    state = read_lora_tensors(zoo / "pos-2")
    state[next(iter(state))][0, :3] = 0.0  # exact zeros inside a chunk with nonzero mean
    for chunk in (16, 12, 7):  # 12 and 7 leave NaN-padded last chunks
        layout = TokenLayout.from_state_dict(state, chunk)
        tok = tokenize(state, layout)
        back = detokenize(tok, layout)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)
        z = tok.z[~torch.isnan(tok.z)]
        assert z.abs().max() < 1e3
    bf = {k: v.to(torch.bfloat16) for k, v in state.items()}
    layout = TokenLayout.from_state_dict(bf, 16)
    back = detokenize(tokenize(bf, layout), layout)
    assert all(torch.equal(back[k], bf[k]) and back[k].dtype == torch.bfloat16 for k in bf)
    # shapes: 3 layers × (q 2+2, k 2+1, v 2+1, o 2+2, up 2+4, gate 2+4, down 4+2) tokens of 2×16
    layout = TokenLayout.from_state_dict(state, 16)
    assert layout.grid_shape == (96, 4, 18) and layout.n_params == sum(v.numel() for v in state.values())
    assert list(layout.modules[0].prefix.split(".")[-2:]) == ["self_attn", "q_proj"]
    # the grid encoding keeps the stats closely enough to decode, with either stats code
    tok = tokenize(state, layout)
    for code in ("relative", "dnd"):
        layout = TokenLayout.from_json(TokenLayout.from_state_dict(state, 16, code).to_json())
        assert layout.stats_code == code
        again = detokenize(from_grid(to_grid(tok, code), layout), layout)
        assert all(torch.allclose(again[k], state[k], atol=1e-5) for k in state)
    with pytest.raises(ValueError, match="stats_code"):
        TokenLayout.from_state_dict(state, 16, "log")


def test_relative_stats_code_keeps_small_scales_relative():
    """The same small error of a generator in the std code costs a relative error of about that size with the
    relative code at every scale; with DnD's code it grows to ~10x at the scales of lora_B tokens (std ~ 1e-4)."""
    from softprompt.dnd.tokenizer import decode_stats, encode_stats

    std = torch.tensor([1e-4, 1e-3, 1e-2, 1e-1], dtype=torch.float64)
    mean = torch.zeros_like(std)
    for code, worst in (("relative", 0.011), ("dnd", None)):
        mc, sc = encode_stats(mean, std, code)
        _, back = decode_stats(mc, sc + 0.01, code)
        rel = (back - std).abs() / std
        if worst is not None:
            assert rel.max() < worst
        else:
            assert rel[0] > 5 and rel[-1] < 0.1
    # the old layout JSON (no stats_code) is read as DnD's code, the one its generators were trained with
    d = TokenLayout(chunk=4, rank=2).to_json()
    del d["stats_code"]
    assert TokenLayout.from_json(d).stats_code == "dnd"


def test_gauge_svd_and_shared_init(zoo):
    state = read_lora_tensors(zoo / "neg-3")
    a, b = state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], \
        state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    a2, b2 = canonicalize_svd(a, b)
    assert torch.allclose(b2 @ a2, b @ a, atol=1e-6)
    m = torch.tensor([[2.0, 0.5], [-0.3, 1.0]])  # change of gauge: same B·A, different factors
    a3, b3 = canonicalize_svd(torch.linalg.inv(m) @ a, b @ m)
    assert torch.allclose(a3, a2, atol=1e-5) and torch.allclose(b3, b2, atol=1e-5)
    from softprompt.dnd.generator import load_zoo_tensors

    _, grids, ds = load_zoo_tensors(read_zoo(zoo), 16, target="svd")  # the gauge-free regression target
    assert grids.shape == (6, 96, 4, 18) and ds == ["pos"] * 3 + ["neg"] * 3
    inits = [_lora_params(_peft_model()) for _ in range(2)]
    assert_shared_init([{k: v.detach() for k, v in s.items()} for s in inits])
    with pytest.raises(ValueError):
        assert_shared_init([{k: v.detach() for k, v in inits[0].items()},
                            {k: v.detach() for k, v in _lora_params(_peft_model(seed=1)).items()}])


def test_the_ignored_condition_optimum_is_the_decoded_mean_grid(zoo):
    """What a generator that ignores its condition outputs: the elementwise mean of the training grids (the minimiser
    of its MSE), decoded as a generated grid; checked against the stacked grids the generator trains on and against
    the checkpoint itself for a one-checkpoint zoo; the thread count does not change it."""
    from softprompt.dnd.hyperconv import grid_mean_state, load_zoo_tensors
    from softprompt.dnd.tokenizer import detokenize, from_grid

    entries = read_zoo(zoo)
    for code in ("relative", "dnd"):
        layout, grids, _ = load_zoo_tensors(entries, 16, stats_code=code)
        mean = grid_mean_state(entries, layout, workers=3)
        stacked = detokenize(from_grid(grids.double().mean(0), layout), layout, dtype=torch.float32)
        assert mean.keys() == stacked.keys() and all(torch.equal(mean[k], stacked[k]) for k in mean)
        one = grid_mean_state(entries, layout, workers=1)
        assert all(torch.equal(mean[k], one[k]) for k in mean)
        # not the mean of A and B: the statistics code averages scales in its own (log) space
        ab = {k: sum(read_lora_tensors(e["path"])[k] for e in entries) / len(entries) for k in mean}
        assert not all(torch.allclose(mean[k], ab[k], rtol=1e-3, atol=1e-6) for k in mean)
    ckpt = read_lora_tensors(entries[0]["path"])
    layout, _, _ = load_zoo_tensors(entries[:1], 16)
    alone = grid_mean_state(entries[:1], layout)
    assert all(torch.allclose(alone[k], ckpt[k], rtol=1e-5, atol=1e-7) for k in ckpt)
    with pytest.raises(ValueError, match="empty zoo"):
        grid_mean_state([], layout)


def test_chain_shapes_and_parameter_count():
    in_shape, out_shape, k = (4, 8, 32), (96, 4, 18), 3
    chain = plan_chain(in_shape, out_shape, width=8, n_layers=3)
    assert chain[0] == in_shape and chain[-1] == out_shape and len(chain) == 4
    model = HyperConvDecoder(chain, kernel=k)
    y = model(torch.randn(2, *in_shape))
    assert y.shape == (2, *out_shape)

    def hand(i, o):  # LN(H,W) + 2 width convs + 2 height convs + branch bias + channel conv
        (n, h, w), (n2, h2, w2) = i, o
        return 2 * h * w + 2 * (w * w2 * k * k + w2) + 2 * (h * h2 * k * k + h2) + h2 * w2 + n * n2 * k * k + n2

    expect = sum(hand(a, b) for a, b in itertools.pairwise(chain))
    assert model.count_parameters() == expect == chain_parameters(chain, k)
    # the spec's common-sense chain: its last layer alone is ≈0.71B (9×9 conv 2048 -> 4296)
    assert 0.70e9 < chain_parameters([(2048, 10, 200), (4296, 10, 130)], 9) < 0.72e9


def test_condition_sampler(tiny_bert_dir):
    from softprompt.dnd.condition import ConditionEncoder, PromptSampler

    enc = ConditionEncoder(tiny_bert_dir, max_length=8)
    h, m = enc.encode(["the movie was good", "bad"])
    assert h.shape == (2, 8, 32) and m.shape == (2, 8) and m[1].sum() == 3 and (h[1, 3:] == 0).all()
    s = PromptSampler({"d": [str(i) for i in range(20)]}, 5, seed=0)
    a, b = s.sample("d"), s.sample("d")
    assert len(set(a)) == 5 and a != b
    assert PromptSampler({"d": [str(i) for i in range(20)]}, 5, seed=0).sample("d") == a


def test_training_reduces_loss(trained):
    out, res = trained
    losses = res["losses"]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3
    cfg = json.loads((out / "generator_config.json").read_text())
    assert cfg["chain"][0] == [4, 8, 32] and cfg["chain"][-1] == [96, 4, 18]
    assert cfg["parameters"] == chain_parameters([tuple(s) for s in cfg["chain"]], 3)


def test_generated_adapter_loads_and_changes_output(trained, zoo, tmp_path):
    from peft import PeftModel

    gen_dir, _ = trained
    prompts = [f"the film was very {w}" for w in POS.split()]
    state, seconds = generate(gen_dir, prompts)
    assert seconds > 0
    ref = read_lora_tensors(zoo / "pos-1")
    assert state.keys() == ref.keys() and all(state[k].shape == ref[k].shape for k in ref)
    out = write_adapter(state, zoo / "pos-1", tmp_path / "adapter")
    base = tiny("llama").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        y0 = base(ids).logits.clone()
        model = PeftModel.from_pretrained(base, out).eval()
        y1 = model(ids).logits
    loaded = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    assert loaded and not torch.allclose(y0, y1)
    rep = sanity_report(state, zoo, seconds=seconds)
    assert {"modules", "n_out_of_range", "nearest", "total_norm", "zoo_total_norm_range", "finite"} <= rep.keys()
    assert rep["n_modules"] == 21 and rep["finite"]
    assert rep["nearest"]["dataset"] in ("pos", "neg") and rep["nearest"]["distance"] >= 0
    m = next(iter(rep["modules"].values()))
    assert {"norm", "zoo_min", "zoo_max", "in_range"} <= m.keys() and m["zoo_min"] <= m["zoo_max"]
    # a zoo checkpoint is its own nearest neighbour at distance 0
    own = sanity_report(read_lora_tensors(zoo / "neg-2"), read_zoo(zoo))
    assert own["nearest"]["path"].endswith("neg-2") and own["nearest"]["distance"] < 1e-6
    assert own["n_out_of_range"] == 0


def test_main_entry_points(zoo, tiny_bert_dir, tmp_path, capsys):
    kw = {k: v for k, v in KW.items() if k not in ("verbose",)}
    train_main(Namespace(zoo=str(zoo), holdout="neg", out=str(tmp_path / "g"), steps=3, prompts=str(zoo),
                         encoder=tiny_bert_dir, **kw))
    cfg = json.loads((tmp_path / "g" / "generator_config.json").read_text())
    assert cfg["train_datasets"] == ["pos"] and cfg["holdout"] == ["neg"]
    rep = generate_main(Namespace(generator=str(tmp_path / "g"), prompts=str(zoo / "neg.jsonl"),
                                  out=str(tmp_path / "a")))
    assert (tmp_path / "a" / "adapter_config.json").exists() and (tmp_path / "a" / "adapter_model.safetensors").exists()
    assert rep["nearest"]["dataset"] == "pos"
    text = capsys.readouterr().out
    assert "parameters" in text and "nearest zoo checkpoint" in text and " s" in text
