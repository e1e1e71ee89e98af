"""The benchmark suites name the runs the results files need (benchmarks/baselines.py), with the right splits and
method options; a variant name maps to exactly one method configuration."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import baselines


def test_suites_cover_the_issue_tables():
    core = set(baselines.suite("core"))
    assert {(t, m) for t in baselines.GLUE4 for m in ("prompt", "ptuning", "prefix", "lpt", "peft_lora",
                                                      "linear_probe", "full_ft")} <= core
    apt = baselines.suite("apt")
    assert ("conll2003", "apt") in apt and ("superglue/wsc@fewshot", "prefix") in apt
    # PT-2* reads the APT adapters: every PT-2* task has its APT run in the same suite, listed before it.
    for task in baselines.APT_TASKS:
        assert apt.index((task, "apt")) < apt.index((task, "pt2star"))
    sweep = baselines.suite("sweep")
    assert len(sweep) == 2 * 2 * 6 and ("glue/mrpc", "lpt_L0") in sweep
    with pytest.raises(SystemExit, match="unknown suite"):
        baselines.suite("nope")


@pytest.mark.parametrize("name,expected", [
    ("idspam_L4", ("idspam", {"layer": 4})), ("lpt_L0", ("lpt", {"layer": 0})),
    ("idspam_meanpool", ("idspam", {"pooling": "mean"})), ("prefix_shift", ("prefix", {"shift_positions": True})),
    ("pt2star", ("prefix", {})), ("apt", ("apt", {})),
])
def test_variant_names(name, expected):
    assert baselines.method_of(name) == expected


def test_fewshot_task_keys_and_step_estimates():
    assert baselines.split_task("superglue/rte@fewshot") == ("superglue/rte", {"train_split": "train32",
                                                                               "eval_split": "val"})
    assert baselines.split_task("glue/rte") == ("glue/rte", {})
    assert baselines.estimated_steps("superglue/cb@fewshot") == baselines.FEWSHOT_EPOCHS
    assert baselines.estimated_steps("glue/rte") == 78 * 20  # ceil(2490 / 32) batches x 20 epochs


def test_idspam_report_tables_and_sweep_plot_from_run_files(tmp_path):
    """The ID-SPAM results file is computed from run JSONs: a missing run reads "not run", the sweep table holds
    mean ± std over seeds, and the sweep figure is written."""
    import method_tables

    runs = tmp_path / "runs"
    runs.mkdir()
    def write(task, method, seed, acc):
        rec = {"task": task, "method": method, "seed": seed, "eval_accuracy": acc, "eval_accuracy_f1_mean": acc,
               "trainable_params": 123, "train_seconds": 1.0}
        (runs / f"{task.replace('/', '_')}__{method}__{seed}.json").write_text(json.dumps(rec))
    write("glue/rte", "idspam", 1, 0.60)
    write("glue/rte", "idspam", 2, 0.62)
    for layer in range(6):
        write("glue/rte", f"lpt_L{layer}", 1, 0.50 + layer / 100)
        write("glue/rte", f"lpt_L{layer}", 2, 0.52 + layer / 100)
    rows = method_tables.load_runs(runs)
    png = tmp_path / "sweep.png"
    text = method_tables.idspam_report(rows, str(png))
    assert "| glue/rte (accuracy) | 61.0 ± 1.4 (2) | not run |" in text
    assert "| glue/rte | lpt | 51.0 ± 1.4 | 52.0 ± 1.4 |" in text
    assert "| glue/mrpc | idspam | - | - |" in text
    assert png.stat().st_size > 1000


def test_pt2star_lengths_come_from_the_seed_1_apt_run_of_the_task(tiny_bert_dir, tmp_path):
    from softprompt.cli import main

    task = "superglue/cb@fewshot"
    with pytest.raises(SystemExit, match="no finished APT adapter"):
        baselines.pt2_lengths(task, str(tmp_path))
    adapter = tmp_path / "adapters" / baselines._name(task, "apt", baselines.PT2_SOURCE_SEED)
    assert main(["train", "--method", "apt", "--model", tiny_bert_dir, "--task", "superglue/cb", "--train-split",
                 "train32", "--eval-split", "val", "--max-steps", "1", "--num-virtual-tokens", "4",
                 "--max-length", "32", "--output", str(adapter)]) == 0
    lengths = baselines.pt2_lengths(task, str(tmp_path))
    config = json.loads((Path(tiny_bert_dir) / "config.json").read_text())
    assert len(lengths) == config["num_hidden_layers"]
    assert sum(lengths) == baselines.PT2_BUDGET and all(n >= 0 for n in lengths)


def test_runner_reruns_apt_for_pt2star_and_starts_pt2star_once_its_adapter_exists(tmp_path, monkeypatch):
    """The scheduler of `baselines.py run` with the training subprocess faked: finished runs are skipped, an APT run
    whose JSON exists but whose adapter is missing is made again before everything else, PT-2* starts only after
    its APT adapter exists, and PT-2* of a task whose APT run fails is reported as not started."""
    out = tmp_path / "runs"
    out.mkdir()
    for task in ("glue/rte", "glue/mrpc"):  # APT seed 1 finished on another machine: JSON only
        (out / f"{baselines._name(task, 'apt', 1)}.json").write_text("{}")
    (out / f"{baselines._name('glue/rte', 'prefix', 1)}.json").write_text("{}")
    started: list = []

    class Done:
        def __init__(self, rc):
            self.returncode, self.stderr = rc, "boom"

    def fake_run(cmd, **kw):
        task, method, seed = (cmd[cmd.index(f)+1] for f in ("--task", "--method", "--seed"))
        started.append((task, method, seed))
        if method == "pt2star":
            assert (baselines.apt_adapter(task, str(out)) / "metrics.json").exists()
        if method == "apt" and task == "glue/mrpc":
            return Done(1)
        if method == "apt":
            adapter = baselines.apt_adapter(task, str(out))
            adapter.mkdir(parents=True)
            (adapter / "metrics.json").write_text("{}")
        (out / f"{baselines._name(task, method, int(seed))}.json").write_text(json.dumps({"steps": 0}))
        return Done(0)

    monkeypatch.setattr(baselines.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["baselines.py", "run", "--tasks", "glue/rte,glue/mrpc",
                                      "--methods", "prefix,pt2star", "--seeds", "1,2", "--out", str(out),
                                      "--parallel", "2"])
    assert baselines.main() == 0
    assert set(started[:2]) == {("glue/rte", "apt", "1"), ("glue/mrpc", "apt", "1")}
    assert ("glue/rte", "prefix", "1") not in started  # finished before
    assert {("glue/rte", "pt2star", "1"), ("glue/rte", "pt2star", "2")} <= set(started)
    assert not any(j[0] == "glue/mrpc" and j[1] == "pt2star" for j in started)
    assert len(started) == 2 + 3 + 2  # 2 APT reruns, 3 prefix runs, 2 RTE PT-2* runs


def test_recorded_paths_name_no_machine_folders(monkeypatch, tmp_path):
    """benchmarks/portable.py: $OUT, the home folder and the repository root are written as $OUT, $HOME and '.'
    everywhere in a JSON-like record; other values are untouched."""
    import portable

    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out) + "/")
    home = str(Path("~").expanduser())
    root = str(portable.ROOT)
    rec = {"command": f"python x.py --model {home}/state/minilm --export {out}/r.json --data {root}/data",
           "paths": [f"{home}/a", (f"{root}/b", 3)], "n": 1.5, "none": None}
    assert portable.portable(rec) == {
        "command": "python x.py --model $HOME/state/minilm --export $OUT/r.json --data ./data",
        "paths": ["$HOME/a", ("./b", 3)], "n": 1.5, "none": None}
