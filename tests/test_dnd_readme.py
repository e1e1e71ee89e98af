"""benchmarks/dnd_readme.py: the README's Drag-and-Drop block comes from dnd_cloze.json (gate, valid targets, one
row per held-out dataset with its intervals), between its markers only."""

from conftest import load_benchmark

dnd_readme = load_benchmark("dnd_readme")
BEGIN, END, update = dnd_readme.BEGIN, dnd_readme.END, dnd_readme.update


def _results(with_dnd: bool) -> dict:
    row = {"measure": "acc_norm", "chance": 25.0, "majority": 27.0, "base": 48.6, "valid_target": True,
           "own_lora": 68.4, "train_lora_mean": 54.4, "dnd_mean": None}
    if with_dnd:
        row.update(dnd_mean=64.1, dnd_sd=0.4, dnd_draws=10, ci_dnd_minus_train_mean=[6.7, 13.0],
                   ci_dnd_minus_nearest=[-1.1, 1.8], nearest_lora={"dataset": "commonsense/arc_challenge", "acc": 63.8},
                   generate_seconds=0.149, lora_to_match={"step": 25, "train_seconds": 6.64})
    boolq = {"measure": "acc_cal", "chance": 50.0, "majority": 64.4, "base": 57.8, "valid_target": False,
             "dnd_mean": None}
    return {"device": "GPU X", "date": "2026-12-05T12:00:00", "datasets": {"commonsense/arc_easy": row,
                                                                         "superglue/boolq": boolq},
            "zoo_gate": {"mean_gain": 5.69, "datasets_gaining_3": 5, "n_datasets": 7, "passes": True}}


def test_block_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# top\n\n{BEGIN}\nold\n{END}\n\nbottom\n")
    assert update(readme, _results(with_dnd=False))
    text = readme.read_text()
    assert text.startswith("# top\n\n" + BEGIN + "\n") and text.endswith(END + "\n\nbottom\n") and "old" not in text
    assert "above chance on 2 of 2 datasets" in text and "boolq (57.8 against 64.4)" in text
    assert "passes its gate (own LoRA +5.7 points" in text and "No leave-one-out generator has run" in text
    assert update(readme, _results(with_dnd=True))
    text = readme.read_text()
    row = next(x for x in text.splitlines() if x.startswith("| arc_easy |"))
    assert "| 64.1 ± 0.4 (10) | 68.4 | +9.7 [+6.7, +13.0], above | +0.3 [-1.1, +1.8], within noise |" in row
    assert "6.6 s (25 steps) against 0.15 s to generate" in row
    assert "beats the training-LoRA mean on 1 of 1 valid held-out targets" in text
    assert "nearest training LoRA on 0 of 1" in text
    assert "may have shared the GPU" in text  # the LoRA's seconds: worker count not recorded
    assert update(readme, _results(with_dnd=True)) and readme.read_text() == text  # idempotent
    alone = _results(with_dnd=True)
    alone["datasets"]["commonsense/arc_easy"]["lora_to_match"]["zoo_workers"] = 1
    assert update(readme, alone) and "shared the GPU" not in readme.read_text()
    bare = tmp_path / "bare.md"
    bare.write_text("none\n")
    assert not update(bare, _results(with_dnd=True)) and bare.read_text() == "none\n"


def test_block_counts_the_zoo_mean_and_the_answers_once_recorded(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    res = _results(with_dnd=True)
    assert update(readme, res)
    text = readme.read_text()
    assert "(1 of 2 held-out datasets so far;" in text and "zoo mean" not in text and "kappa" not in text
    res["datasets"]["commonsense/arc_easy"].update(
        ci_dnd_minus_zoo_mean=[-2.4, 5.2],
        answer_agreement={"ci_kappa_nearest_minus_zoo_mean": [0.25, 0.40]})
    res["datasets"]["superglue/boolq"].update(
        dnd_mean=54.4, dnd_sd=0.9, dnd_draws=10, ci_dnd_minus_train_mean=[-4.4, 1.4], train_lora_mean=55.8,
        nearest_lora={"dataset": "commonsense/openbookqa", "acc": 60.2}, own_lora=64.4, generate_seconds=0.088)
    assert update(readme, res)
    text = readme.read_text()
    assert "(2 of 2 held-out datasets;" in text  # all in: no "so far"
    assert "and the zoo mean (about what it would output if it ignored its condition) on 0 of 1." in text
    assert "answers more like its nearest training LoRA than like the zoo mean on 1 of 1 (Cohen's kappa)" in text
    assert "scale code" not in text and "weight tokenisation" not in text  # no stats-code ablation yet
    res["datasets"]["commonsense/arc_easy"]["ci_stats_dnd_minus_relative"] = [-9.7, -2.3]
    assert update(readme, res)
    text = readme.read_text()
    assert ("With DnD's own scale code for the weight tokens' statistics instead of ours it scores higher on 0 of 1 "
            "held-out datasets tried and lower on 1.") in text
    assert "(headroom, retrieval, the condition, answers, capacity, weight tokenisation)" in text
    res["datasets"]["commonsense/arc_easy"]["budget"] = {"ci_final_minus_mid": [0.1, 1.2]}
    assert update(readme, res) and "(headroom, retrieval, the condition, answers, capacity, budget, weight " \
        "tokenisation) and the verdict" in readme.read_text()
    assert "Trained without" not in readme.read_text()  # no nonearest ablation yet
    res["datasets"]["commonsense/arc_easy"]["without_nearest"] = {"ci_dnd_minus_nearest": [-1.0, 0.4]}
    assert update(readme, res)
    text = readme.read_text()
    assert ("Trained without the dataset nearest to the held-out one as well, it is above its new nearest training "
            "LoRA on 0 of 1 held-out datasets tried.") in text
    assert "weight tokenisation, without the nearest dataset) and the verdict" in text
