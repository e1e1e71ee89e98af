"""Prefix bank, R(x), feature cache, probes and their CLI, on a tiny random BERT saved to disk (fast)."""

import csv
import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_bert

import softprompt as sp
from softprompt.cli import main
from softprompt.represent import FeatureSpec, PrefixBank, Representer
from softprompt.represent.encoder import PrefixEncoder, pool_features
from softprompt.represent.probe import ProbeConfig, TaskInfo, fit_probe, score

WORDS = "good great fine bad awful poor movie film the a is was very not plot actor".split()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny bare BERT + word-level tokenizer, saved like a pretrained checkpoint."""
    return save_tiny_bert(tmp_path_factory.mktemp("tinybert"), WORDS)


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return PrefixEncoder(tiny_dir, device="cpu", batch_size=4, progress=False)


def _texts(n: int, seed: int = 0) -> list[tuple[str, str | None]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(2, 9, (1,), generator=g))  # varying lengths -> padding inside every chunk
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g)]
        out.append((" ".join(words), "the film" if i % 3 == 0 else None))
    return out


def _prefix(info, length: int, seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randn(2, info.num_kv_heads, length, info.head_dim, generator=g) for i in range(info.num_layers)}


def _save_adapter(tiny_dir: str, path: Path, seed: int, length: int = 3) -> Path:
    """A saved prefix adapter (random init, seed-dependent), as ``softprompt train --method prefix`` writes."""
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=2)
    model = sp.wrap(base, sp.PrefixConfig(num_virtual_tokens=length, init="random", seed=seed))
    model.save_pretrained(str(path))
    return path


# ---- R(x) ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_concat_in_one_batched_pass_equals_separate_passes(encoder, pool):
    texts = _texts(10)
    prefixes = [_prefix(encoder.info, 3, s) for s in range(4)]
    encoder.stats.forward_calls = 0
    batched = encoder.encode_concat(texts, prefixes, pool)
    calls_batched = encoder.stats.forward_calls
    encoder.stats.forward_calls = 0
    tokenize, tokenized = encoder.tokenize, []
    encoder.tokenize = lambda chunk: tokenized.append(len(chunk)) or tokenize(chunk)
    try:
        separate = encoder.encode_separate(texts, prefixes, pool)
    finally:
        encoder.tokenize = tokenize
    assert tokenized == [4, 4, 2]  # each chunk tokenised once, then run once per prefix (a fair baseline)
    assert batched.shape == (10, 4 * encoder.hidden_size)
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=0)
    chunks = 3  # 10 texts, 4 per chunk
    assert calls_batched == chunks and encoder.stats.forward_calls == 4 * chunks
    # Different prefixes give different blocks (the per-example prefixes really differ per copy).
    h = encoder.hidden_size
    assert (batched[:, :h] - batched[:, h : 2 * h]).abs().max() > 1e-3


def test_concat_groups_prefixes_of_different_lengths(encoder):
    texts = _texts(5, seed=3)
    prefixes = [_prefix(encoder.info, 2, 0), _prefix(encoder.info, 5, 1), _prefix(encoder.info, 2, 2)]
    torch.testing.assert_close(encoder.encode_concat(texts, prefixes), encoder.encode_separate(texts, prefixes),
                               atol=1e-5, rtol=0)


def test_single_block_matches_the_wrapper_model(tiny_dir, encoder):
    """Independent check through the public wrapper: sp.wrap(bare encoder, prefix) with the same tables."""
    from transformers import AutoModel

    texts = [t for t, _ in _texts(6, seed=5)]
    prefix = _prefix(encoder.info, 3, 7)
    model = sp.wrap(AutoModel.from_pretrained(tiny_dir), sp.PrefixConfig(num_virtual_tokens=3, init="random"))
    with torch.no_grad():
        for i, t in model.method.tables.items():
            t.copy_(prefix[int(i)])
    model.eval()
    enc = encoder.tokenize([(t, None) for t in texts])
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    ref = pool_features(hidden, enc["attention_mask"], "mean")
    ours = encoder.encode_concat(texts, [prefix], "mean")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_joint_equals_one_prefix_made_by_concatenating_the_prefixes(tiny_dir, encoder):
    from transformers import AutoModel

    texts = [t for t, _ in _texts(6, seed=9)]
    p1, p2 = _prefix(encoder.info, 2, 11), _prefix(encoder.info, 3, 12)
    model = sp.wrap(AutoModel.from_pretrained(tiny_dir), sp.PrefixConfig(num_virtual_tokens=5, init="random"))
    with torch.no_grad():
        for i, t in model.method.tables.items():
            t.copy_(torch.cat([p1[int(i)], p2[int(i)]], dim=-2))  # manual concatenation along the prefix axis
    model.eval()
    enc = encoder.tokenize([(t, None) for t in texts])
    with torch.no_grad():
        ref = model(**enc).last_hidden_state[:, 0]
    joint = encoder.encode_joint(texts, [p1, p2], "cls")
    assert joint.shape == (6, encoder.hidden_size)
    torch.testing.assert_close(joint, ref, atol=1e-5, rtol=0)
    # ... and differs from either prefix alone.
    assert (joint - encoder.encode_concat(texts, [p1], "cls")).abs().max() > 1e-3


def test_pooling_ignores_padding(encoder):
    short, long = "good movie", "the film was very very awful and not good plot"
    prefix = _prefix(encoder.info, 3, 1)
    for pool in ("cls", "mean"):
        alone = torch.cat([encoder.encode_concat([t], [prefix], pool) for t in (short, long)])
        together = encoder.encode_concat([short, long], [prefix], pool)  # the short text is padded here
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
        plain = torch.cat([encoder.encode_plain([t], pool) for t in (short, long)])
        torch.testing.assert_close(encoder.encode_plain([short, long], pool), plain, atol=1e-5, rtol=0)
    # mean = average over the real tokens only
    enc = encoder.tokenize([(short, None), (long, None)])
    hidden = torch.randn(2, enc["input_ids"].shape[1], 4)
    mean = pool_features(hidden, enc["attention_mask"], "mean")
    n_short = int(enc["attention_mask"][0].sum())
    assert n_short < enc["input_ids"].shape[1]
    torch.testing.assert_close(mean[0], hidden[0, :n_short].mean(0))


# ---- bank + cache ------------------------------------------------------------------------------------------------
def _register(bank: PrefixBank, tiny_dir: str, tmp: Path, task: str, seed: int, length: int = 3):
    path = _save_adapter(tiny_dir, tmp / f"src-{task}-{seed}", seed, length)
    return bank.register(path, task=task, model=tiny_dir, max_length=32, metrics={"steps": 7, "train_seconds": 1.5})


def test_cache_computes_only_new_blocks_and_drops_removed_ones(tiny_dir, encoder, tmp_path):
    bank = PrefixBank(tmp_path / "bank")
    _register(bank, tiny_dir, tmp_path, "t1", 1)
    _register(bank, tiny_dir, tmp_path, "t2", 2)
    texts = _texts(9, seed=21)
    n = len(texts)

    def rep(**kw) -> Representer:
        r = Representer(FeatureSpec("concat", bank=str(bank.path)), batch_size=4, progress=False, **kw)
        r.share_encoder(encoder)
        return r

    r = rep()
    f12 = r.features(texts)
    assert f12.shape == (n, 2 * encoder.hidden_size)
    assert r.stats.rows == 2 * n and r.stats.forward_calls == 3  # both blocks in one batched pass per chunk
    r = rep()
    torch.testing.assert_close(r.features(texts), f12, atol=0, rtol=0)
    assert r.stats.forward_calls == 0  # fully cached: the backbone is never called

    _register(bank, tiny_dir, tmp_path, "t3", 3)
    r = rep()
    f123 = r.features(texts)
    assert r.stats.rows == n and r.stats.blocks == ["prefix:t3"]  # only the new block is computed
    assert [name for name, _ in r.layout] == ["t1", "t2", "t3"]
    fresh = rep(use_cache=False).features(texts)
    torch.testing.assert_close(f123, fresh, atol=1e-5, rtol=0)
    torch.testing.assert_close(f123[:, : 2 * encoder.hidden_size], f12, atol=0, rtol=0)

    # Extending the corpus computes only the new rows, for every block.
    more = texts + _texts(3, seed=99)
    r = rep()
    f_more = r.features(more)
    assert r.stats.rows == 3 * 3
    torch.testing.assert_close(f_more[:n], f123, atol=0, rtol=0)

    # joint: cached per combination of entries.
    j = Representer(FeatureSpec("joint", bank=str(bank.path)), batch_size=4, progress=False)
    j.share_encoder(encoder)
    fj = j.features(texts)
    assert fj.shape == (n, encoder.hidden_size) and j.stats.rows == n

    blocks_before = {m["tasks"][0]: d for d, m in r.cache.blocks() if m["kind"] == "prefix"}
    bank.remove("t2")
    assert not blocks_before["t2"].exists() and blocks_before["t1"].exists()
    assert not any("t2" in m["tasks"] for _, m in r.cache.blocks())  # the joint block that used t2 is gone too
    r = rep()
    f13 = r.features(texts)
    assert r.stats.rows == 0 and [name for name, _ in r.layout] == ["t1", "t3"]  # no recomputation
    h = encoder.hidden_size
    torch.testing.assert_close(f13, torch.cat([f123[:, :h], f123[:, 2 * h :]], 1), atol=0, rtol=0)
    torch.testing.assert_close(f13, rep(use_cache=False).features(texts), atol=1e-5, rtol=0)
    assert not (bank.path / "prefixes" / "t2").exists()


def test_manifest_add_remove_list_and_errors(tiny_dir, tmp_path, capsys):
    bank = PrefixBank(tmp_path / "bank")
    e = _register(bank, tiny_dir, tmp_path, "glue/sst2", 1, length=4)
    assert e.id == "glue__sst2" and e.prefix_length == 4 and e.steps == 7 and e.train_seconds == 1.5
    manifest = json.loads((bank.path / "manifest.json").read_text())
    assert manifest["base_model"] == tiny_dir and manifest["max_length"] == 32
    assert manifest["entries"][0]["sha256"] == e.sha256
    assert (bank.path / e.adapter / "adapter_model.safetensors").exists()
    with pytest.raises(sp.SoftPromptError, match="already in bank"):
        _register(bank, tiny_dir, tmp_path, "glue/sst2", 2)
    with pytest.raises(sp.SoftPromptError, match="base model"):
        bank.check_can_add("other", "minilm")
    assert main(["bank", "list", "--bank", str(bank.path)]) == 0
    assert "glue/sst2" in capsys.readouterr().out
    assert main(["bank", "remove", "--bank", str(bank.path), "--task", "glue/sst2"]) == 0
    assert bank.entries() == []
    assert main(["bank", "remove", "--bank", str(bank.path), "--task", "nope"]) == 1
    assert "not in bank" in capsys.readouterr().err


def _register_in_child(args):
    bank, adapter, task, model = args
    PrefixBank(bank).register(adapter, task=task, model=model, max_length=32)
    return task


def test_parallel_processes_register_different_tasks(tiny_dir, tmp_path):
    bank = tmp_path / "bank"
    jobs = [(str(bank), str(_save_adapter(tiny_dir, tmp_path / f"a{i}", i)), f"task{i}", tiny_dir) for i in range(6)]
    with mp.get_context("fork").Pool(3) as pool:
        done = pool.map(_register_in_child, jobs)
    assert sorted(done) == [f"task{i}" for i in range(6)]
    assert sorted(e.task for e in PrefixBank(bank).entries()) == sorted(done)  # no lost update


# ---- probes -----------------------------------------------------------------------------------------------------
def test_probe_beats_chance_on_a_separable_toy_task():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 2

    def data(n):
        y = torch.randint(0, 3, (n,), generator=g)
        return centers[y] + torch.randn(n, 16, generator=g), y.tolist()

    info = TaskInfo("toy", "classification", ["a", "b", "c"], "accuracy", ["accuracy"])
    (xt, yt), (xd, yd), (xs, ys) = data(300), data(100), data(200)
    for clf in ("logreg", "mlp"):
        probe, hist = fit_probe(info, xt, yt, xd, yd, ProbeConfig(classifier=clf, epochs=60, patience=10))
        acc = score(info, probe, xs, ys)["accuracy"]
        assert acc > 0.9, (clf, acc, hist)
    # regression and multiple choice share the harness
    w = torch.randn(16, generator=g)
    reg = TaskInfo("toyreg", "regression", [], "pearson", ["pearson"])
    probe, _ = fit_probe(reg, xt, (xt @ w).tolist(), xd, (xd @ w).tolist(), ProbeConfig(epochs=60, lr=1e-2))
    assert score(reg, probe, xs, (xs @ w).tolist())["pearson"] > 0.9
    mc = TaskInfo("toymc", "multiple_choice", ["A", "B", "C"], "accuracy", ["accuracy"])
    xc = torch.randn(350, 3, 16, generator=g)
    yc = (xc @ w).argmax(-1)
    probe, _ = fit_probe(mc, xc[:300].reshape(-1, 16), yc[:300].tolist(), xc[300:].reshape(-1, 16),
                         yc[300:].tolist(), ProbeConfig(epochs=60, lr=1e-2), groups_train=[3] * 300,
                         groups_dev=[3] * 50)
    from softprompt.represent.probe import predictions

    assert (predictions(mc, probe, xc[300:]) == yc[300:].numpy()).mean() > 0.8


# ---- CLI round trip -----------------------------------------------------------------------------------------------
def _write_csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        word = ["good", "great", "fine"][i % 3] if pos else ["bad", "awful", "poor"][i % 3]
        noun = ["movie", "film", "plot"][int(torch.randint(0, 3, (1,), generator=g))]
        rows.append({"text": f"the {noun} was very {word}", "label": "pos" if pos else "neg"})
    return rows


def test_cli_round_trip(tiny_dir, tmp_path, capsys):
    train_csv = _write_csv(tmp_path / "sent.csv", _sentiment_rows(96))
    topic = [{"text": f"the {n} was {a}", "label": n} for n in ("movie", "actor") for a in ("good", "bad", "not")]
    topic_csv = _write_csv(tmp_path / "topic.csv", topic * 4)
    bank = str(tmp_path / "bank")
    common = ["--bank", bank, "--model", tiny_dir, "--max-steps", "6", "--batch-size", "16", "--lr", "0.05",
              "--num-virtual-tokens", "3", "--max-length", "16", "--seed", "0"]
    assert main(["bank", "add", "--task", "sentiment", "--file", train_csv, *common]) == 0
    assert main(["bank", "add", "--task", "topic", "--file", topic_csv, *common]) == 0
    assert '"added": "topic"' in capsys.readouterr().out
    entries = PrefixBank(bank).entries()
    assert [e.task for e in entries] == ["sentiment", "topic"]
    assert all(e.steps == 6 and e.train_seconds > 0 and "eval_accuracy" in e.metrics for e in entries)
    assert not list((Path(bank) / "prefixes").glob(".tmp-*"))  # staging folders are cleaned up

    texts = tmp_path / "texts.txt"
    texts.write_text("the film was very good\nthe movie was awful\n\nthe plot was not fine\n")
    out = tmp_path / "feats.safetensors"
    for combine, dim in (("concat", 2 * 32), ("joint", 32), ("frozen", 32)):
        assert main(["represent", "--bank", bank, "--input", str(texts), "--out", str(out), "--combine", combine,
                     "--pool", "mean", "--no-progress"]) == 0
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            assert f.get_tensor("features").shape == (3, dim)
            assert json.loads(f.metadata()["spec"])["kind"] == combine

    probe_dir = tmp_path / "probe"
    assert main(["probe", "--bank", bank, "--file", train_csv, "--output", str(probe_dir), "--epochs", "40",
                 "--no-progress"]) == 0
    metrics = json.loads((probe_dir / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy" and metrics["feature_dim"] == 64 and metrics["main"] >= 0.6
    assert (probe_dir / "probe.safetensors").exists() and (probe_dir / "probe.json").exists()
    capsys.readouterr()
    assert main(["probe-predict", "--probe", str(probe_dir), "--text", "the movie was very great",
                 "--text", "the film was very poor"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2 and all(r["label"] in ("pos", "neg") for r in rows)

    # The probe pins the bank entries it was fitted on.
    assert main(["bank", "remove", "--bank", bank, "--task", "topic"]) == 0
    assert main(["probe-predict", "--probe", str(probe_dir), "--text", "the movie was good"]) == 1
    assert "refit the probe" in capsys.readouterr().err


def test_multitask_baseline_feeds_the_same_probes(tiny_dir, tmp_path):
    from softprompt.represent.api import run_probe
    from softprompt.represent.multitask import MultiTaskConfig, encoder_dir, train_multitask

    a = _write_csv(tmp_path / "a.csv", _sentiment_rows(64))
    b = _write_csv(tmp_path / "b.csv", [{"text": r["text"], "label": float(i % 5)} for i, r in
                                        enumerate(_sentiment_rows(64, 1))])
    out = tmp_path / "mt"
    m = train_multitask(MultiTaskConfig(tasks=[a, b], output=str(out), model=tiny_dir, steps_per_task=3,
                                        batch_size=8, lr=1e-3, max_length=16, progress=False))
    assert m["steps"] == 6 and set(m["eval"]) == {"file:a.csv", "file:b.csv"}
    spec = FeatureSpec("encoder", encoder=encoder_dir(out), max_length=16)
    metrics = run_probe(spec, None, file=a, probe_cfg=ProbeConfig(epochs=30), progress=False)
    assert metrics["feature_dim"] == 32 and metrics["main"] >= 0.5
    assert (Path(encoder_dir(out)) / "feature-cache").is_dir()
