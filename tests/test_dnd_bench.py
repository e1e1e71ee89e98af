"""benchmarks/dnd_bench.py end to end on CPU: tiny random Llama + tiny BERT encoder, 3 real datasets, tiny sizes.

One run is stopped by its time budget after the zoo stages and a second run finishes the same state; the JSON and
markdown are checked against numbers recomputed from the stage files."""

import json
import statistics
import tarfile
import time

import pytest
import torch
from conftest import load_benchmark, tiny
from test_dnd_harness import _tok

DATASETS = ["commonsense/arc_easy", "superglue/boolq", "commonsense/winogrande"]
CONFIG = ["--datasets", "arc_easy,boolq,winogrande", "--eval-n", "6", "--min-pool", "200", "--heldout-pool", "40",
          "--train-pool", "16", "--warmup-steps", "2", "--checkpoints", "3", "--zoo-batch", "2", "--max-length", "48",
          "--train-limit", "8", "--curve-steps", "1,2,4", "--zoo-lr", "1e-2", "--n-prompts", "4", "--cond-length", "16",
          "--gen-steps", "3", "--gen-batch", "2", "--gen-warmup", "1", "--width", "4", "--n-layers", "2",
          "--kernel", "3",
          "--chunk", "16", "--samples", "2", "--prompt-counts", "2,8", "--ablation-samples", "1",
          "--answer-datasets", "boolq", "--max-new-tokens", "3", "--curve-measures", "loglik,gen"]
RUNTIME = ["--device", "cpu", "--eval-batch", "8"]


