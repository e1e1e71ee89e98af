"""``softprompt train --compile auto`` (the default): CUDA graphs when the planned steps pay for compiling, eager on
CPU, the decision printed in one line; compiled runs pad batches to a few lengths; no host sync per step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers.compile_runs import bucketed_run
from conftest import tiny

import softprompt as sp
from softprompt.cli import main
from softprompt.data import Collator
from softprompt.errors import NonFiniteLossError
from softprompt.train import TrainConfig
from softprompt.train import bucketing as bk
from softprompt.train.runner import compiled_collation

pytestmark = pytest.mark.usefixtures("one_thread")


def test_planned_steps_count_as_the_trainer_does():
    assert bk.planned_steps(1000, 32, 3.0, 50) == 50
    assert bk.planned_steps(1000, 32, 3.0, -1) == 96  # 32 batches per epoch (the last one short)
    assert bk.planned_steps(1000, 32, 0.5, -1) == 16
    assert bk.planned_steps(1000, 32, 1.0, -1, world_size=2) == 16


def test_the_auto_decision():
    needed = bk.steps_to_pay(4)
    assert needed == min(-(-(c.once_s + 4 * c.per_bucket_s) // c.saved_s_per_step) for c in bk.COSTS.values())
    cheapest = min(bk.COSTS, key=lambda m: bk.COSTS[m].steps_to_pay(4))
    assert bk.decide_compile("auto", needed, 4, cuda=True)[0] == cheapest  # the first mode to pay off
    fastest = max(bk.COSTS, key=lambda m: bk.COSTS[m].saved_s_per_step)
    assert bk.decide_compile("auto", 10**7, 4, cuda=True)[0] == fastest  # in a long run the fastest step wins
    # where the two cross: the mode that saves the most seconds at that many steps
    for steps in (needed, 2 * needed, 10 * needed, 100 * needed):
        best = bk.decide_compile("auto", steps, 4, cuda=True)[0]
        assert all(bk.COSTS[best].net_s(steps, 4) >= c.net_s(steps, 4) for c in bk.COSTS.values())
    mode, reason = bk.decide_compile("auto", needed - 1, 4, cuda=True)
    assert mode is None and f"{needed - 1} planned steps < {needed}" in reason and "\n" not in reason
    assert bk.decide_compile("auto", 10**9, 1, cuda=False) == (
        None, "compile auto: eager (no CUDA device; compiled CPU steps do not pay off)")
    assert bk.decide_compile("default", 1, 4, cuda=False) == ("default", "compile default")
    assert bk.decide_compile(None, 10**9, 4, cuda=True) == (None, "eager")


class _Tok:
    pad_token_id, padding_side = 0, "right"


def _feats(n=200):
    return [{"input_ids": [5] * (4 + i % 20), "attention_mask": [1] * (4 + i % 20), "labels": i % 2} for i in range(n)]


def test_compiled_runs_pad_to_buckets_and_eager_runs_do_not(monkeypatch, capsys, mix_order_on):
    model = sp.wrap(tiny("bert", task="cls"), sp.PrefixConfig(num_virtual_tokens=2))
    collator = Collator(_Tok(), "classification")
    cfg = TrainConfig(method="prefix", model="x", output="y", batch_size=8, max_steps=5)
    assert compiled_collation(cfg, model, collator, _feats()) == (None, collator)  # compile None: nothing printed
    cfg.compile = "auto"
    assert compiled_collation(cfg, model, collator, _feats()) == (None, collator)
    assert capsys.readouterr().out == "softprompt train: compile auto: eager (no CUDA device; compiled CPU steps " \
                                      "do not pay off)\n"
    # Inductor's mix-order reduction computes wrong gradients (softprompt/inductor.py): eager runs leave it alone,
    # compiled ones turn it off before their first step.
    assert mix_order_on.triton.mix_order_reduction is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg.max_steps = 10**6
    mode, bucketed = compiled_collation(cfg, model, collator, _feats())
    assert mix_order_on.triton.mix_order_reduction is False
    assert mode == "reduce-overhead" and bucketed.collator is collator and not bucketed.left
    assert bucketed.buckets[-1] == 24 and len(bucketed.buckets) <= cfg.length_buckets
    assert capsys.readouterr().out.startswith("softprompt train: compile auto: reduce-overhead (1000000 planned")
    cfg.length_buckets = 0  # compiled, padded to each batch's longest row
    assert compiled_collation(cfg, model, collator, _feats()) == ("reduce-overhead", collator)
    # A decoder whose method prepends an input prompt pads in front (its head reads the last column).
    cfg.length_buckets, cfg.compile = 4, "default"
    decoder = sp.wrap(tiny("llama", task="cls"), sp.PromptTuningConfig(num_virtual_tokens=2))
    assert compiled_collation(cfg, decoder, collator, _feats())[1].left
    assert not compiled_collation(cfg, sp.wrap(tiny("llama", task="cls"), sp.PrefixConfig(num_virtual_tokens=2)),
                                  collator, _feats())[1].left
    # Multiple choice: the longest choice of an example is its length; the position limit left after the method's
    # own positions caps the buckets (130 - 4 prompt tokens: 126, not 128).
    mc = [{"input_ids": [[5] * 3, [5] * 126], "attention_mask": [[1] * 3, [1] * 126], "labels": 0}]
    assert compiled_collation(cfg, model, collator, mc)[1].buckets == (128,)
    short = sp.wrap(tiny("bert", task="cls", max_position_embeddings=130), sp.PromptTuningConfig(num_virtual_tokens=4))
    assert compiled_collation(cfg, short, collator, mc)[1].buckets == (126,)
    # Prefix numbering shifts the real tokens' positions by the prefix length: that is taken off the cap too.
    shifted = sp.wrap(tiny("bert", task="cls", max_position_embeddings=130),
                      sp.PrefixConfig(num_virtual_tokens=4, shift_positions=True))
    assert shifted.method.insertion_length() == 0 and shifted.method.position_shift() == 4
    assert compiled_collation(cfg, shifted, collator, mc)[1].buckets == (126,)


def test_the_auto_decision_counts_every_bucket(monkeypatch, capsys):
    """Each length bucket records its own graphs: steps that would pay for one bucket do not pay for several."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = sp.wrap(tiny("bert", task="cls"), sp.PrefixConfig(num_virtual_tokens=2))
    collator = Collator(_Tok(), "classification")
    one = bk.steps_to_pay(1)
    cfg = TrainConfig(method="prefix", model="x", output="y", batch_size=1, max_steps=10**6, compile="auto")
    buckets = compiled_collation(cfg, model, collator, _feats())[1].buckets
    assert len(buckets) > 1, buckets
    cfg.max_steps = one
    assert compiled_collation(cfg, model, collator, _feats()) == (None, collator)
    assert f"({one} planned steps < {bk.steps_to_pay(len(buckets))}, the steps that would pay for compiling " \
           f"{len(buckets)} " \
           "length bucket(s))" in capsys.readouterr().out


