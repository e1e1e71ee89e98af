"""benchmarks/perf_merge.py: one results file from several perf.py calls of one session (issue 18), with the targets
computed over all rows, and a refusal to mix machines, versions or repeated cases."""

import json

import pytest
from conftest import load_benchmark

perf_merge = load_benchmark("perf_merge")
META = {"gpu": "NVIDIA H100 80GB HBM3", "cuda": "13.0", "torch": "2.11.0+cu130", "transformers": "5.17.0",
        "peft": "0.21.0", "python": "3.12.3", "dtype": "bfloat16", "softprompt": "0.1.0"}


def _row(method, step_ms, model="qwen0.5b", shape="8x512"):
    return {"section": "train", "status": "ok", "model": model, "shape": shape, "method": method,
            "step_ms": step_ms, "tokens_per_s": 4096 / step_ms * 1000}


def _doc(rows, argv, **meta):
    return {"meta": {**META, "argv": argv, "date": "2026-12-05T18:00:00+00:00", "wall_s": 500.0, **meta},
            "results": rows, "targets": []}


def test_merge_concatenates_and_recomputes_targets_across_calls(tmp_path):
    a = _doc([_row("frozen", 80.0), _row("prefix", 100.0)], ["--models", "qwen0.5b", "a"])
    b = _doc([_row("peft_prefix", 110.0), _row("apt", 105.0)], ["--models", "qwen0.5b", "b"])
    doc = perf_merge.merge([a, b])
    assert [r["method"] for r in doc["results"]] == ["frozen", "prefix", "peft_prefix", "apt"]
    assert [c["argv"][-1] for c in doc["meta"]["calls"]] == ["a", "b"] and "argv" not in doc["meta"]
    got = {t["target"]: t["value"] for t in doc["targets"]}
    # prefix (call a) against PEFT (call b): only the merged rows can say it
    assert got["issue 18: prefix step <= 1.0x peft_prefix"] == round(100 / 110, 3)
    assert got["issue 18: apt step <= 1.1x prefix"] == 1.05
    out, md = tmp_path / "m.json", tmp_path / "m.md"
    for i, d in enumerate((a, b)):
        (tmp_path / f"{i}.json").write_text(json.dumps(d))
    assert perf_merge.main([str(tmp_path / "0.json"), str(tmp_path / "1.json"), "--out", str(out),
                            "--markdown", str(md)]) == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc)) and "peft_prefix" in md.read_text()


def test_merge_refuses_other_machines_repeats_and_nothing(tmp_path, capsys):
    a = _doc([_row("prefix", 100.0)], ["a"])
    with pytest.raises(ValueError, match=r"calls differ in .*gpu.*one machine and software stack"):
        perf_merge.merge([a, _doc([_row("apt", 1.0)], ["b"], gpu="NVIDIA H200")])
    with pytest.raises(ValueError, match="measured by two calls"):
        perf_merge.merge([a, _doc([_row("prefix", 99.0)], ["b"])])
    with pytest.raises(ValueError, match="at least one"):
        perf_merge.merge([])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "h200.json").write_text(json.dumps(_doc([_row("apt", 1.0)], ["b"], torch="2.13.0")))
    assert perf_merge.main([str(tmp_path / "a.json"), str(tmp_path / "h200.json"), "--out",
                            str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("perf_merge: calls differ in {'torch'") and err.count("\n") == 1
    assert not (tmp_path / "m.json").exists()
