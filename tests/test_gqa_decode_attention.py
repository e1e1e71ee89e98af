"""Smoke test of benchmarks/gqa_decode_attention.py (a benchmark: it prints numbers; nothing here checks a time)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gqa_decode_attention


def test_times_the_copying_and_the_packed_attention_call_on_the_same_inputs(tmp_path):
    out = tmp_path / "gqa.json"
    result = gqa_decode_attention.main(["--quick", "--out", str(out)])
    (case,) = result["cases"]
    assert (case["heads"], case["kv_heads"], case["rows"], case["columns"]) == (9, 3, 4, 48)
    assert len(case["copy_rounds_us"]) == len(case["packed_rounds_us"]) == 2
    # Both variants compute the same attention (float32 on the CPU): the comparison is of equals.
    assert case["max_abs_diff"] < 1e-5
    # The copy is what transformers 5.17-5.23 writes: keys and values of 9 heads instead of 3, 4 rows x 48 columns.
    assert case["copied_mb_per_call"] == round(2 * 4 * 9 * 48 * 64 * 4 / 1e6, 1)
    assert json.loads(out.read_text())["cases"] == result["cases"]
