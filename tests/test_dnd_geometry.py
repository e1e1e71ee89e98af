"""softprompt.dnd.geometry against hand-computed cosines on embeddings built to known angles."""

import math

import pytest
import torch

from softprompt.dnd.geometry import condition_geometry


def _at(*angles_deg):
    """Unit vectors in the plane at the given angles, as [N, 2] float64."""
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles_deg],
                        dtype=torch.float64)


def test_cosines_shares_and_membership_match_the_closed_form():
    train = {"a": _at(-10, 10), "b": _at(80, 100), "c": _at(170, 190)}  # centroids at 0, 90 and 180 degrees
    held = {"a": _at(30, 50)}  # centroid at 40 degrees: nearer b (50 degrees away) than c (140)
    g = condition_geometry(train, held)
    cos = g["centroid_cosine"]["a"]
    assert cos["a"] == pytest.approx(math.cos(math.radians(40)), abs=1e-4)
    assert cos["b"] == pytest.approx(math.cos(math.radians(50)), abs=1e-4)
    assert cos["c"] == pytest.approx(math.cos(math.radians(140)), abs=1e-4)
    assert g["spread"] == {d: pytest.approx(math.cos(math.radians(10)), abs=1e-4) for d in "abc"}
    # prompt at 30 degrees is nearer a's centroid (0), the one at 50 nearer b's (90): half and half
    assert g["assigned"]["a"]["all"] == {"a": 50.0, "b": 50.0, "c": 0.0} and g["assigned"]["a"]["accuracy"] == 50.0
    assert g["assigned"]["a"]["without_own"] == {"b": 100.0, "c": 0.0}
    to_b = (math.cos(math.radians(60)) + math.cos(math.radians(40))) / 2
    assert g["held_out_to_nearest"]["a"] == pytest.approx(to_b, abs=1e-4)
    m = g["membership"]["a"]
    assert m["dataset"] == "b" and m["cosine"] == pytest.approx(to_b, abs=1e-4)
    assert m["ratio"] == pytest.approx(to_b / math.cos(math.radians(10)), abs=1e-3)


def test_a_held_out_dataset_needs_its_training_prompts():
    with pytest.raises(ValueError, match="without training prompts: \\['z'\\]"):
        condition_geometry({"a": _at(0)}, {"z": _at(0)})


def test_the_benchmark_writes_json_and_markdown_for_the_study_prompts(tmp_path, tiny_bert_dir):
    import json

    from conftest import load_benchmark

    stages = tmp_path / "stages.json"
    stages.write_text(json.dumps({"dnd:cfg:commonsense/arc_easy": {"nearest": "commonsense/piqa"},
                                  "dnd:cfg+statsdnd:commonsense/arc_easy": {"nearest": "ignored: an ablation"}}))
    bench = load_benchmark("dnd_conditions")
    assert bench.main(["--datasets", "arc_easy,piqa", "--encoder", tiny_bert_dir, "--n", "8", "--max-length", "16",
                       "--stages", str(stages), "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "dnd_conditions.json").read_text())
    assert res["datasets"] == ["commonsense/arc_easy", "commonsense/piqa"]
    assert res["n_prompts"] == {"commonsense/arc_easy": [8, 8], "commonsense/piqa": [8, 8]}
    assert res["study_nearest"] == {"commonsense/arc_easy": "commonsense/piqa"}
    assert res["membership"]["commonsense/arc_easy"]["dataset"] == "commonsense/piqa"  # the only other one
    md = (tmp_path / "dnd_conditions.md").read_text()
    row = res["centroid_cosine"]["commonsense/arc_easy"]
    assert f"| arc_easy | {row['commonsense/arc_easy']:.3f} | piqa {row['commonsense/piqa']:.3f} |" in md
    assert md.count("\n| ") == 3  # the header and one row per dataset


def test_the_report_carries_the_geometry_and_the_diagnosis_reads_it():
    from softprompt.dnd.diagnosis import diagnosis

    def row(ratio, near, dnd, mean):
        return {"valid_target": True, "ci_dnd_minus_train_mean": [-1.0, 1.0], "dnd_mean": dnd,
                "train_lora_mean": mean, "condition_membership": {"dataset": near, "ratio": ratio, "cosine": 0.3}}

    lines = diagnosis([("piqa", row(0.77, "commonsense/hellaswag", 64.9, 63.5)),
                       ("arc_easy", row(0.93, "commonsense/arc_challenge", 64.1, 54.4)),
                       ("winogrande", row(0.43, "commonsense/openbookqa", 54.5, 53.9))])
    (line,) = [x for x in lines if "Condition geometry" in x]
    assert ("arc_easy 0.93 (arc_challenge): +9.7; piqa 0.77 (hellaswag): +1.4; "
            "winogrande 0.43 (openbookqa): +0.6") in line
    assert "Spearman's rank correlation between the two: +1.00 over 3 datasets" in line
    assert "one-sided exact permutation p = 0.167 (all 6 orderings" in line  # 1 of 3! orderings reaches +1
    (two,) = [x for x in diagnosis([("piqa", row(0.77, "commonsense/hellaswag", 64.9, 63.5)),
                                    ("arc_easy", row(0.93, "commonsense/arc_challenge", 64.1, 54.4))])
              if "Condition geometry" in x]
    assert "Spearman" not in two  # two points: no correlation reported


def test_pooled_embeddings_average_the_real_tokens_only(tiny_bert_dir):
    from softprompt.dnd.condition import ConditionEncoder

    enc = ConditionEncoder(tiny_bert_dir, 16, "cpu")
    prompts = ["good movie", "the film was very bad"]
    states, mask = enc.encode(prompts)
    pooled = enc.pooled(prompts)
    for i in range(2):
        real = states[i][mask[i]]  # padding rows are excluded, not averaged in as zeros
        assert mask[i].sum() < 16 and torch.allclose(pooled[i], real.mean(0), atol=1e-6)
