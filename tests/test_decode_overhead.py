"""Smoke run of ``benchmarks/decode_overhead.py`` (issues 18/19) at its quick settings: the JSON has the documented
schema, every number is a positive finite time or ratio, and every timed step decoded all B rows. No timing relation
is asserted: on shared CPUs timings say nothing in a test. A second test checks that what the benchmark times is
real decoding: in its ``methods_mixed`` batch every row gives the tokens its adapter gives alone in the same engine,
and the ``hf`` floor gives the bare engine's tokens."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from conftest import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("decode_overhead")


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_decode_overhead_quick_run_writes_the_documented_json(bench, tmp_path):
    out = tmp_path / "decode.json"
    threads = torch.get_num_threads()
    doc = bench.main(["--quick", "--rows", "6", "--out", str(out)])
    assert torch.get_num_threads() == threads  # the script leaves the process as it found it
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(doc))
    for key in ("variants", "goals", "formula", "note", "settings", "model", "machine", "versions", "code", "date",
                "command"):
        assert key in data, key
    assert {"torch", "transformers", "python", "softprompt"} <= set(data["versions"])
    assert data["command"].startswith("python benchmarks/decode_overhead.py --quick")
    s = data["settings"]
    assert set(data["variants"]) == set(bench.VARIANTS)
    depths = {str(s["short_layers"]), str(s["layers"])}
    for name, row in data["variants"].items():
        assert set(row["ms_per_step"]) == depths, name
        assert all(_finite_positive(v) for v in row["ms_per_step"].values()), name
        assert math.isfinite(row["us_per_layer"]) and math.isfinite(row["fixed_ms"]), name  # a slope may be < 0
        assert row["steps_timed"] == s["rounds"] * s["steps"], name
        # Every timed step decoded one token for each of the B rows (no row left early or joined late).
        assert row["events_per_step"] == [s["rows"], s["rows"]], name
        for ref in ("bare", "hf"):
            assert set(row[f"vs_{ref}"]) == depths and all(_finite_positive(v) for v in row[f"vs_{ref}"].values())
            lo, mid, hi = row[f"vs_{ref}_rounds_min_median_max"]
            assert 0 < lo <= mid <= hi and math.isfinite(hi), (name, ref)
        assert all(_finite_positive(v) for v in row["implied_tokens_per_s_vs_bare"].values()), name
    assert data["variants"]["bare"]["vs_bare"] == {d: 1.0 for d in depths}
    # The 0.9x goal is judged for every adapter variant at both depths.
    assert {(g["goal"].split()[0], g["layers"]) for g in data["goals"]} == {
        (v, int(d)) for v in ("prefix_one", "prefix_mixed", "methods_mixed") for d in depths}
    for g in data["goals"]:
        assert isinstance(g["met"], bool) and _finite_positive(g["ratio"]), g
        met, rounds = map(int, g["rounds_met"].split("/"))
        assert 0 <= met <= rounds == s["rounds"], g


def test_benchmarked_rows_decode_what_their_adapters_decode_alone(bench, tmp_path):
    from softprompt.multi.generation import GenerationEngine

    clock = time.thread_time_ns
    rows = 2 * len(bench.METHODS)  # every method twice, with different prompts
    hf, multi = bench.build_models(3, 8, tmp_path)
    prompts = bench.make_prompts(rows, 8)
    engine = GenerationEngine(multi, max_rows=rows)
    adapters = bench.row_adapters("methods_mixed", rows)
    assert sorted(set(adapters)) == sorted(bench.METHODS)
    _, counts, mixed = bench.engine_round(engine, adapters, prompts, 3, 1, clock)
    assert counts == [rows] * 3
    _, _, bare = bench.engine_round(engine, [None] * rows, prompts, 3, 1, clock)
    for adapter, prompt, tokens, bare_tokens in zip(adapters, prompts, mixed, bare):
        _, _, alone = bench.engine_round(engine, [adapter], [prompt], 3, 1, clock)
        assert tokens == alone[0], adapter
        assert tokens != bare_tokens, f"{adapter} decodes what the bare model does: the check would prove nothing"
    # The floor decodes what the engine's bare rows decode (it lacks only the engine's last, untimed step).
    _, _, floor = bench.hf_round(hf, prompts, 3, 1, clock)
    assert floor == [b[: len(floor[0])] for b in bare]
