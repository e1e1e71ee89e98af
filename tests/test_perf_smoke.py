"""CPU smoke run of ``benchmarks/perf.py`` (tiny shapes): every section produces rows with the documented fields,
numbers are positive, PEFT baselines are present, and failures/refusals are result rows instead of crashes.

The GPU run (real shapes, bf16) is not part of the tests: see docs/performance.md.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import load_benchmark


def load_perf() -> ModuleType:
    """Import benchmarks/perf.py as a module (benchmarks/ is not a package)."""
    return load_benchmark("perf")


@pytest.fixture(scope="module")
def perf() -> ModuleType:
    return load_perf()


@pytest.fixture(scope="module")
def smoke(perf, tmp_path_factory) -> tuple[dict, dict, Path]:
    out = tmp_path_factory.mktemp("perf") / "perf.json"
    argv = ["--tiny", "--device", "cpu", "--models", "qwen0.5b,roberta-large",
            "--methods", "frozen,prefix,apt,peft_prefix,peft_lora", "--shapes", "2x32,1x48", "--gc-shapes", "1x64",
            "--longseq", "64", "--steps", "2", "--warmup", "1", "--out", str(out),
            "--markdown", str(out.with_suffix(".md")), "--quiet"]
    threads = torch.get_num_threads()
    try:
        doc = perf.main(argv)
    finally:
        torch.set_num_threads(threads)
    return doc, json.loads(out.read_text()), out


def _rows(data: dict, **kw) -> list[dict]:
    return [r for r in data["results"] if all(r.get(k) == v for k, v in kw.items())]


def test_json_written_and_meta(smoke):
    doc, data, out = smoke
    assert data["results"] == json.loads(json.dumps(doc["results"], default=str))
    meta = data["meta"]
    for key in ("torch", "transformers", "peft", "device", "dtype", "date", "peak_flops", "steps", "warmup"):
        assert key in meta, key
    assert meta["peak_flops"] > 0 and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert "targets" in data
    assert out.with_suffix(".md").read_text().startswith("| section |")


def test_every_section_has_rows_with_fields(smoke):
    _, data, _ = smoke
    sections = {r["section"] for r in data["results"]}
    assert sections == {"train", "memory", "longseq", "forward", "generate"}
    for r in data["results"]:
        for key in ("section", "model", "method", "shape", "gradient_checkpointing", "status"):
            assert key in r, (key, r)
        if r["status"] == "ok":
            assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["timed_steps"] >= 1, r
            assert r["peak_gib"] is None  # not tracked on CPU
        else:
            assert r.get("reason"), r


def test_training_rows_positive_with_mfu(smoke):
    _, data, _ = smoke
    train = _rows(data, section="train")
    # 2 models x 2 shapes x 5 methods; RoBERTa's PEFT prefix fails (no KV cache), recorded as a row.
    assert len(train) == 20
    for r in train:
        if r["status"] != "ok":
            continue
        assert r["mfu"] > 0 and r["mfu_needed"] > 0 and r["trainable_params"] > 0
        assert r["model_flops_per_step"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq"] / (r["step_ms"] / 1000.0))
    for model in ("qwen0.5b", "roberta-large"):
        for method in ("prefix", "apt", "peft_lora"):
            assert all(r["status"] == "ok" for r in _rows(data, section="train", model=model, method=method))
    # PEFT prefix tuning works on Qwen2; on RoBERTa it may not: then the reason is the result.
    assert all(r["status"] == "ok" for r in _rows(data, section="train", model="qwen0.5b", method="peft_prefix"))
    for r in _rows(data, section="train", model="roberta-large", method="peft_prefix"):
        assert r["status"] == "ok" or (r["status"] == "error" and r["reason"])
    # With a frozen backbone the needed FLOPs are 4N instead of 6N per token.
    r = _rows(data, section="train", model="qwen0.5b", method="prefix")[0]
    assert r["mfu_needed"] < r["mfu"]
    r = _rows(data, section="train", model="qwen0.5b", method="peft_lora")[0]
    assert r["status"] == "ok"


def test_training_rows_are_medians_of_interleaved_rounds_with_spread_and_device_time(smoke):
    """Issue 18: every method is timed in 3 interleaved rounds (the default); step_ms is the median of the round
    medians, with their spread; every method, the frozen floor included, has a device_ms (None on CPU)."""
    _, data, _ = smoke
    assert data["meta"]["rounds"] == 3
    ok = [r for r in _rows(data, section="train") if r["status"] == "ok"]
    assert {r["method"] for r in ok} >= {"frozen", "prefix", "apt", "peft_prefix", "peft_lora"}
    for r in ok:
        assert r["rounds"] == 3 and len(r["step_ms_rounds"]) == 3 and r["timed_steps"] == 6, r
        lo, hi = r["step_ms_spread"]
        assert lo == min(r["step_ms_rounds"]) and hi == max(r["step_ms_rounds"])
        assert r["step_ms"] == pytest.approx(statistics.median(r["step_ms_rounds"]), abs=1e-3)
        assert r["step_ms_min"] <= lo + 1e-3 and hi <= r["step_ms_max"] + 1e-3
        assert r["step_ms_iqr"][0] <= r["step_ms_iqr"][1]
        assert "device_ms" in r and r["device_ms"] is None  # the CUDA profiler's device time; CPU has none
    # The interleaved section still writes its rows in the order of --methods.
    methods = [r["method"] for r in _rows(data, section="train", model="qwen0.5b", shape="2x32")]
    assert methods == ["frozen", "prefix", "apt", "peft_prefix", "peft_lora"]
    goals = [t for t in data["targets"] if t["target"].startswith("issue 18")]
    assert any(t["target"] == "issue 18: apt step <= 1.1x prefix" and t["model"] == "qwen0.5b" for t in goals)
    assert all(t["spread"][0] - 1e-3 <= t["value"] <= t["spread"][1] + 1e-3 for t in goals)


def test_memory_section_records_peft_refusal(smoke):
    _, data, _ = smoke
    mem = _rows(data, section="memory", model="qwen0.5b")
    ours = _rows(data, section="memory", method="prefix")
    assert ours and ours[0]["gradient_checkpointing"] and ours[0]["status"] == "ok"
    peft_rows = [r for r in mem if r["method"] == "peft_prefix"]
    assert [r["status"] for r in peft_rows] == ["refused", "ok"]
    assert "checkpointing" in peft_rows[0]["reason"] and not peft_rows[1]["gradient_checkpointing"]
    assert not _rows(data, section="memory", model="roberta-large")  # encoders: 514 positions, no 8k memory case


def test_longseq_and_inference(smoke):
    _, data, _ = smoke
    long = _rows(data, section="longseq")
    assert {r["method"] for r in long} == {"prefix", "peft_prefix"} and all(r["status"] == "ok" for r in long)
    assert all(r["flash_only_forward"] is None for r in long)  # the flash probe needs CUDA
    fwd = _rows(data, section="forward", model="qwen0.5b")
    assert {r["method"] for r in fwd} == {"bare", "prefix", "peft_prefix"} and all(r["status"] == "ok" for r in fwd)
    gen = _rows(data, section="generate")
    assert {r["method"] for r in gen} == {"bare", "prefix", "peft_prefix"}
    assert all(r["status"] == "ok" and r["new_tokens"] == 4 for r in gen)
    assert not _rows(data, section="generate", model="roberta-large")


def test_time_budget_skips_cleanly(perf, tmp_path):
    out = tmp_path / "skip.json"
    # The budget counts from the module's import; 1 s is gone by now, so every case is skipped, none crashes.
    doc = perf.main(["--tiny", "--device", "cpu", "--models", "qwen0.5b", "--methods", "prefix,peft_lora",
                     "--time-budget", "1", "--out", str(out), "--quiet"])
    rows = doc["results"]
    assert rows and all(r["status"] == "skipped" and "time budget" in r["reason"] for r in rows)
    assert json.loads(out.read_text())["results"] == rows


def test_flop_formula(perf):
    shape = perf.Shape(n_matmul=1000, layers=2, heads=4, head_dim=8, causal=True, vocab=10, max_positions=None)
    attn = 4.0 * 3 * 16 * 16 * 2 * 4 * 8 * 0.5
    assert perf.attention_flops_fwd(shape, 3, 16) == attn
    assert perf.model_flops(shape, 3, 16, "train") == 6 * 1000 * 48 + 3 * attn
    assert perf.model_flops(shape, 3, 16, "needed") == 4 * 1000 * 48 + 3 * attn
    assert perf.model_flops(shape, 3, 16, "forward") == 2 * 1000 * 48 + attn


def test_real_shapes_match_public_parameter_counts(perf):
    """The configs written out in the script give the public models' parameter counts (built on the meta device)."""
    expected = {"qwen0.5b": 494_032_768, "qwen1.5b": 1_543_714_304}
    for name, count in expected.items():
        model = perf.build_base(perf.MODELS[name], False, torch.device("meta"), torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == count
    roberta = perf.build_base(perf.MODELS["roberta-large"], False, torch.device("meta"), torch.bfloat16)
    assert 355_000_000 < sum(p.numel() for p in roberta.parameters()) < 356_000_000


@pytest.mark.parametrize("model", ["qwen0.5b", "roberta-large"])
def test_frozen_floor_backpropagates_to_the_embeddings_in_one_compiled_graph(perf, model):
    """The `frozen` row is the floor of every frozen-backbone method only if backward runs through every layer, and
    a compiled floor is only a floor if it compiles as one graph (enable_input_require_grads broke RoBERTa's into 5)."""
    spec = perf.MODELS[model]
    base = perf.build_base(spec, True, torch.device("cpu"), torch.float32)
    net, params, extra = perf.make_method("frozen", base, spec, False, 4)
    batch = perf.make_batch(spec, perf.shape_of(spec, True, base), 2, 16, torch.device("cpu"))
    first_layer = [p for n, p in net.named_parameters() if ".layer.0." in n or ".layers.0." in n]
    assert first_layer and not any(p.requires_grad for p in first_layer)
    net.train()
    net(**batch, **extra).loss.backward()
    anchor = params[-1]
    assert anchor.dim() == 0 and anchor.grad is not None and anchor.grad.abs() > 0  # gradient reached the input
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(**batch, **extra)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_rounds_cut_by_the_time_budget_keep_the_first_round(perf, tmp_path, monkeypatch):
    """When the budget cannot cover another whole round, the rows keep round 1 and say so (no crash, no half
    round)."""
    monkeypatch.setattr(perf.Budget, "allows", lambda self, section, model: True)
    monkeypatch.setattr(perf.Budget, "remaining", lambda self: 0.0)
    doc = perf.main(["--tiny", "--device", "cpu", "--models", "qwen0.5b", "--methods", "prefix,frozen",
                     "--sections", "train", "--rounds", "3", "--steps", "2", "--time-budget", "1000",
                     "--out", str(tmp_path / "cut.json"), "--quiet"])
    rows = doc["results"]
    assert [r["method"] for r in rows] == ["prefix", "frozen"]
    for r in rows:
        assert r["status"] == "ok" and r["rounds"] == 1 and r["timed_steps"] == 2, r
        assert "1 of 3 rounds (time budget)" in r["note"]