def _load_bench():
    return load_benchmark("dnd_bench")


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinyllama")
    tiny("llama").save_pretrained(d)
    _tok().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def two_runs(bench, tiny_llama_dir, tiny_bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dndbench")
    state = root / "state"
    t0 = time.time()
    # run 1: the gen/ans priors exceed the budget, so it stops cleanly after base + zoo
    rc1 = bench.main(["run", "--state", str(state), "--model", tiny_llama_dir, "--encoder", tiny_bert_dir, *CONFIG,
                      *RUNTIME, "--priors", "base=0.01,zoo=0.01,gen=1e6,ans=1e6", "--time-budget", "900",
                      "--export", str(root / "out1")])
    stage_files = {p.name: p.read_text() for p in (state / "stages").glob("*.json")}
    res1 = json.loads((root / "out1" / "dnd_results.json").read_text())
    md1 = (root / "out1" / "dnd.md").read_text()
    # run 2: same state, no size options (the config is frozen), default priors
    bench.T_START = time.time()
    rc2 = bench.main(["run", "--state", str(state), *RUNTIME, "--time-budget", "900", "--export", str(root / "out2")])
    return {"root": root, "state": state, "rc": (rc1, rc2), "res1": res1, "md1": md1, "stage_files_1": stage_files,
            "res": json.loads((root / "out2" / "dnd_results.json").read_text()),
            "md": (root / "out2" / "dnd.md").read_text(), "seconds": time.time() - t0}


def test_resume_across_runs(two_runs):
    r = two_runs
    assert r["rc"] == (0, 0)
    zoo_stages = ["base", "zoo:arc_easy", "zoo:boolq", "zoo:winogrande"]
    later = ["gen:arc_easy", "gen:boolq", "gen:winogrande", "ans:boolq"]
    assert r["res1"]["status"] == {"done": zoo_stages, "pending": later}
    assert "**Incomplete:** 4 of 8 stages done" in r["md1"] and "gen:arc_easy" in r["md1"]
    assert r["res"]["status"] == {"done": zoo_stages + later, "pending": []}
    assert "Incomplete" not in r["md"]
    inv = r["res"]["invocations"]
    assert [i["stages_run"] for i in inv] == [zoo_stages, later]
    assert inv[0]["status"].startswith("stopped before gen:arc_easy") and inv[1]["status"] == "complete"
    # stages of run 1 were not redone
    for name, text in r["stage_files_1"].items():
        assert (r["state"] / "stages" / name).read_text() == text
    # a guard against a runaway configuration, not a benchmark: ~15 s alone, 95 s seen on 2 cores shared with 4 jobs
    assert r["seconds"] < 180


def test_frozen_config(bench, two_runs):
    with pytest.raises(SystemExit, match="another configuration"):
        bench.main(["run", "--state", str(two_runs["state"]), "--eval-n", "7", *RUNTIME])


def test_results_match_stage_files(two_runs):
    res, md, state = two_runs["res"], two_runs["md"], two_runs["state"]
    stage = lambda n: json.loads((state / "stages" / f"{n.replace(':', '__')}.json").read_text())
    short = {"commonsense/arc_easy": "arc_easy", "superglue/boolq": "boolq", "commonsense/winogrande": "winogrande"}
    base = stage("base")
    # WinoGrande's re-split test part (519) leaves enough unevaluated records for the condition pool
    assert base["subsets"]["commonsense/winogrande"]["prompt_source"].startswith("test part")
    assert base["subsets"]["commonsense/arc_easy"]["prompt_source"].startswith("test part")
    assert all(base["subsets"][d]["n_eval"] == 6 for d in DATASETS)
    beats = 0
    for h in DATASETS:
        g = stage(f"gen:{short[h]}")
        assert g["train_datasets"] == [d for d in DATASETS if d != h]  # leave-one-out
        assert g["n_train_checkpoints"] == 2 * 3 and g["sanity"]["finite"]
        assert set(g["sanity"]["distance_to_final"]) == set(DATASETS)
        assert sorted({c["n_prompts"] for c in g["prompt_counts"]}) == [2, 8]
        assert all(s["seconds"] > 0 for s in g["samples"]) and len(g["samples"]) == 2
        row = res["rows"][h]
        for m in ("loglik", "gen"):
            key = f"{m}_acc"
            others = [stage(f"zoo:{short[d]}")["final_on"][h][key] for d in DATASETS if d != h]
            dnd = statistics.fmean(s[key] for s in g["samples"])
            r = row[m]
            assert r["train_mean"] == pytest.approx(statistics.fmean(others))
            assert r["train_best"] == max(others)
            assert r["own"] == stage(f"zoo:{short[h]}")["final_on"][h][key]
            assert r["base"] == base["scores"][h][key]
            assert r["dnd_mean"] == pytest.approx(dnd) and r["zoo_mean"] == g["zoo_mean"][key]
            assert r["beats_train_mean"] == (dnd > statistics.fmean(others))
            verb = "beats" if dnd > r["train_mean"] else "ties with" if dnd == r["train_mean"] else "does not beat"
            assert f"- {short[h]}: DnD {100 * dnd:.1f} {verb} the training-LoRA mean" in md
            beats += r["beats_train_mean"]
            # cost: the first curve point (base = step 0) reaching DnD's mean accuracy
            curve = [(0.0, base["scores"][h][key])] + [(c["train_seconds"], c[key])
                                                       for c in stage(f"zoo:{short[h]}")["curve"]]
            hit = next((t for t, a in curve if a >= dnd), None)
            assert r["lora_seconds_to_match"] == hit
        assert f"| {short[h]} | 6 | {100 * row['loglik']['base']:.1f} | {100 * row['loglik']['train_mean']:.1f} |" in md
    n_loglik = sum(res["rows"][h]["loglik"]["beats_train_mean"] for h in DATASETS)
    assert f"DnD beats the training-LoRA mean on {n_loglik}/3" in md
    # the zoo curve: warm-up points 1, 2 and kept checkpoints 4, 5 (final), optimiser seconds increasing
    for h in DATASETS:
        z = stage(f"zoo:{short[h]}")
        assert [c["step"] for c in z["curve"]] == [1, 2, 4, 5] and z["final_step"] == 5
        secs = [c["train_seconds"] for c in z["curve"]]
        assert secs == sorted(secs) and secs[0] > 0 and set(z["final_on"]) == set(DATASETS)
    # the answer ablation ran for boolq only, and the report says so
    assert res["rows"]["superglue/boolq"]["loglik"]["answers_mean"] is not None
    assert "answers_mean" not in res["rows"]["commonsense/arc_easy"]["loglik"]
    assert "Done for 1 of 3 held-out datasets (boolq)" in md
    for section in ("## Cost", "## Ablation: number of condition prompts", "## Generated adapters vs the zoo",
                    "## Commands", "torch "):
        assert section in md


def test_report_and_export_files(bench, two_runs, tmp_path):
    out = two_runs["root"] / "out2"
    assert bench.main(["report", "--results", str(out / "dnd_results.json"), "--out", str(tmp_path / "dnd.md")]) == 0
    assert (tmp_path / "dnd.md").read_text() == two_runs["md"]
    with tarfile.open(out / "dnd_logs.tar.gz") as tar:
        names = tar.getnames()
    assert "stages/gen__boolq.json" in names and "zoo/manifest.json" in names and "log.txt" in names


def test_merged_scoring_equals_peft(bench, two_runs, tiny_llama_dir):
    """The evaluator merges scale*B@A into the weights; it must score like PEFT loading the exported adapter."""
    from peft import PeftModel

    from softprompt.dnd.export import read_lora_tensors
    from softprompt.dnd.harness import option_logliks
    from softprompt.dnd.templates import format_dataset

    adapter = two_runs["state"] / "gen" / "gen-boolq" / "adapter_seed0"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    ev = bench.Evaluator(tiny_llama_dir, "cpu", 4, ("loglik",), 3)
    recs = [{"text": "which is the sky", "choices": ["blue", "red", "green"], "label": 0},
            {"text": "the answer", "choices": ["A", "B", "C", "D"], "label": 3}]
    items = format_dataset("commonsense/arc_easy", recs, ev.tok)
    ev.set_adapter(read_lora_tensors(adapter), cfg["lora_alpha"] / cfg["r"])
    merged = option_logliks(ev.model, ev.tok, items, progress=False)
    peft = PeftModel.from_pretrained(tiny("llama"), str(adapter)).eval()
    ref = option_logliks(peft, ev.tok, items, progress=False)
    flat = lambda rows: torch.tensor([x for r in rows for x in r])
    assert torch.allclose(flat(merged), flat(ref), atol=1e-4)
    assert not torch.allclose(flat(merged), flat(option_logliks(tiny("llama").eval(), ev.tok, items, progress=False)))
    ev.clear()  # back to the base model exactly
    base = option_logliks(tiny("llama").eval(), ev.tok, items, progress=False)
    assert option_logliks(ev.model, ev.tok, items, progress=False) == base


def test_failed_stage_then_resume(bench, two_runs, tmp_path, monkeypatch):
    """A stage that raises: the run exports what is done and fails; the next run redoes only the missing stages."""
    import shutil

    state = tmp_path / "state"
    shutil.copytree(two_runs["state"], state)
    for name in ("gen__winogrande.json", "ans__boolq.json"):
        (state / "stages" / name).unlink()
    inv = json.loads((state / "invocations.json").read_text())
    inv[-1]["status"] = "running"  # as left by a run killed by the call's time limit
    (state / "invocations.json").write_text(json.dumps(inv))

    def boom(self, h, with_answer):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(bench.Bench, "stage_gen", boom)
    assert bench.main(["run", "--state", str(state), *RUNTIME, "--export", str(tmp_path / "out")]) == 1
    res = json.loads((tmp_path / "out" / "dnd_results.json").read_text())
    assert res["status"]["pending"] == ["gen:winogrande", "ans:boolq"]
    assert res["invocations"][-1]["status"] == "failed: RuntimeError: simulated failure"
    assert res["invocations"][1]["status"].startswith("killed")
    assert "not run yet: gen:winogrande, ans:boolq" in (tmp_path / "out" / "dnd.md").read_text()
    monkeypatch.undo()
    assert bench.main(["run", "--state", str(state), *RUNTIME, "--export", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "dnd_results.json").read_text())
    assert res["status"]["pending"] == [] and res["invocations"][-1]["stages_run"] == ["gen:winogrande", "ans:boolq"]


def test_gpu_call_script_builds_study_commands_the_bench_accepts(bench, monkeypatch, tmp_path):
    """``benchmarks/gpu_dnd.sh`` (DRY_RUN) prints the study command of calls C and D; the bench parses it into the
    options the environment asked for, and a call without the session's seconds left is refused."""
    import os
    import shlex
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    seen = []
    monkeypatch.setattr(bench, "cmd_cloze", lambda args: seen.append(args) or 0)

    def call(*argv, **env):
        return subprocess.run(["bash", "benchmarks/gpu_dnd.sh", *argv], cwd=root, capture_output=True, text=True,
                              env={**os.environ, "HOME": str(tmp_path), "DRY_RUN": "1", **env})

    for argv, env in ((("C", "1500"), {"GEN_COMPILE": "1", "STATS_ABLATION": "all"}),
                      (("D", "900"), {"STATS_ABLATION": "arc_easy,piqa", "GEN_STEP_SECONDS": "0.3",
                                      "NEAREST_ABLATION": "arc_easy"})):
        out = call(*argv, **env)
        assert out.returncode == 0, out.stderr
        command = shlex.split(out.stdout)
        assert command[:3] == ["python3", "benchmarks/dnd_bench.py", "cloze"]
        assert bench.main(command[2:]) == 0
    c, d = seen
    assert c.gen_compile and c.stats_ablation == "all" and c.restore == "benchmarks/results/dnd_cloze_stages.json"
    assert 1400 <= c.session_left <= 1410 and c.zoo_workers == 3 and c.gen_group == 3 and c.gen_streams
    assert c.state == str(tmp_path / "dnd_state" / "cz") and c.gen_step_seconds == 0.35
    assert not d.gen_compile and d.stats_ablation == "arc_easy,piqa" and d.restore is None
    assert d.nearest_ablation == "arc_easy" and c.nearest_ablation is None
    assert d.gen_step_seconds == 0.3 and 800 <= d.session_left <= 810
    refused = call("D")
    assert refused.returncode == 2 and "needs LEFT" in refused.stderr and refused.stdout == ""
    timed = []  # call E: the zoo's lone step time, with the study's zoo config
    monkeypatch.setattr(bench, "cmd_zoo_alone", lambda args: timed.append(args) or 0)
    out = call("E")
    assert out.returncode == 0, out.stderr
    command = shlex.split(out.stdout)
    assert command[:3] == ["python3", "benchmarks/dnd_bench.py", "zoo-alone"] and bench.main(command[2:]) == 0
    e, = timed
    assert e.config == "r8,lr2e-4,steps250,ckpt50" and e.model == str(tmp_path / "dnd_state" / "smollm2")
    assert (e.steps, e.skip) == (20, 3)


def test_a_restored_state_starts_its_call_history_with_the_committed_one(bench, tmp_path):
    committed = tmp_path / "results" / "dnd_cloze_invocations.jsonl"
    committed.parent.mkdir()
    committed.write_text('{"date": "2026-12-05"}\n')
    history = tmp_path / "state" / "invocations.jsonl"
    history.parent.mkdir()
    bench._seed_invocations(history, committed)
    assert history.read_text() == '{"date": "2026-12-05"}\n'
    # a later call of the same session keeps its own history, which already starts with the committed calls
    history.write_text('{"date": "2026-12-05"}\n{"date": "2026-12-06"}\n')
    bench._seed_invocations(history, committed)
    assert history.read_text() == '{"date": "2026-12-05"}\n{"date": "2026-12-06"}\n'
    # no committed history (a first session): nothing to seed
    fresh = tmp_path / "fresh.jsonl"
    bench._seed_invocations(fresh, tmp_path / "missing.jsonl")
    assert not fresh.exists()


def test_cloze_refuses_an_ablation_outside_the_study_in_one_line_and_starts_nothing(bench, tmp_path):
    state = tmp_path / "state"
    with pytest.raises(SystemExit) as err:
        bench.main(["cloze", "--state", str(state), "--model", "unused", "--generators",
                    "--datasets", "arc_easy,piqa", "--nearest-ablation", "piqa,hellaswag"])
    assert str(err.value) == ("dnd_bench.py cloze: nonearest ablation: commonsense/hellaswag is not among the study's "
                              "datasets; name held-out datasets of this study (commonsense/arc_easy, "
                              "commonsense/piqa)")
    assert not state.exists()  # no state folder, no call history
