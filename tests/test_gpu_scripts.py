"""The GPU call scripts of issue 18 (``benchmarks/gpu_perf.sh``): under DRY_RUN each call prints the Python command
it would run, and the benchmark's own parser accepts it with the options of docs/performance.md."""

import json
import os
import shlex
import subprocess
from pathlib import Path

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _dry(tmp_path, *argv, **env):
    out = subprocess.run(["bash", "benchmarks/gpu_perf.sh", *argv], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HOME": str(tmp_path), "DRY_RUN": "1", "OUT": str(tmp_path / "out"),
                              **env})
    return out


def test_perf_calls_parse_with_perf_py(tmp_path):
    parser = load_benchmark("perf").build_parser()
    for call, models, name in (("perf-a", "qwen0.5b,roberta-large", "perf_eager_a"),
                               ("perf-b", "qwen1.5b", "perf_eager_b")):
        out = _dry(tmp_path, call)
        assert out.returncode == 0, out.stderr
        command = shlex.split(out.stdout)
        assert command[:2] == ["python3", "benchmarks/perf.py"]
        args = parser.parse_args(command[2:])
        assert args.models == models and args.sections == "train" and args.shapes == "8x512,4x2048"
        assert args.methods.split(",") == ["frozen", "prefix", "peft_prefix", "apt", "prompt", "idspam", "lpt"]
        assert args.rounds == 9 and args.steps == 10 and args.out == str(tmp_path / "out" / f"{name}.json")


def test_train_compiled_calls_parse_and_need_left(tmp_path):
    parser = load_benchmark("train_compiled").build_parser()
    for argv, state, budget in ((("tc3",), tmp_path / "tc", (530, 540)), (("tc4",), tmp_path / "tc", (540, 540)),
                                (("tc-dnd", "1000"), tmp_path / "dnd_state" / "tc", (900, 910))):
        out = _dry(tmp_path, *argv)
        assert out.returncode == 0, out.stderr
        command = shlex.split(out.stdout)
        assert command[:2] == ["python3", "benchmarks/train_compiled.py"]
        args = parser.parse_args(command[2:])
        assert args.out == str(state / "train_compiled.json") and args.bf16
        assert args.minilm == str(state / "minilm") and args.data_dir == str(state / "data")
        assert budget[0] <= args.time_budget <= budget[1]
    refused = _dry(tmp_path, "tc-dnd")
    assert refused.returncode != 0 and "needs LEFT" in refused.stderr and refused.stdout == ""
    assert _dry(tmp_path, "nope").returncode == 2


def test_host_sync_diagnostic_runs_on_cpu(tmp_path):
    """benchmarks/host_sync.py with tiny models: one row per method with host and wall times and the aten op count
    (APT's per-layer gates dispatch more ops than prefix tuning's plain prefixes); no device, so no device time and
    no sync count; the JSON names the machine."""
    host_sync = load_benchmark("host_sync")
    out = tmp_path / "hs.json"
    rows = host_sync.main(["--tiny", "--models", "roberta-large", "--methods", "prefix,apt", "--shape", "2x16",
                           "--steps", "2", "--out", str(out)])
    by = {r["method"]: r for r in rows}
    assert set(by) == {"prefix", "apt"} and all("error" not in r for r in rows), rows
    assert by["apt"]["aten_ops"] > by["prefix"]["aten_ops"] > 0
    assert all(r["enqueue_ms"] > 0 and r["wall_ms"] >= r["enqueue_ms"] for r in rows)
    assert all(r["device_ms"] is None and r["syncs"] is None for r in rows)
    assert all(r["host_top"] and r["host_top"][0]["self_us"] > 0 for r in rows)
    doc = json.loads(out.read_text())
    assert doc["rows"] == rows and doc["command"].startswith("python benchmarks/host_sync.py --tiny")


def test_host_sync_counts_sync_warnings_by_their_site():
    """The sync counter counts the sync debug mode's warnings by the frame outside torch that caused them, and lets
    every other warning through."""
    import warnings

    host_sync = load_benchmark("host_sync")

    def caller():
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    with warnings.catch_warnings(record=True) as passed:
        warnings.simplefilter("always")
        with host_sync.sync_warnings() as where:
            caller()
            caller()
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert sum(where.values()) == 2 and len(where) == 1
    (site,) = where
    assert site.endswith(f"test_gpu_scripts.py:{caller.__code__.co_firstlineno + 1}")
    assert [str(w.message) for w in passed] == ["something else"]
