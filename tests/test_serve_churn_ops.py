"""Smoke test of benchmarks/serve_churn_ops.py: it runs, and its measure (aten ops per step) is exactly repeatable,
which is why it is used instead of CPU time to judge scheduler bookkeeping. No timing is asserted."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import serve_churn_ops


def test_op_counts_are_exact_and_repeatable(tmp_path):
    args = ["--layers", "2", "--steps", "24", "--warmup", "8", "--max-rows", "8", "--out", str(tmp_path / "c.json")]
    first = serve_churn_ops.main(args)
    again = serve_churn_ops.main(args)
    for mode in ("mixed", "bare"):
        assert first[mode]["ops_per_step"] > 0 and first[mode]["rows_per_step"] > 0
        assert first[mode]["ops_per_step"] == again[mode]["ops_per_step"]  # deterministic, unlike CPU time
        assert first[mode]["rows_per_step"] == again[mode]["rows_per_step"]
    assert first["mixed"]["rows_per_step"] == first["bare"]["rows_per_step"]  # one schedule for both modes
    assert (tmp_path / "c.json").exists()
