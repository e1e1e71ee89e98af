"""The verdict line of dnd.md (issue 21) and where the ``nonearest`` generator's updates land: each sentence is
computed from the rows, so each is checked both ways (the claim met and missed, a cause small and large)."""

from softprompt.dnd.diagnosis import NEGLIGIBLE_POINTS, diagnosis, verdict


def _row(win: bool, near=(-1.0, 1.0), **extra) -> dict:
    return {"valid_target": True, "ci_dnd_minus_train_mean": [0.5, 3.0] if win else [-1.0, 2.0],
            "ci_dnd_minus_nearest": list(near), **extra}


def _far(near_ci, closest="commonsense/openbookqa", most_alike="commonsense/openbookqa", dnd=59.5) -> dict:
    return {"left_out": "commonsense/arc_challenge", "dnd_mean": dnd, "train_lora_mean": 52.5,
            "ci_dnd_minus_train_mean": [3.9, 10.2], "nearest_lora": {"dataset": "commonsense/openbookqa", "acc": 59.8},
            "ci_dnd_minus_nearest": list(near_ci), "ci_minus_main_dnd": [-8.1, -1.2],
            "closest_in_weights": {"dataset": closest, "cosine": 0.9667},
            "answer_agreement": {"kappa_zoo_mean": 0.63, "most_alike": most_alike,
                                 "kappa_lora": {"commonsense/openbookqa": 0.983, "commonsense/piqa": 0.7},
                                 "ci_kappa_nearest_minus_zoo_mean": [0.29, 0.43]}}


def test_the_verdict_counts_the_claim_against_the_same_share_of_valid_targets():
    five = [(f"d{i}", _row(i < 5)) for i in range(7)]
    (line,) = verdict(five)
    assert "is reproduced here: 5 of 7 valid targets." in line
    # 6 valid targets: the paper's 5 of 7 is a share, so 5 are still needed; 4 is not enough
    (line,) = verdict([(f"d{i}", _row(i < 4)) for i in range(6)])
    assert "is not reproduced here: 4 of 6 valid targets." in line
    assert verdict([]) == []


def test_the_verdict_rules_out_only_causes_that_are_small():
    rec = {"dataset": "commonsense/arc_challenge", "generated": 34.4, "own_lora": 34.8}
    budget = {"final_step": 1000, "mid_step": 500, "mid": 63.8, "final": 64.4, "ci_final_minus_mid": [0.1, 1.2]}
    data = {"checkpoints_per_dataset": 50, "datasets": 6}
    small = _row(False, in_distribution_recovery=rec, budget=budget, training_data=data,
                 ci_stats_dnd_minus_relative=[-1.4, 2.4])
    (line,) = verdict([("arc_easy", small)])
    assert ("Ruled out: capacity (recovery within 0.4 points); budget (twice the training moves it by at most 0.6); "
            "weight tokenisation (DnD's own code higher on 0 of 1); too few checkpoints or training datasets") in line
    big = _row(False, in_distribution_recovery={**rec, "generated": 34.8 - NEGLIGIBLE_POINTS - 0.5},
               budget={**budget, "final": 63.8 + NEGLIGIBLE_POINTS + 0.5}, training_data={**data, "datasets": 2},
               ci_stats_dnd_minus_relative=[0.5, 3.0])
    (line,) = verdict([("arc_easy", big)])
    assert "Ruled out" not in line  # every cause is large enough here to matter
    (line,) = verdict([("arc_easy", _row(True, in_distribution_recovery=rec))])
    assert "Ruled out" not in line  # the claim holds: nothing to explain


def test_the_verdict_calls_it_retrieval_only_when_dnd_does_not_beat_its_nearest_lora():
    (line,) = verdict([("arc_easy", _row(False, without_nearest=_far([-1.0, 0.4]))), ("piqa", _row(False))])
    assert ("within noise on 2 of 2, above on 0 and below on 0; without that dataset it is above its new nearest LoRA "
            "on 0 of 1.") in line
    assert "mostly retrieval" in line
    (line,) = verdict([("arc_easy", _row(False, without_nearest=_far([0.04, 2.42], dnd=60.9)))])
    assert "above its new nearest LoRA on 1 of 1 (arc_easy +1.1 [+0.0, +2.4], its updates at cosine +0.97" in line
    assert "mostly retrieval" not in line  # beyond the nearest on every ablation tried
    (line,) = verdict([("arc_easy", _row(False, near=(0.5, 2.0)))])
    assert "above on 1" in line and "mostly retrieval" not in line
    (line,) = verdict([("arc_easy", _row(False, near=(-4.0, -0.5)))])
    assert "below on 1" in line and "mostly retrieval" not in line  # worse than the LoRA it would retrieve


def test_the_nonearest_line_says_where_the_updates_and_answers_land():
    rows = [("arc_easy", _row(False, without_nearest=_far([-1.0, 0.4]))),
            ("openbookqa", _row(False, without_nearest=_far([-1.0, 0.4], closest="commonsense/piqa",
                                                            most_alike="commonsense/piqa")))]
    (line,) = [x for x in diagnosis(rows) if "Without the nearest dataset" in x]
    assert ("Its updates are closest in weights to its new nearest LoRA on 1 of 2 (arc_easy +0.97; cosine), and it "
            "answers most like that LoRA on 1 (arc_easy 0.98; kappa).") in line
    assert diagnosis(rows)[-1].startswith("- **Verdict.**")
