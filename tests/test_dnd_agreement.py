"""softprompt.dnd.agreement: Cohen's kappa on hand-counted cases, its bootstrap gap, and the report's answers line."""

import random

import pytest

from softprompt.dnd.agreement import answer_agreement, kappa_gap_interval, soft_kappa


def test_soft_kappa_is_cohens_kappa_by_hand():
    # 3 of 4 agree; accuracies 1/2 and 1/4 agree by chance on 1/2·1/4 + 1/2·3/4 = 1/2: kappa (3/4 − 1/2) / (1/2)
    assert soft_kappa([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.5, abs=1e-15)
    assert soft_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert soft_kappa([1, 0], [0, 1]) == -1.0
    # half of DnD's draws right on each: agreement 1/2 with anything of accuracy 1/2, which chance gives too
    assert soft_kappa([0.5, 0.5], [1, 0]) == 0.0
    assert soft_kappa([1, 1], [1, 1]) == 0.0  # chance agreement already 1: undefined, reported as 0
    with pytest.raises(ValueError, match="two equal, non-empty lists"):
        soft_kappa([1], [1, 0])


def test_the_kappa_gap_interval_resamples_examples():
    rng = random.Random(1)
    x = [rng.random() for _ in range(200)]
    y = [float(v > 0.5) for v in x]  # follows x
    z = [float(rng.random() > 0.5) for _ in x]  # does not
    assert kappa_gap_interval(x, y, y) == [0.0, 0.0]  # the same reference twice: no gap in any resample
    lo, hi = kappa_gap_interval(x, y, z)
    assert 0 < lo <= soft_kappa(x, y) - soft_kappa(x, z) <= hi
    with pytest.raises(ValueError, match="three equal lists"):
        kappa_gap_interval(x, y, z[:-1])


def test_answer_agreement_names_the_lora_dnd_answers_like():
    dnd = [1, 1, 0, 0, 1, 0]
    res = answer_agreement(dnd, [1, 0, 1, 0, 1, 0], {"a": [1, 1, 0, 0, 1, 0], "b": [0, 0, 1, 1, 0, 1]}, "b")
    assert res["kappa_lora"] == {"a": 1.0, "b": -1.0} and res["most_alike"] == "a"
    assert res["kappa_zoo_mean"] == round(soft_kappa(dnd, [1, 0, 1, 0, 1, 0]), 3)
    assert res["ci_kappa_nearest_minus_zoo_mean"] == kappa_gap_interval(dnd, [0, 0, 1, 1, 0, 1], [1, 0, 1, 0, 1, 0])


def test_the_diagnosis_says_which_adapter_dnd_answers_like():
    from softprompt.dnd.diagnosis import diagnosis

    def row(gap, most, k, zoo, closest):
        return {"valid_target": True, "ci_dnd_minus_train_mean": [-1.0, 1.0],
                "answer_agreement": {"kappa_zoo_mean": zoo, "kappa_lora": {most: k, "x/other": 0.1},
                                     "most_alike": most, "ci_kappa_nearest_minus_zoo_mean": gap},
                "weight_cosine": {"to_final_lora": {closest: 0.9, "x/other": 0.2}, "own": 0.1}}

    lines = diagnosis([("openbookqa", row([0.17, 0.29], "c/arc_easy", 0.96, 0.73, "c/arc_easy")),
                       ("piqa", row([-0.08, 0.02], "c/openbookqa", 0.89, 0.83, "c/hellaswag"))])
    (line,) = [x for x in lines if "**Answers.**" in x]
    assert "than like the zoo mean on 1 of 2 (openbookqa [+0.17, +0.29]; kappa difference); not on piqa" in line
    assert "openbookqa: arc_easy's 0.96 against the zoo mean's 0.73; piqa: openbookqa's 0.89" in line
    assert line.endswith("closest in weight space on 1 of 2 (openbookqa).")


def test_bootstrap_interval_draws_the_same_resamples_for_every_statistic():
    from softprompt.dnd.intervals import bootstrap_interval

    rng = random.Random(3)  # the resamples, drawn by hand in the documented order
    sums = sorted(sum(rng.randrange(10) for _ in range(10)) for _ in range(40))
    assert bootstrap_interval(sum, 10, n_boot=40, seed=3, level=0.5) == (sums[10], sums[30])
    assert bootstrap_interval(lambda idx: -sum(idx), 10, n_boot=40, seed=3, level=0.5) == (-sums[29], -sums[9])
