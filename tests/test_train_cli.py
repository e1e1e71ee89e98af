"""Training, evaluation and prediction end to end on a tiny model saved to disk (fast), through the CLI."""

import csv
import json

import pytest

import softprompt as sp
from softprompt.cli import main


@pytest.mark.parametrize("method,extra", [("prefix", []), ("prompt", ["--option", "position=after_cls"]), ("lpt", [])])
def test_train_eval_predict_on_user_csv(method, extra, tiny_bert_dir, sentiment_csv, tmp_path, capsys):
    out = tmp_path / "adapter"
    rc = main(["train", "--method", method, "--model", tiny_bert_dir, "--file", sentiment_csv, "--text-column",
               "sentence", "--label-column", "sentiment", "--output", str(out), "--epochs", "15", "--batch-size", "16",
               "--lr", "0.05", "--num-virtual-tokens", "4", "--max-length", "16", "--seed", "0", *extra])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("eval_accuracy", "trainable_params", "train_seconds", "method", "task", "model"):
        assert key in metrics
    assert metrics["method"] == method
    # The task is learnable from one word; a tiny random encoder passes only a weak signal, so this asks for
    # "clearly above chance" (0.5 on 160 balanced rows), not for quality (quality is measured on real models).
    assert metrics["eval_accuracy"] >= 0.65, metrics
    assert (out / "adapter_model.safetensors").exists() and (out / "README.md").exists()
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--file", sentiment_csv, "--text-column", "sentence",
                 "--label-column", "sentiment"]) == 0
    reloaded = json.loads(capsys.readouterr().out)
    assert reloaded["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-9)
    assert main(["predict", "--adapter", str(out), "--text", "the film was very awful"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["label"] == "neg"


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["eval", "--adapter", str(tmp_path), "--task", "glue/sst2"]) == 1  # runtime error (usage: 2)
    assert "adapter_config.json is missing" in capsys.readouterr().err
    with pytest.raises(sp.ConfigError, match="unknown method 'nope'"):
        sp.config_from_dict("nope", {})
    with pytest.raises(sp.ConfigError, match="unknown option"):
        sp.config_from_dict("prefix", {"num_virtual_tokenz": 3})


def test_apt_gates_prune_and_retrain_with_layer_lengths(tiny_bert_dir, sentiment_csv, tmp_path, capsys):
    """The PT-2* loop on the CLI: train APT, probe gates (JSON + PNG), prune to a budget, retrain prefix with it."""
    apt = tmp_path / "apt"
    common = ["--model", tiny_bert_dir, "--file", sentiment_csv, "--text-column", "sentence", "--label-column",
              "sentiment", "--max-steps", "10", "--batch-size", "16", "--num-virtual-tokens", "4", "--max-length", "16"]
    assert main(["train", "--method", "apt", "--output", str(apt), *common]) == 0
    assert main(["gates", "--adapter", str(apt), "--file", sentiment_csv, "--text-column", "sentence",
                 "--limit", "40", "--out", str(tmp_path / "g.json"), "--plot", str(tmp_path / "g.png")]) == 0
    gates = json.loads((tmp_path / "g.json").read_text())
    assert gates and (tmp_path / "g.png").stat().st_size > 5000
    assert main(["prune", "--adapter", str(apt), "--file", sentiment_csv, "--text-column", "sentence",
                 "--limit", "40", "--budget", "7", "--out", str(tmp_path / "len.json")]) == 0
    lengths = json.loads((tmp_path / "len.json").read_text())["layer_lengths"]
    assert sum(lengths) == 7 and len(lengths) == 3
    out = tmp_path / "pt2s"
    assert main(["train", "--method", "prefix", "--layer-lengths", str(tmp_path / "len.json"), "--output", str(out),
                 *common]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["config"]["layer_lengths"] == lengths


def test_idspam_train_and_explain(tiny_bert_dir, sentiment_csv, tmp_path, capsys):
    out = tmp_path / "idspam"
    assert main(["train", "--method", "idspam", "--model", tiny_bert_dir, "--file", sentiment_csv, "--text-column",
                 "sentence", "--label-column", "sentiment", "--max-steps", "5", "--batch-size", "16",
                 "--num-virtual-tokens", "3", "--layer", "1", "--max-length", "16", "--output", str(out)]) == 0
    capsys.readouterr()
    html = tmp_path / "tokens.html"
    assert main(["explain", "--adapter", str(out), "--text", "the film was very good", "--out", str(html)]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line[:1] == " " or line[:1].isdigit()]
    weights = [float(parts[0]) for parts in lines if parts]
    assert len(weights) >= 5 and abs(sum(weights) - 1.0) < 1e-3
    assert "<html" in html.read_text().lower()


def test_zero_shot_eval_on_a_users_csv_equals_the_registry_eval(tiny_bert_dir, tmp_path, capsys):
    """An SST-2 adapter pointed at a user's CSV (written here from SST-2 dev) scores it without training, and the
    score equals the registry evaluation of the same rows."""
    from softprompt import tasks

    out = tmp_path / "sst2"
    assert main(["train", "--method", "prefix", "--model", tiny_bert_dir, "--task", "glue/sst2", "--train-limit", "64",
                 "--max-steps", "2", "--batch-size", "16", "--num-virtual-tokens", "4", "--max-length", "32",
                 "--output", str(out)]) == 0
    rows = tasks.load_split("glue/sst2", "dev")
    csv_path = tmp_path / "reviews.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        for r in rows:
            w.writerow([r["text"], r["label"]])
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--file", str(csv_path), "--text-column", "sentence",
                 "--label-column", "label"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["eval", "--adapter", str(out), "--task", "glue/sst2"]) == 0
    from_registry = json.loads(capsys.readouterr().out)
    assert from_file["eval_accuracy"] == pytest.approx(from_registry["eval_accuracy"], abs=1e-12)


def test_fewglue_protocol_trains_on_train32_and_evaluates_on_val(tiny_bert_dir, tmp_path, capsys):
    """--train-split/--eval-split pick registry splits (the FewGLUE protocol: 32 examples, SuperGLUE dev as test)."""
    from softprompt import tasks

    out = tmp_path / "cb32"
    assert main(["train", "--method", "apt", "--model", tiny_bert_dir, "--task", "superglue/cb", "--train-split",
                 "train32", "--eval-split", "val", "--max-steps", "2", "--batch-size", "16",
                 "--num-virtual-tokens", "3", "--max-length", "32", "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_examples"] == len(tasks.load_split("superglue/cb", "train32")) == 32
    assert metrics["eval_examples"] == len(tasks.load_split("superglue/cb", "val"))
    assert (metrics["train_split"], metrics["eval_split"]) == ("train32", "val")
    capsys.readouterr()
    rc = main(["train", "--method", "prefix", "--model", tiny_bert_dir, "--task", "superglue/cb", "--train-split",
               "nope", "--max-steps", "1", "--output", str(tmp_path / "bad")])
    assert rc != 0
    assert "has no split 'nope'; available splits: train, val" in capsys.readouterr().err


def test_adapter_moved_to_another_machine_needs_and_takes_base_model(tiny_bert_dir, sentiment_csv, tmp_path, capsys):
    """The base recorded in an adapter is a path of the training machine; where it is missing the CLI says so and
    names --base-model, and --base-model gives the same scores as the original base."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_bert_dir, base)
    out = tmp_path / "adapter"
    common = ["--text-column", "sentence", "--label-column", "sentiment"]
    assert main(["train", "--method", "prefix", "--model", str(base), "--file", sentiment_csv, *common,
                 "--output", str(out), "--max-steps", "3", "--num-virtual-tokens", "2", "--max-length", "16"]) == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--file", sentiment_csv, *common]) == 0
    before = json.loads(capsys.readouterr().out)
    moved = tmp_path / "elsewhere"
    base.rename(moved)
    assert main(["eval", "--adapter", str(out), "--file", sentiment_csv, *common]) != 0
    err = capsys.readouterr().err
    assert str(base) in err and "--base-model" in err
    assert main(["eval", "--adapter", str(out), "--file", sentiment_csv, *common, "--base-model", str(moved)]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after == before
    assert main(["predict", "--adapter", str(out), "--text", "a good film", "--base-model", str(moved)]) == 0


def test_compiled_training_saves_an_adapter_that_matches_its_own_evaluation(tiny_bert_dir, sentiment_csv, tmp_path,
                                                                             capsys):
    """`train --compile`: the Trainer runs the wrapped model through torch.compile; the saved adapter (plain
    tensors, no compiled wrapper in its names) reloads eagerly and scores what training reported."""
    out = tmp_path / "compiled"
    common = ["--file", sentiment_csv, "--text-column", "sentence", "--label-column", "sentiment"]
    assert main(["train", "--method", "apt", "--model", tiny_bert_dir, *common, "--output", str(out),
                 "--max-steps", "3", "--batch-size", "16", "--num-virtual-tokens", "4", "--max-length", "16",
                 "--compile"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), *common]) == 0
    reloaded = json.loads(capsys.readouterr().out)
    assert reloaded["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-9)


def test_demo_runs_end_to_end_with_stubbed_training(monkeypatch, tmp_path, capsys):
    """`make demo`'s code path (imports included) without the minutes of real training: train/evaluate/predict
    are replaced by stubs that return what the real ones return."""
    import softprompt.train as tr
    from softprompt.demo import run_demo

    seen = {}
    monkeypatch.setattr(tr, "train", lambda cfg: seen.update(cfg=cfg) or {
        "trainable_params": 10, "train_seconds": 1.0, "eval_accuracy": 0.75, "eval_examples": 4})
    monkeypatch.setattr(tr, "evaluate", lambda out, **kw: {"eval_accuracy": 0.75})
    monkeypatch.setattr(tr, "predict", lambda out, texts: [{"text": t, "label": "positive"} for t in texts])
    assert run_demo(output=str(tmp_path / "demo"), steps=3) == 0
    assert seen["cfg"].overwrite and seen["cfg"].max_steps == 3
    assert "identical" in capsys.readouterr().out


@pytest.fixture
def tiny_sst2(tmp_path):
    """glue/SST-2 train (120 rows) and dev (40 rows), every text naming its split and row."""
    root = tmp_path / "data" / "glue" / "SST-2"
    root.mkdir(parents=True)
    for split, n in (("train", 120), ("dev", 40)):
        rows = [f"{split} row {i}\t{i % 2}" for i in range(n)]
        (root / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return str(tmp_path / "data")


def _texts(cfg, role):
    from softprompt.train.runner import task_records

    return [r["text"] for r in task_records(cfg, role)[0]]


def test_carved_dev_is_one_fixed_held_out_part_of_train(tiny_sst2):
    """--carve-dev F: the eval rows are round(F * n) rows of the *train* split (never the dev split), disjoint from
    the rows trained on and together all of train; the same carve for every seed and method. Limits subsample inside
    each part, so they never move a held-out row into training."""
    from softprompt.train import TrainConfig

    def cfg(**kw):
        return TrainConfig(**{"method": "prefix", "model": "x", "output": "y", "task": "glue/sst2",
                              "data_dir": tiny_sst2, "carve_dev": 0.1, **kw})

    train, held = _texts(cfg(), "train"), _texts(cfg(), "eval")
    assert len(held) == 12 and len(train) == 108
    assert not set(train) & set(held) and sorted(train + held) == sorted(f"train row {i}" for i in range(120))
    for seed, method in ((1, "prefix"), (2, "lpt"), (3, "prompt")):
        assert _texts(cfg(seed=seed, method=method), "train") == train
        assert _texts(cfg(seed=seed, method=method), "eval") == held
    limited = cfg(train_limit=20, eval_limit=5)
    assert len(_texts(limited, "train")) == 20 and set(_texts(limited, "train")) <= set(train)
    assert len(_texts(limited, "eval")) == 5 and set(_texts(limited, "eval")) <= set(held)


def test_train_limit_is_a_seeded_subsample_not_the_first_rows(tiny_sst2):
    """Files are often sorted by label or source: --train-limit N takes N rows drawn with the run's seed."""
    from softprompt.train import TrainConfig

    cfg = TrainConfig(method="prefix", model="x", output="y", task="glue/sst2", data_dir=tiny_sst2, train_limit=10,
                      seed=0)
    rows = _texts(cfg, "train")
    assert len(rows) == 10 and len(set(rows)) == 10 and rows == _texts(cfg, "train")
    assert rows != [f"train row {i}" for i in range(10)] and set(rows) <= {f"train row {i}" for i in range(120)}
    cfg.seed = 1
    assert _texts(cfg, "train") != rows


def test_eval_file_labels_are_read_against_the_training_labels(tmp_path):
    """--eval-file's labels get the training file's ids, even where the eval file holds only some of the classes."""
    from softprompt.train import TrainConfig
    from softprompt.train.runner import task_records

    train, held = tmp_path / "train.csv", tmp_path / "eval.csv"
    train.write_text("text,label\na,pos\nb,neg\nc,pos\n")
    held.write_text("text,label\nd,pos\ne,pos\n")
    cfg = TrainConfig(method="prefix", model="x", output="y", file=str(train), eval_file=str(held))
    recs, spec = task_records(cfg, "eval")
    assert spec.label_names == ["neg", "pos"] and [(r["text"], r["label"]) for r in recs] == [("d", 1), ("e", 1)]


def test_token_batches_of_different_widths_are_scored_without_their_padding():
    """run_batches pads token logits and labels to a common width; the label padding is -100, so the padded columns
    are no tokens (a 0 would be scored as tag 0 and raise token accuracy with right guesses on padding)."""
    import types

    import torch

    from softprompt import tasks
    from softprompt.data import Collator
    from softprompt.train.evaluate import predictions_to_metrics, run_batches

    class Model(torch.nn.Module):  # predicts tag 0 ("O") everywhere
        device = torch.device("cpu")

        def forward(self, input_ids, attention_mask, **_):
            return types.SimpleNamespace(logits=torch.nn.functional.one_hot(
                torch.zeros_like(input_ids), 9).float())

    feats = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4, "labels": [0, 1, 0, 0]},
             {"input_ids": [5, 6], "attention_mask": [1] * 2, "labels": [1, 2]}]
    collate = Collator(types.SimpleNamespace(pad_token_id=0), "token_classification")
    logits, labels = run_batches(Model(), feats, collate, 1)  # one example per batch: widths 4 and 2
    assert logits.shape == (2, 4, 9) and labels.tolist() == [[0, 1, 0, 0], [1, 2, -100, -100]]
    spec = tasks.get_task("conll2003")
    assert predictions_to_metrics(spec, logits, labels)["accuracy"] == pytest.approx(3 / 6)


def test_a_word_split_into_pieces_is_labelled_once():
    """Token classification: the first piece of each word carries its tag; later pieces and special tokens are -100
    (else a word of 3 pieces would count 3 times in the loss)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from softprompt import tasks
    from softprompt.data import featurize

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "film", "##s", "par", "##i"])}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")
    (f,) = featurize([{"tokens": ["good", "films", "paris"], "tags": [0, 3, 5]}], tasks.get_task("conll2003"), tok, 16)
    assert tok.convert_ids_to_tokens(f["input_ids"]) == ["[CLS]", "good", "film", "##s", "par", "##i", "##s", "[SEP]"]
    assert f["labels"] == [-100, 0, 3, -100, 5, -100, -100, -100]
    assert f["word_ids"] == [-1, 0, 1, 1, 2, 2, 2, -1]
