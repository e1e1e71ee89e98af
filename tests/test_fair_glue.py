"""benchmarks/fair_glue.py end to end on CPU: a tiny random BERT, a tiny SST-2-shaped task, the three stages
(readout probe, learning rates on the carved split, seeds), a restart that resumes, the JSON and its bootstrap."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.fixture
def tiny_glue(tmp_path, monkeypatch):
    """glue/SST-2 train/dev files over the tiny tokenizer's words."""
    root = tmp_path / "data" / "glue" / "SST-2"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("dev", 40)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            pos = i % 2 == 0
            word = rng.choice(["good", "great", "fine"] if pos else ["bad", "awful", "poor"])
            lines.append(f"the {rng.choice(['movie', 'film'])} was very {word}\t{int(pos)}")
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("SOFTPROMPT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_pipeline_resumes_and_reports(tiny_glue, tiny_bert_dir, monkeypatch):
    import fair_glue

    state = tiny_glue / "state"
    base = [sys.executable, str(BENCH / "fair_glue.py"), "run", "--model", tiny_bert_dir, "--state", str(state),
            "--tasks", "glue/sst2", "--rows", "lpt", "--scratch", str(tiny_glue / "scratch"), "--parallel", "2"]
    first = subprocess.run(base + ["--stages", "readout,lr", "--grid-override", "lpt=0.001"],
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    readout = json.loads((state / "readout.json").read_text())
    assert readout["choice"] in ("pooler", "mean") and set(readout["scores"]["glue/sst2"]) == {"pooler", "mean"}
    (done,) = state.glob("lr__*.json")
    stamp = done.stat().st_mtime_ns
    # Restart with the seeds stage: the finished run is kept, not redone (a one-point grid keeps this test fast).
    monkeypatch.setitem(fair_glue.ROWS, "lpt", ("lpt", {"num_virtual_tokens": 10}, [1e-3]))
    second = subprocess.run(base + ["--stages", "lr,seeds", "--seeds", "1,2", "--grid-override", "lpt=0.001"],
                            capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert done.stat().st_mtime_ns == stamp
    runs = {p.stem: json.loads(p.read_text()) for p in state.glob("*__*.json")}
    seeds = [r for r in runs.values() if r["stage"] == "seeds"]
    assert len(seeds) == 2 and {r["seed"] for r in seeds} == {1, 2}
    assert all(r["readout"] == readout["choice"] and len(r["predictions"]) == 40 for r in seeds)
    lr_runs = [r for r in runs.values() if r["stage"] == "lr"]
    assert all(r["eval_examples"] == 12 and r["train_examples"] == 108 for r in lr_runs)  # the 10% carve
    chosen = max(lr_runs, key=lambda r: (r["score"], -r["lr"]))["lr"]
    assert all(r["lr"] == chosen for r in seeds)
    assert seeds[0]["method_seed"] == 1 and seeds[1]["method_seed"] == 2
    assert all(r["device"] == "cpu" for r in seeds)  # each run names its card (runs come from several machines)
    # The report: the schema of issue 23.
    import fair_glue_report

    data = fair_glue_report.write_json(state, tiny_glue / "fair.json", n_boot=50)
    for key in ("device", "versions", "date", "command", "readout", "tasks", "comparisons"):
        assert key in data
    cell = data["tasks"]["glue/sst2"]["lpt"]
    assert set(cell) >= {"lr", "scores", "mean", "std"} and len(cell["scores"]) == 2
    text = "\n".join(fair_glue_report.fair_section(data, ["lpt"], [("idspam", "lpt_npg")], "Fair"))
    assert f"**{cell['lr']:g}**" in text and "not measured yet" in text


def test_chosen_rate_skips_diverged_rates_and_waits_for_the_grid(monkeypatch):
    import fair_glue

    monkeypatch.setitem(fair_glue.ROWS, "lpt", ("lpt", {}, [1e-3, 1e-2, 3e-2]))
    runs = _lr_runs(fair_glue, "glue/rte", "lpt", {1e-3: 0.6, 1e-2: 0.6})
    assert fair_glue.chosen_lr(runs, "glue/rte", "lpt")[0] is None  # 3e-2 not run yet
    runs.update(_lr_runs(fair_glue, "glue/rte", "lpt", {3e-2: None}))  # diverged
    assert fair_glue.chosen_lr(runs, "glue/rte", "lpt")[0] == 1e-3  # a tie goes to the smaller rate


def _lr_runs(fair_glue, task, row, scores):
    return {fair_glue.run_name("lr", task, row, lr, 1): {"stage": "lr", "task": task, "row": row, "lr": lr, "seed": 1,
                                                         "score": s} for lr, s in scores.items()}


def test_rate_ladder_steps_one_three_ten():
    import fair_glue

    assert [fair_glue.next_rate(x, up=True) for x in (1e-4, 3e-4, 1e-3, 3e-2, 1e-1)] == [3e-4, 1e-3, 3e-3, 1e-1, 3e-1]
    assert [fair_glue.next_rate(x, up=False) for x in (1e-3, 3e-3, 1e-4, 3e-2)] == [3e-4, 1e-3, 3e-5, 1e-2]


def test_grid_grows_past_an_end_that_beats_every_other_rate(monkeypatch):
    """A strict best at the top adds the next rate up (at most twice), and the choice waits for it; a tie or an
    interior best does not extend; a best at the bottom extends downwards."""
    import fair_glue

    monkeypatch.setitem(fair_glue.ROWS, "lpt", ("lpt", {}, [1e-3, 3e-3, 1e-2]))
    runs = _lr_runs(fair_glue, "glue/rte", "lpt", {1e-3: 0.5, 3e-3: 0.6, 1e-2: 0.7})
    assert fair_glue.rate_grid(runs, "glue/rte", "lpt") == [1e-3, 3e-3, 1e-2, 3e-2]
    assert fair_glue.chosen_lr(runs, "glue/rte", "lpt")[0] is None  # 3e-2 pending
    assert fair_glue.chosen_lr(runs, "glue/rte", "lpt", extend=False)[0] == 1e-2
    runs.update(_lr_runs(fair_glue, "glue/rte", "lpt", {3e-2: 0.8}))
    assert fair_glue.rate_grid(runs, "glue/rte", "lpt")[-1] == 1e-1
    runs.update(_lr_runs(fair_glue, "glue/rte", "lpt", {1e-1: 0.9}))
    assert fair_glue.rate_grid(runs, "glue/rte", "lpt") == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]  # the cap: two steps
    assert fair_glue.chosen_lr(runs, "glue/rte", "lpt")[0] == 1e-1
    runs.update(_lr_runs(fair_glue, "glue/rte", "lpt", {1e-1: 0.8}))  # the first extension wins: interior, done
    assert fair_glue.chosen_lr(runs, "glue/rte", "lpt")[0] == 3e-2
    tie = _lr_runs(fair_glue, "glue/cola", "lpt", {1e-3: 0.7, 3e-3: 0.7, 1e-2: 0.5})
    assert fair_glue.rate_grid(tie, "glue/cola", "lpt") == [1e-3, 3e-3, 1e-2]
    assert fair_glue.chosen_lr(tie, "glue/cola", "lpt")[0] == 1e-3  # a tie goes to the smaller rate
    low = _lr_runs(fair_glue, "glue/mrpc", "lpt", {1e-3: 0.7, 3e-3: 0.6, 1e-2: None})
    assert fair_glue.rate_grid(low, "glue/mrpc", "lpt") == [3e-4, 1e-3, 3e-3, 1e-2]


def test_a_rate_whose_seed_run_diverged_gives_way_to_the_next_best(monkeypatch, tmp_path):
    """Seeds that diverge at the chosen rate move the row to the next best rate; the report keeps only the runs at
    the rate in force and lists the unstable one."""
    import fair_glue
    from fair_glue_report import reported_lr, seed_runs

    monkeypatch.setitem(fair_glue.ROWS, "lpt", ("lpt", {}, [1e-3, 3e-3, 1e-2]))
    runs = _lr_runs(fair_glue, "glue/rte", "lpt", {1e-3: 0.6, 3e-3: 0.7, 1e-2: 0.65})
    assert fair_glue.chosen_lr(runs, "glue/rte", "lpt")[0] == 3e-3
    for seed, score in ((1, 0.6), (2, None)):
        runs[fair_glue.run_name("seeds", "glue/rte", "lpt", 3e-3, seed)] = {
            "stage": "seeds", "task": "glue/rte", "row": "lpt", "lr": 3e-3, "seed": seed, "score": score}
    assert fair_glue.unstable_rates(runs, "glue/rte", "lpt") == {3e-3: [2]}
    assert fair_glue.rate_grid(runs, "glue/rte", "lpt") == [1e-3, 3e-3, 1e-2]
    edge = _lr_runs(fair_glue, "glue/cola", "lpt", {1e-3: 0.5, 3e-3: 0.6, 1e-2: 0.7})
    edge[fair_glue.run_name("seeds", "glue/cola", "lpt", 1e-2, 1)] = {
        "stage": "seeds", "task": "glue/cola", "row": "lpt", "lr": 1e-2, "seed": 1, "score": None}
    assert fair_glue.rate_grid(edge, "glue/cola", "lpt") == [1e-3, 3e-3, 1e-2]  # no step past a diverging rate
    assert fair_glue.chosen_lr(edge, "glue/cola", "lpt")[0] == 3e-3
    assert fair_glue.chosen_lr(runs, "glue/rte", "lpt")[0] == 1e-2
    assert reported_lr(runs, "glue/rte", "lpt") == (1e-2, False)
    assert "glue/rte" not in seed_runs(runs)  # the finished seed at 3e-3 is not reported under 1e-2
    runs[fair_glue.run_name("seeds", "glue/rte", "lpt", 1e-2, 1)] = {
        "stage": "seeds", "task": "glue/rte", "row": "lpt", "lr": 1e-2, "seed": 1, "score": 0.62}
    assert [r["score"] for r in seed_runs(runs)["glue/rte"]["lpt"]] == [0.62]


def test_reported_rate_is_provisional_while_an_extension_is_pending(monkeypatch):
    import fair_glue
    from fair_glue_report import reported_lr

    monkeypatch.setitem(fair_glue.ROWS, "lpt", ("lpt", {}, [1e-3, 3e-3, 1e-2]))
    runs = _lr_runs(fair_glue, "glue/rte", "lpt", {1e-3: 0.5, 3e-3: 0.6, 1e-2: 0.7})
    assert reported_lr(runs, "glue/rte", "lpt") == (1e-2, True)
    runs.update(_lr_runs(fair_glue, "glue/rte", "lpt", {3e-2: 0.65}))
    assert reported_lr(runs, "glue/rte", "lpt") == (1e-2, False)
    assert reported_lr(_lr_runs(fair_glue, "glue/rte", "lpt", {1e-3: 0.5}), "glue/rte", "lpt") == (None, False)


@pytest.mark.parametrize("row", ["linear_probe", "lora"])
def test_plain_rows_run_on_the_carved_split(row, tiny_glue, tiny_bert_dir):
    """LoRA and the linear probe go through a plain Trainer with the same carve, readout and seed as the others."""
    pytest.importorskip("peft")
    import fair_glue

    state = tiny_glue / "state"
    state.mkdir()
    job = {"stage": "lr", "task": "glue/sst2", "row": row, "lr": 1e-2, "seed": 3}
    out = fair_glue.run_one(job, tiny_bert_dir, state, False, "mean", tiny_glue / "scratch")
    assert out["eval_examples"] == 12 and out["train_examples"] == 108 and 0 <= out["score"] <= 1
    assert out["readout"] == "mean" and out["trainable_params"] > 0
    assert (state / f"{fair_glue.run_name('lr', 'glue/sst2', row, 1e-2, 3)}.json").exists()


def _five_task_state(tmp_path):
    """Seed runs of APT (85% right) and prefix tuning (75%) on the five tasks; on RTE both predict at random."""
    import fair_glue

    rng = np.random.default_rng(5)
    for task in fair_glue.TASKS:
        y = rng.integers(0, 2, 120)
        for row, right in (("apt", 0.85), ("prefix", 0.75)):
            carved = {lr: 0.8 if lr == 0.01 else 0.5 for lr in fair_glue.ROWS[row][2]}  # 0.01 chosen, inside the grid
            for name, run in _lr_runs(fair_glue, task, row, carved).items():
                (tmp_path / f"{name}.json").write_text(json.dumps(run))
            for seed in range(1, 4):
                pred = rng.integers(0, 2, 120) if task == "glue/rte" else np.where(rng.random(120) < right, y, 1 - y)
                run = {"stage": "seeds", "task": task, "row": row, "lr": 0.01, "seed": seed, "metric": "accuracy",
                       "score": float((pred == y).mean()), "predictions": pred.tolist(), "labels": y.tolist(),
                       "trainable_params": 1}
                (tmp_path / f"{fair_glue.run_name('seeds', task, row, 0.01, seed)}.json").write_text(json.dumps(run))


def test_mean_without_tasks_at_chance_for_both_rows(tmp_path):
    """Five tasks, on one of which both rows predict at random: fair_glue.json has the five-task mean and the mean
    over the other four, the markdown says which tasks it keeps, and the at-chance task is flagged."""
    import fair_glue
    from fair_glue_report import fair_section, write_json

    _five_task_state(tmp_path)
    data = write_json(tmp_path, tmp_path / "fair.json", n_boot=200)
    assert data["tasks"]["glue/rte"]["apt"]["above_chance"] is False
    assert all(data["tasks"][t]["apt"]["above_chance"] for t in fair_glue.TASKS if t != "glue/rte")
    by = {c["task"]: c for c in data["comparisons"] if (c["a"], c["b"]) == ("apt", "prefix")}
    assert set(by) == {*fair_glue.TASKS, "mean5", "mean_above_chance"}
    assert by["mean_above_chance"]["tasks"] == [t for t in fair_glue.TASKS if t != "glue/rte"]
    assert by["mean_above_chance"]["ci"][0] > 0  # 85% against 75% right on four tasks
    text = "\n".join(fair_section(data, ["apt", "prefix"], [("apt", "prefix")], "Fair"))
    assert ("Without glue/rte (both at chance there; mean of glue/sst2, glue/mrpc, glue/cola, superglue/cb)"
            in text)
    assert "glue/rte" in text and "(both at chance)" in text


def test_readme_block_is_generated_between_its_markers(tmp_path):
    """benchmarks/fair_readme.py rewrites only the marked block: seed means with the chance mark, and each claim's
    five-task interval beside the one without at-chance tasks; a README without markers is left alone."""
    from fair_glue_report import write_json
    from fair_readme import BEGIN, END, update

    _five_task_state(tmp_path)
    data = write_json(tmp_path, tmp_path / "fair.json", n_boot=200)
    readme = tmp_path / "README.md"
    readme.write_text(f"# before\n\n{BEGIN}\nold text\n{END}\n\nafter\n")
    assert update(readme, data)
    text = readme.read_text()
    assert text.startswith("# before\n\n" + BEGIN + "\n") and text.endswith(END + "\n\nafter\n")
    assert "old text" not in text and "| APT | " in text and " † |" in text  # RTE at chance
    line = next(x for x in text.splitlines() if x.startswith("* APT − prefix tuning"))
    assert "mean of the five tasks" in line and "without RTE, where both are at chance," in line
    hits = next(x for x in text.splitlines() if x.startswith("Intervals of these claims that exclude 0: "))
    assert "APT − prefix tuning (P-tuning v2) on SST-2 " in hits and "on the five-task mean" in hits
    assert "on RTE" not in hits  # both predict at random there
    assert update(readme, data) and readme.read_text() == text  # idempotent
    assert "STS-B" not in text
    assert f"issue 23; {data['runs']['seeds']} seed runs so far, " in text  # 3 of 5 seeds per cell
    full = {**data, "tasks": {t: {r: {**c, "scores": c["scores"] + c["scores"][:2]} for r, c in cells.items()}
                              for t, cells in data["tasks"].items()}}
    assert update(readme, full)
    assert f"issue 23; {data['runs']['seeds']} seed runs, 5 seeds per cell" in readme.read_text()
    assert update(readme, data) and readme.read_text() == text
    data["tasks"]["glue/stsb"] = {"apt": {"mean": 81.25, "std": 0.5, "scores": [81.0, 81.5], "above_chance": True}}
    assert update(readme, data)
    table = readme.read_text().splitlines()
    assert "| method | SST-2 | MRPC | RTE | CoLA | CB | STS-B (apart) |" in table
    assert next(x for x in table if x.startswith("| APT | ")).endswith("| 81.2 ± 0.5 |")
    assert next(x for x in table if x.startswith("| prefix tuning")).endswith("| – |")
    assert any(x.startswith("STS-B (Pearson x 100) is a regression extension") for x in table)
    assert not any(x.startswith("Seeds that disagree") for x in table) and "‡" not in readme.read_text()
    data["tasks"]["glue/stsb"]["apt"].update(scores=[81.0, 20.5, 75.0], std=32.9)
    data["tasks"]["glue/cola"]["apt"]["provisional"] = True
    assert update(readme, data)
    text = readme.read_text()
    assert "glue/stsb APT (81.0, 20.5, 75.0)." in text  # a seed collapse is shown seed by seed
    assert "‡ at a provisional rate" in text and text.count(" ‡ |") == 1
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    assert not update(bare, data) and bare.read_text() == "no markers\n"


@pytest.mark.parametrize("row", ["prompt", "lora"])
def test_stsb_runs_as_regression_with_the_shared_readout(row, tiny_glue, tiny_bert_dir):
    """STS-B, reported beside the five tasks, goes through the same run: a regression head on the mean readout,
    scored by Pearson correlation (a prompt-method row and a plain-Trainer row)."""
    pytest.importorskip("peft")
    import fair_glue

    root = tiny_glue / "data" / "glue" / "STS-B"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split, n in (("train", 120), ("dev", 40)):
        lines = [head]
        for i in range(n):
            same = rng.random() < 0.5
            a, b = rng.choice(["movie", "film"]), rng.choice(["good", "bad"])
            lines.append(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\tthe {a} was {b}\tthe {a if same else 'plane'} was "
                         f"{b}\t{5.0 if same else 1.0:.3f}")
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    state = tiny_glue / "state"
    state.mkdir()
    job = {"stage": "seeds", "task": "glue/stsb", "row": row, "lr": 1e-2, "seed": 2}
    out = fair_glue.run_one(job, tiny_bert_dir, state, False, "mean", tiny_glue / "scratch")
    assert out["metric"] == "pearson" and out["readout"] == "mean" and -1 <= out["score"] <= 1
    assert out["eval_examples"] == 40 and len(out["predictions"]) == 40  # the dev split, kept for the bootstrap
    assert all(isinstance(p, float) for p in out["predictions"]) and out["labels"][0] in (1.0, 5.0)  # scores
    assert (state / f"{fair_glue.run_name('seeds', 'glue/stsb', row, 1e-2, 2)}.json").exists()


def test_stsb_is_compared_apart_and_stays_out_of_the_means(tmp_path):
    """With STS-B seeds present, each claim gets an STS-B interval of its own, and the five-task means are those
    of the state without STS-B."""
    import shutil

    import fair_glue
    from fair_glue_report import write_json

    (tmp_path / "five").mkdir()
    _five_task_state(tmp_path / "five")
    shutil.copytree(tmp_path / "five", tmp_path / "six")
    rng = np.random.default_rng(9)
    y = rng.uniform(0, 5, 80)
    for row, noise in (("apt", 0.5), ("prefix", 2.0)):
        carved = {lr: 0.8 if lr == 0.01 else 0.5 for lr in fair_glue.ROWS[row][2]}
        for name, run in _lr_runs(fair_glue, "glue/stsb", row, carved).items():
            (tmp_path / "six" / f"{name}.json").write_text(json.dumps(run))
        for seed in range(1, 4):
            pred = y + rng.normal(0, noise, 80)
            run = {"stage": "seeds", "task": "glue/stsb", "row": row, "lr": 0.01, "seed": seed, "metric": "pearson",
                   "score": float(np.corrcoef(pred, y)[0, 1]), "predictions": pred.tolist(), "labels": y.tolist(),
                   "trainable_params": 1}
            (tmp_path / "six" / f"{fair_glue.run_name('seeds', 'glue/stsb', row, 0.01, seed)}.json").write_text(
                json.dumps(run))
    five, six = (write_json(tmp_path / d, tmp_path / f"{d}.json", n_boot=200) for d in ("five", "six"))
    by = {c["task"]: c for c in six["comparisons"] if (c["a"], c["b"]) == ("apt", "prefix")}
    assert by["glue/stsb"]["ci"][0] > 0  # apt's predictions are far less noisy
    assert by["mean5"] == next(c for c in five["comparisons"] if (c["a"], c["b"], c["task"]) == ("apt", "prefix",
                                                                                                  "mean5"))
    assert six["tasks"]["glue/stsb"]["apt"]["metric"] == "pearson"
