"""Smoke test of benchmarks/serve_generation.py on a tiny model: the JSON has the contract's fields and every
request finishes. It asserts no timing (a benchmark is a script that prints numbers)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import serve_generation


def test_run_and_report_write_the_contract(tmp_path):
    out = tmp_path / "serve_generation.json"
    args = ["run", "--model", "tiny", "--rates", "20,40", "--duration", "0.3", "--output-len", "3", "--prompt-len",
            "3:8", "--adapters", "2", "--prefix-len", "2", "--max-rows", "4", "--dtype", "float32",
            "--max-overrun", "1e6", "--out", str(out)]
    assert serve_generation.main(args) == 0
    data = json.loads(out.read_text())
    assert {"device", "versions", "date", "command", "slo_ttft_p99_ms", "runs", "goodput"} <= set(data)
    assert {(r["mode"], r["rate"]) for r in data["runs"]} == {(m, r) for m in ("mixed", "per_adapter", "bare")
                                                           for r in (20.0, 40.0)}
    keys = {"model", "mode", "adapters", "rate", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
            "itl_p99_ms", "decode_step_p50_ms", "join_step_p50_ms", "steps"}
    for r in data["runs"]:
        assert keys <= set(r) and r["finished"] == r["requests"]
    assert set(data["goodput"]["tiny"]) == {"mixed", "per_adapter", "bare"}
    assert data["setup"]["prompt_len"] == "3:8" and data["setup"]["max_prefill_padding"] == 0.5
    assert data["setup"]["decoding"] == "dynamic"
    static = tmp_path / "static.json"  # fixed decoding buffers (CUDA graphs on a GPU; eager here)
    assert serve_generation.main([*args[:-1], str(static), "--modes", "mixed", "--decoding", "static",
                                  "--max-context", "64", "--method", "prompt"]) == 0  # prompt tuning, fixed buffers
    assert json.loads(static.read_text())["setup"]["method"] == "prompt"
    assert all(r["finished"] == r["requests"] for r in json.loads(static.read_text())["runs"])
    assert serve_generation.main(args) == 0  # resumes: nothing left to run, nothing duplicated
    assert len(json.loads(out.read_text())["runs"]) == 6
    md = tmp_path / "table.md"
    assert serve_generation.main(["report", "--results", str(out), "--markdown", str(md),
                                  "--plot", str(tmp_path / "p.png")]) == 0
    assert "goodput mixed" in md.read_text() and (tmp_path / "p.png").stat().st_size > 0


def test_check_compares_fixed_buffers_with_the_default_decoding(capsys):
    """``check`` exits 0 only when every float32 row of the fixed-buffer decoding equals the default decoding's."""
    args = ["check", "--model", "tiny", "--decoding", "static", "--requests", "8", "--max-rows", "3",
            "--max-context", "160", "--adapters", "2", "--prefix-len", "2"]
    assert serve_generation.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["identical_rows"] == out["requests"] == 8


def test_service_check_agrees_and_catches_a_service_that_drops_adapters(capsys, monkeypatch):
    """benchmarks/serve_service_check.py: the service (worker thread, fixed buffers) returns the offline tokens for
    every request; a service that ignored the request's adapter fails the check (exit 1)."""
    import serve_service_check

    from softprompt.serve.generation import GenerationService

    args = ["--model", "tiny", "--decoding", "static", "--device", "cpu", "--requests", "12", "--adapters", "3"]
    assert serve_service_check.main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["identical_rows"] == 12
    complete = GenerationService.complete
    monkeypatch.setattr(GenerationService, "complete", lambda self, p, a, params: complete(self, p, None, params))
    assert serve_service_check.main(args) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["identical_rows"] < 12
