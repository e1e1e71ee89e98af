"""The statistics of benchmarks/fair_glue_report.py: resampled metrics, bootstrap and verdicts, chance check."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_bootstrap_metrics_match_the_task_metrics():
    """The vectorised resample metrics equal softprompt's metrics on the identity resample."""
    from fair_glue_report import resampled

    from softprompt import tasks

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    p = np.where(rng.random((3, 60)) < 0.7, y, 1 - y)
    idx = np.arange(60)[None]
    for task in ("glue/cola", "glue/mrpc", "glue/sst2"):
        spec = tasks.get_task(task)
        got = resampled(spec.metric, p, y, idx)[:, 0]
        want = [tasks.compute_metrics(spec, row, y)["main"] for row in p]
        np.testing.assert_allclose(got, want, atol=1e-12)
    y3 = rng.integers(0, 3, 50)
    p3 = np.where(rng.random((2, 50)) < 0.6, y3, (y3 + 1) % 3)
    got = resampled("matthews_correlation", p3, y3, np.arange(50)[None])[:, 0]
    want = [tasks.compute_metrics(tasks.get_task("superglue/cb"), row, y3)["matthews_correlation"] for row in p3]
    np.testing.assert_allclose(got, want, atol=1e-12)
    ys = rng.normal(size=40)
    ps = ys[None] + rng.normal(size=(2, 40))
    got = resampled("pearson", ps, ys, np.arange(40)[None])[:, 0]
    want = [tasks.compute_metrics(tasks.get_task("glue/stsb"), row, ys)["pearson"] for row in ps]
    np.testing.assert_allclose(got, want, atol=1e-10)


def test_bootstrap_interval_and_verdicts():
    """A method right on 90% of the examples against one right on 60%: the interval excludes 0; the same method
    against itself: the interval contains 0; verdict sentences follow the interval."""
    from fair_glue_report import bootstrap, fair_section, verdict

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)

    def runs(p_right):
        out = []
        for s in range(5):
            pred = np.where(rng.random(200) < p_right, y, 1 - y)
            out.append({"seed": s, "metric": "accuracy", "score": float((pred == y).mean()),
                        "predictions": pred.tolist(), "labels": y.tolist()})
        return out

    data = {"glue/sst2": {"idspam": runs(0.9), "lpt_npg": runs(0.6), "prompt": runs(0.6)}}
    diff, ci = bootstrap(data, ["glue/sst2"], "idspam", "lpt_npg", 500)
    assert 25 < diff < 35 and 0 < ci[0] < diff < ci[1]
    diff, ci = bootstrap(data, ["glue/sst2"], "prompt", "lpt_npg", 500)
    assert ci[0] < 0 < ci[1]
    assert "holds" in verdict({"task": "mean5", "diff": 30.0, "ci": [25.0, 35.0]}, "idspam", "lpt_npg")
    assert "within noise" in verdict({"task": "mean5", "diff": 1.0, "ci": [-1.0, 3.0]}, "apt", "prefix")
    assert "not measured" in verdict(None, "apt", "prefix")
    assert fair_section(None, ["apt"], [("apt", "prefix")], "T")[0] == "## T"


def test_chance_check_separates_informed_from_label_mix_predictions():
    """Predictions right on 80% of the examples are above chance; predictions that only copy the label mix (the
    labels shuffled) and constant predictions are not; the permutation scores equal a direct loop; the majority
    score is the constant predictor's metric."""
    from fair_glue_report import chance_check, permuted

    from softprompt import tasks

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)

    def runs(make):  # five seeds' predictions; metric and score are set per metric below
        return [{"seed": s, "predictions": make().tolist(), "labels": y.tolist()} for s in range(5)]

    informed = runs(lambda: np.where(rng.random(300) < 0.8, y, 1 - y))
    mix = runs(lambda: rng.permutation(y))
    constant = runs(lambda: np.ones(300, dtype=int))
    for metric in ("accuracy", "matthews_correlation"):
        for rs in (informed, mix, constant):
            for r in rs:
                r["metric"] = metric
                spec = tasks.get_task({"accuracy": "glue/sst2", "matthews_correlation": "glue/cola"}[metric])
                r["score"] = tasks.compute_metrics(spec, np.asarray(r["predictions"]), y)["main"]
        assert chance_check(informed, 400)["above_chance"] is True
        assert chance_check(mix, 400)["above_chance"] is False
        assert chance_check(constant, 400)["above_chance"] is False
        majority = 100 * max((y == 1).mean(), (y == 0).mean()) if metric == "accuracy" else 0.0  # MCC: 0
        assert chance_check(constant, 10)["majority"] == round(majority, 2)
    preds = np.asarray([r["predictions"] for r in informed])
    perms = np.stack([rng.permutation(300) for _ in range(7)])
    got = permuted("matthews_correlation", preds, y, perms)
    spec = tasks.get_task("glue/cola")
    want = [[tasks.compute_metrics(spec, row[perm], y)["main"] for perm in perms] for row in preds]
    np.testing.assert_allclose(got, want, atol=1e-12)
