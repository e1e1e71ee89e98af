"""Smoke run of ``benchmarks/host_overhead.py`` (issue 18) at its quick settings: the JSON has the documented schema
and every number is a positive time. No timing is asserted: on shared CPUs timings say nothing in a test."""

from __future__ import annotations

import json

import torch
from conftest import load_benchmark


def test_host_overhead_quick_run_writes_the_documented_json(tmp_path):
    module = load_benchmark("host_overhead")
    out = tmp_path / "host.json"
    threads = torch.get_num_threads()
    doc = module.main(["--quick", "--out", str(out)])
    assert torch.get_num_threads() == threads  # the script leaves the process as it found it
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(doc))
    for key in ("methods", "machine", "versions", "date", "command", "cases", "goals", "formula", "settings", "note"):
        assert key in data, key
    assert {"torch", "transformers", "peft", "python", "softprompt"} <= set(data["versions"])
    assert set(data["methods"]) == set(module.OURS)
    peft_methods = {"prefix", "prompt", "ptuning"}
    for name, entry in data["methods"].items():
        assert {"ours_us", "peft_us", "bare_us", "cases"} <= set(entry), name
        assert entry["ours_us"] > 0 and entry["bare_us"] > 0, name
        # The headline case is the decoder, where PEFT has prefix, prompt and P-tuning.
        assert (entry["peft_us"] is not None) == (name in peft_methods), name
        assert set(entry["cases"]) == {"decoder/train", "decoder/forward", "encoder/train", "encoder/forward"}
    for case in data["cases"].values():
        for variant, row in case.items():
            assert row["step_us"] > 0 and row["step_us_short"] > 0 and row["steps_timed"] == 4, variant
            lo, hi = row["us_per_layer_rounds_min_max"]
            assert lo <= hi and isinstance(row["us_per_layer"], float)
            assert row["step_us_iqr"][0] <= row["step_us"] <= row["step_us_iqr"][1]
    # PEFT prefix tuning needs a KV cache that RoBERTa does not have: recorded as a failure, not a crash.
    assert "peft:prefix" not in data["cases"]["encoder/train"]
    assert all("peft:prefix" in f for f in data["failures"])
    goals = {(g["case"], g["goal"]) for g in data["goals"]}
    assert ("decoder/train", "ours prefix <= PEFT prefix") in goals
    assert ("decoder/train", "ours apt <= 1.5x ours prefix") in goals
    assert all(isinstance(g["met"], bool) and g["ratio"] > 0 for g in data["goals"])