def test_cli_default_is_auto_and_prints_its_decision(tiny_bert_dir, sentiment_csv, tmp_path, capsys):
    common = ["train", "--method", "prefix", "--model", tiny_bert_dir, "--file", sentiment_csv, "--text-column",
              "sentence", "--label-column", "sentiment", "--max-steps", "2", "--batch-size", "16",
              "--num-virtual-tokens", "2", "--max-length", "16"]
    assert main([*common, "--output", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert out.count("softprompt train: compile auto: eager (no CUDA device") == 1
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["compile"] is None and metrics["length_buckets"] == []
    assert main([*common, "--output", str(tmp_path / "b"), "--compile", "off"]) == 0
    assert "compile auto" not in capsys.readouterr().out


def _spoil_steps(monkeypatch, factor) -> list[int]:
    """Multiply the loss of training step n (1-based) by ``factor(n)``; returns the list that counts the steps."""
    from transformers import Trainer

    real = Trainer.training_step
    calls: list[int] = []

    def step(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        calls.append(1)
        return loss * factor(len(calls))

    monkeypatch.setattr(Trainer, "training_step", step)
    return calls


def test_a_non_finite_loss_stops_training_without_a_per_step_sync(monkeypatch, tiny_bert_dir, sentiment_csv,
                                                                   tmp_path):
    """The loss is checked on the device every step and read at logging and before saving: the run stops at the
    first logging step after the bad one, names the first bad step (not a later one), and saves nothing."""
    from softprompt.train import train

    calls = _spoil_steps(monkeypatch, lambda n: float("nan") if n >= 2 else 1.0)  # every step from the second on
    cfg = TrainConfig(method="prefix", model=tiny_bert_dir, output=str(tmp_path / "nan"), file=sentiment_csv,
                      text_column="sentence", label_column="sentiment", max_steps=6, batch_size=16, logging_steps=3,
                      method_options={"num_virtual_tokens": 2}, max_length=16)
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 2;"):
        train(cfg)
    assert len(calls) == 3  # stopped at the logging step after the bad one
    assert not (tmp_path / "nan" / "adapter_model.safetensors").exists()


def test_train_compiled_benchmark_records_runs_and_resumes(tmp_path, tiny_bert_dir, monkeypatch):
    """benchmarks/train_compiled.py on CPU with a tiny model and a tiny SST-2: the JSON has the documented fields,
    a second invocation skips the finished run, and a run that the time budget cannot hold is not started."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import train_compiled as tc

    root = tmp_path / "data" / "glue" / "SST-2"
    root.mkdir(parents=True)
    for split, n in (("train", 48), ("dev", 16)):
        rows = [f"the film was very {['bad', 'good'][i % 2]}\t{i % 2}" for i in range(n)]
        (root / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    out = tmp_path / "tc.json"
    common = ["--out", str(out), "--minilm", tiny_bert_dir, "--data-dir", str(tmp_path / "data"), "--runs",
              "minilm:sst2:prefix", "--steps", "sst2=2", "--batch-size", "8", "--max-length", "16",
              "--scratch", str(tmp_path / "scratch")]
    argv = [*common, "--modes", "eager"]
    doc = tc.main(argv)
    (run,) = doc["runs"]
    assert run["status"] == "ok", run
    assert {"model", "task", "method", "mode", "steps", "wall_s", "accuracy"} <= set(run)
    assert (run["model"], run["task"], run["mode"], run["steps"], run["steps_done"]) == ("minilm", "sst2", "eager",
                                                                                         2, 2)
    assert 0 <= run["accuracy"] <= 1 and run["wall_s"] > 0 and "$SCRATCH" in run["command"]
    assert {"device", "versions", "date", "command", "summary"} <= set(json.loads(out.read_text()))
    assert tc.main(argv)["runs"] == [run]  # finished: skipped
    if not torch.cuda.is_available():  # CUDA graphs need CUDA: the graphs mode is skipped, nothing recorded
        assert tc.main([*common, "--modes", "graphs"])["runs"] == [run]
    budget = tc.main([*common, "--modes", "compiled", "--time-budget", "1"])
    assert [r["mode"] for r in budget["runs"]] == ["eager"]  # the compiled run would not fit: not started
    eager = {**run, "wall_s": 30.0, "accuracy": 0.9}
    assert run["compile"] is None  # eager: no compile value
    compiled = {**eager, "mode": "compiled", "compile": "reduce-overhead"}
    summary = tc.summarise([eager, {**compiled, "wall_s": 15.0, "accuracy": 0.903}])
    assert summary[0]["compiled_over_eager"] == 0.5 and summary[0]["goal_met"] is True
    assert (summary[0]["mode"], summary[0]["compile"]) == ("compiled", "reduce-overhead")
    both = tc.summarise([eager, {**compiled, "wall_s": 15.0}, {**compiled, "compile": "cudagraphs", "wall_s": 24.0}])
    assert [(x["compile"], x["compiled_over_eager"]) for x in both] == [("reduce-overhead", 0.5), ("cudagraphs", 0.8)]
    assert tc.fields("graphs", tc.build_parser().parse_args(["--out", "x"])) == {"mode": "compiled",
                                                                                 "compile": "cudagraphs"}
    assert summary[0]["accuracy_diff_points"] == 0.3
    assert "saved_s_per_step" not in summary[0]  # runs without a step clock: no calibration
    assert run["steady_step_ms"] is None and run["one_off_s"] is None  # 2 steps: fewer than four clock windows
    clocked = {**eager, "steady_step_ms": 22.5, "one_off_s": 5.0}
    summary = tc.summarise([clocked, {**compiled, "steady_step_ms": 12.5, "one_off_s": 35.0,
                                      "length_buckets": [40, 48, 72]}])
    assert (summary[0]["saved_s_per_step"], summary[0]["one_off_extra_s"], summary[0]["buckets"],
            summary[0]["break_even_steps"]) == (0.01, 30.0, 3, 3000)  # 30 s of compiling over 10 ms saved per step


def test_train_compiled_estimates_a_run_from_its_kind_or_another_task():
    """The budget's estimate: a finished run of the same kind; else the same model and mode on another task, its
    training time scaled to the steps; else the default."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import train_compiled as tc

    sst2 = {"model": "minilm", "task": "sst2", "mode": "eager", "steps": 2000, "wall_s": 60.0, "train_s": 40.0,
            "status": "ok"}
    assert tc.estimate_s([sst2], "minilm", "sst2", "eager", 2000) == 60.0
    assert tc.estimate_s([sst2], "minilm", "mrpc", "eager", 1000) == 40.0  # 20 s fixed + 40 s x 1000 / 2000
    assert tc.estimate_s([sst2], "minilm", "mrpc", "compiled", 1000) == tc.DEFAULT_ESTIMATE_S["compiled"]
    assert tc.estimate_s([{**sst2, "status": "error"}], "minilm", "sst2", "eager", 2000) == \
        tc.DEFAULT_ESTIMATE_S["eager"]
    inductor = {**sst2, "mode": "compiled", "compile": "reduce-overhead", "wall_s": 90.0}  # a compile is a kind
    assert tc.estimate_s([inductor], "minilm", "sst2", "compiled", 2000, "reduce-overhead") == 90.0
    assert tc.estimate_s([inductor], "minilm", "sst2", "graphs", 2000, "cudagraphs") == tc.DEFAULT_ESTIMATE_S["graphs"]


def test_step_clock_splits_training_time_into_steady_steps_and_one_off_costs():
    """Marks every 10 steps: a 6 s first window (compiling) and 1 s windows after it give 100 ms steady steps and
    5 s one-off; the median of the second half ignores a late slow window; too few windows give None."""
    from softprompt.train.trainer import split_time

    marks = [(0, 0.0), (10, 6.0)] + [(10 * k, 6.0 + (k - 1)) for k in range(2, 9)] + [(85, 13.5)]
    assert split_time(marks, 10) == {"steady_step_ms": 100.0, "one_off_s": 5.0}
    slow_end = marks[:-1] + [(90, 15.0)]  # one 2 s window among four in the second half
    assert split_time(slow_end, 10)["steady_step_ms"] == 100.0
    assert split_time(marks[:3], 10) == {"steady_step_ms": None, "one_off_s": None}


def test_a_non_finite_loss_at_the_last_step_is_caught_before_the_adapter_is_saved(monkeypatch, tiny_bert_dir,
                                                                                   sentiment_csv, tmp_path):
    """The last step is neither a logging nor a saving step here: the check after training still stops the run."""
    from softprompt.train import train

    calls = _spoil_steps(monkeypatch, lambda n: float("inf") if n == 5 else 1.0)
    cfg = TrainConfig(method="prefix", model=tiny_bert_dir, output=str(tmp_path / "inf"), file=sentiment_csv,
                      text_column="sentence", label_column="sentiment", max_steps=5, batch_size=16, logging_steps=3,
                      method_options={"num_virtual_tokens": 2}, max_length=16)
    with pytest.raises(NonFiniteLossError, match="loss became inf at step 5;"):
        train(cfg)
    assert len(calls) == 5 and not (tmp_path / "inf" / "adapter_model.safetensors").exists()


def test_one_compilation_serves_every_length_bucket(monkeypatch, tmp_path, tiny_bert_dir, varied_csv, mix_order_on):
    """A compiled run over batches of several length buckets traces once (the length is symbolic from the first
    batch on); without the marking, the second length compiles again. Nothing that changes at the first forward
    (transformers' config.problem_type, our checkpointing flags) makes it compile a second time either. Dynamo's
    graphs are counted with the aot_eager backend (no Inductor: the count is Dynamo's, the same for every backend)."""
    from torch._dynamo.utils import counters

    from softprompt.train import trainer

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model=None, **kw: real_compile(
        model, backend="aot_eager", dynamic=kw.get("dynamic")))

    def graphs(name: str) -> tuple[int, list[int]]:
        torch._dynamo.reset()
        counters.clear()
        metrics = bucketed_run(tiny_bert_dir, varied_csv, str(tmp_path / name), "default")
        return counters["stats"]["unique_graphs"], metrics["length_buckets"]

    count, buckets = graphs("marked")
    assert len(buckets) > 1 and count == 1, (buckets, count)
    monkeypatch.setattr(trainer, "mark_length_dynamic", lambda batch: batch)
    assert graphs("unmarked")[0] == 2  # a second length was seen: static first, then a dynamic recompilation


def test_a_compiled_run_trains_on_full_batches_only(monkeypatch, tmp_path, tiny_bert_dir, varied_csv, mix_order_on):
    """64 examples in batches of 3 leave a batch of 1 at each epoch's end: a compiled run over two epochs skips it
    (one graph), where keeping it would change the batch dimension and compile again."""
    from torch._dynamo.utils import counters

    from softprompt.train import trainer

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model=None, **kw: real_compile(
        model, backend="aot_eager", dynamic=kw.get("dynamic")))

    def run(name: str) -> tuple[int, dict]:
        torch._dynamo.reset()
        counters.clear()
        metrics = bucketed_run(tiny_bert_dir, varied_csv, str(tmp_path / name), "default", batch_size=3,
                                max_steps=24)
        return counters["stats"]["unique_graphs"], metrics

    count, metrics = run("full")
    assert metrics["steps"] == 24 and count == 1, (metrics["steps"], count)  # 21 full batches per epoch, 2 epochs
    monkeypatch.setattr(trainer.AdapterTrainer, "full_batches_only", property(lambda self: False,
                                                                              lambda self, value: None))
    assert run("partial")[0] == 2  # the 22nd batch holds one example: a second graph


def test_full_batches_gives_an_eager_run_the_batches_of_a_compiled_one(monkeypatch, tmp_path, tiny_bert_dir,
                                                                      varied_csv):
    """`softprompt train --compile off --full-batches`: the sampler keeps 63 of 64 examples in batches of 3, as a
    compiled run's does (train_compiled.py compares modes on the same batches); without the flag eager keeps all."""
    from softprompt.train import trainer

    kept = []

    class Recording(trainer.EpochShuffleSampler):
        def __init__(self, n, seed, full_batches=0):
            super().__init__(n, seed, full_batches)
            kept.append(len(self))

    monkeypatch.setattr(trainer, "EpochShuffleSampler", Recording)
    for name, flags in (("full", ["--full-batches"]), ("all", [])):
        main(["train", "--method", "prefix", "--model", tiny_bert_dir, "--file", varied_csv, "--text-column",
              "sentence", "--label-column", "sentiment", "--output", str(tmp_path / name), "--compile", "off",
              "--batch-size", "3", "--max-steps", "2", "--max-length", "40", "--num-virtual-tokens", "2", *flags])
    assert kept == [63, 64]


def test_epoch_sampler_keeps_full_batches_and_a_new_subset_each_epoch():
    from softprompt.train.trainer import EpochShuffleSampler

    s = EpochShuffleSampler(10, seed=3, full_batches=4)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert len(s) == len(first) == len(second) == 8
    assert len(set(first)) == 8 and set(first) != set(second)  # the two left out change with the epoch
    assert list(EpochShuffleSampler(10, seed=3))[:8] == first  # the same order, cut
    assert len(EpochShuffleSampler(3, seed=3, full_batches=4)) == 3  # smaller than one batch: all kept


def test_a_compiled_run_over_several_buckets_trains_as_eager_does(tmp_path, varied_csv, mix_order_on):
    """Inductor with the symbolic length, on the CPU: the same losses as eager at every step (dropout off, so that
    both draw nothing at random; Inductor's kernels round differently, hence the tolerance)."""
    from conftest import save_tiny_bert

    torch._dynamo.reset()
    model = save_tiny_bert(tmp_path / "bert", ["good", "bad", "movie", "the", "was", "very", "not"])
    config = json.loads((Path(model) / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (Path(model) / "config.json").write_text(json.dumps(config))
    runs = {mode: bucketed_run(model, varied_csv, str(tmp_path / f"run-{mode}"), mode) for mode in ("default", None)}
    assert len(runs["default"]["length_buckets"]) > 1 and runs[None]["length_buckets"] == []
    losses = {mode: [h["loss"] for h in m["loss_history"] if "loss" in h] for mode, m in runs.items()}
    assert len(losses["default"]) == len(losses[None]) == 10
    assert losses["default"] == pytest.approx(losses[None], abs=1e-4)
