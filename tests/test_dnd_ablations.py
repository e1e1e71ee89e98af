"""The cloze study's `nonearest` ablation end to end on CPU (tiny Llama, tiny BERT encoder, three real datasets): the
generator learns neither the held-out dataset nor its nearest training dataset, and the report compares it with
what is left."""

import json

import pytest
import torch
from conftest import tiny
from test_dnd_harness import _tok

from softprompt.dnd.report import build_results, render

DATASETS = ["commonsense/arc_easy", "commonsense/winogrande", "commonsense/piqa"]
CFG = "r2_lr1e-2_steps3_ckpt2_bs4"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_bert_dir):
    from softprompt.dnd.study import Study

    root = tmp_path_factory.mktemp("nonearest")
    folder = root / "tiny-llama"
    tiny("llama").save_pretrained(folder)
    _tok(chat=False).save_pretrained(folder)
    study = Study(root / "state", str(folder), datasets=DATASETS, configs=["r2,lr1e-2,steps3,ckpt2,bs4"], n_eval=6,
                  n_dev=4, batch_size=8, device="cpu", log=lambda m: None, generators=True, encoder=tiny_bert_dir,
                  gen={"steps": 2, "batch_size": 2, "width": 4, "n_layers": 2, "kernel": 3, "chunk": 16,
                       "n_prompts": 4, "max_length": 16, "warmup": 1, "draws": 2, "recovery_draws": 1, "pool": 20,
                       "min_pool": 8},
                  nearest_ablation=["arc_easy"])
    assert study.run() == "complete"
    return study, json.loads(study.export(root / "out").read_text())


def test_the_ablation_runs_after_every_main_generator_and_learns_without_the_nearest(finished):
    study, stages = finished
    names = study.stages()
    abl = f"gen:{CFG}+nonearest:commonsense/arc_easy"
    assert names[-2:] == [abl, f"dnd:{CFG}+nonearest:commonsense/arc_easy"]
    assert all(names.index(abl) > names.index(f"dnd:{CFG}:{d}") for d in DATASETS)
    near = stages[f"dnd:{CFG}:commonsense/arc_easy"]["nearest"]
    left = [d for d in DATASETS if d not in ("commonsense/arc_easy", near)]
    assert stages[abl]["train_datasets"] == left
    gdir = study.gen_dir(study.configs[0], "commonsense/arc_easy", "+nonearest")
    assert json.loads((gdir / "generator_config.json").read_text())["holdout"] == sorted(
        ["commonsense/arc_easy", near])
    far = stages[f"dnd:{CFG}+nonearest:commonsense/arc_easy"]
    assert list(far["similarity"]) == left and far["nearest"] == left[0] and far["recovery"]["dataset"] == left[0]
    assert far["lora_to_match"] is None  # ablations have no cost row


def test_the_report_compares_it_with_the_datasets_it_learned(finished):
    _, stages = finished
    res = build_results(stages, CFG, device="cpu", versions={"torch": torch.__version__}, date="d", command="c",
                        datasets=DATASETS)
    row = res["datasets"]["commonsense/arc_easy"]
    w = row["without_nearest"]
    main_near = stages[f"dnd:{CFG}:commonsense/arc_easy"]["nearest"]
    (kept,) = [d for d in DATASETS[1:] if d != main_near]
    cross = stages[f"cross:{CFG}"]["lora_on"]
    measure = row["measure"]
    assert w["left_out"] == main_near and w["train_datasets"] == [kept]
    assert w["train_lora_mean"] == round(100 * cross[kept]["commonsense/arc_easy"][measure], 2)
    assert w["nearest_lora"] == {"dataset": kept, "acc": w["train_lora_mean"]}  # one dataset left: the same LoRA
    draws = stages[f"dnd:{CFG}+nonearest:commonsense/arc_easy"]["draws"]
    assert w["dnd_mean"] == round(sum(100 * r[measure] for r in draws) / len(draws), 2)
    for k in ("ci_dnd_minus_train_mean", "ci_dnd_minus_nearest", "ci_minus_main_dnd"):
        lo, hi = w[k]
        assert lo <= hi
    lo, hi = w["ci_dnd_minus_train_mean"]  # the interval contains the observed difference
    assert lo - 1e-6 <= w["dnd_mean"] - w["train_lora_mean"] <= hi + 1e-6
    lo, hi = w["ci_minus_main_dnd"]
    assert lo - 1e-6 <= w["dnd_mean"] - row["dnd_mean"] <= hi + 1e-6
    assert w["closest_in_weights"]["dataset"] == kept
    cos = stages[f"dnd:{CFG}+nonearest:commonsense/arc_easy"]["weight_cosine"]["to_final_lora"]
    assert w["cosine_with_left_out"] == cos[main_near] and -1 <= w["cosine_with_left_out"] <= 1
    assert all("without_nearest" not in r for d, r in res["datasets"].items() if d != "commonsense/arc_easy")
    text = render(res)
    assert "Without the nearest dataset" in text
    assert f"| arc_easy | {main_near.split('/')[-1]} | {w['dnd_mean']:.1f} ± {w['dnd_sd']:.1f} | " in text
    assert f"({kept.split('/')[-1]}) | {w['cosine_with_left_out']:+.3f} |" in text


def test_the_ablation_needs_the_main_stage_that_names_the_nearest(tmp_path):
    from softprompt.dnd.study import Study
    from softprompt.dnd.study_gen import left_out

    study = Study(tmp_path / "s", "unused-model", datasets=DATASETS, configs=["r2,lr1e-2,steps3,ckpt2,bs4"],
                  generators=True, log=lambda m: None, nearest_ablation=True)
    cfg = study.configs[0]
    assert left_out(study, cfg, "commonsense/piqa") == ["commonsense/piqa"]  # the main generator
    with pytest.raises(RuntimeError, match=r"dnd:.*piqa must be recorded before its nonearest ablation"):
        left_out(study, cfg, "commonsense/piqa", "nonearest")


def test_the_diagnosis_says_what_the_retrieval_test_found():
    from softprompt.dnd.diagnosis import diagnosis

    def row(lo, hi, near_ci, main_ci):
        return {"valid_target": True, "ci_dnd_minus_train_mean": [-1.0, 1.0], "without_nearest": {
            "left_out": "commonsense/arc_challenge", "dnd_mean": 55.0, "train_lora_mean": 50.0,
            "ci_dnd_minus_train_mean": [lo, hi], "nearest_lora": {"dataset": "commonsense/openbookqa", "acc": 54.0},
            "ci_dnd_minus_nearest": near_ci, "ci_minus_main_dnd": main_ci, "cosine_with_left_out": 0.31}}

    lines = diagnosis([("arc_easy", row(2.0, 8.0, [-1.0, 3.0], [-12.0, -6.0])),
                       ("piqa", row(-1.0, 3.0, [-2.0, 2.0], [-3.0, 1.0]))])
    (line,) = [x for x in lines if "Without the nearest dataset" in x]
    assert "above the mean of the LoRAs it learned on 1 of 2 (arc_easy)" in line
    assert "above its own nearest LoRA on 0 (none)" in line
    # the main DnD minus the ablation: the interval of (ablation − main), negated
    assert "arc_easy without arc_challenge: 55.0 against the mean 50.0" in line
    assert "[+6.0, +12.0], cosine +0.31 with the left-out LoRA" in line


def test_the_diagnosis_says_what_the_stats_code_ablation_found():
    from softprompt.dnd.diagnosis import diagnosis

    def row(ci, main=None, abl=None):
        return {"valid_target": True, "ci_dnd_minus_train_mean": [-1.0, 1.0], "dnd_mean": 34.6,
                "dnd_mean_stats_dnd": 28.6, "ci_stats_dnd_minus_relative": ci, "weight_cosine": main,
                "stats_dnd_weights": abl}

    main = {"own": 0.38, "to_final_lora": {"commonsense/openbookqa": 0.38, "commonsense/arc_easy": 0.93,
                                           "commonsense/piqa": 0.1}}
    abl = {"closest": {"dataset": "commonsense/arc_easy", "cosine": 0.29}, "own": 0.11}
    lines = diagnosis([("arc_easy", row([-1.4, 2.4])), ("openbookqa", row([-9.7, -2.3], main, abl))])
    (line,) = [x for x in lines if "Weight tokenisation" in x]
    assert "scores higher on 0 of 2 (none), within noise on 1 (arc_easy [-1.4, +2.4]) and lower on 1" in line
    assert ("(openbookqa [-9.7, -2.3], 34.6 → 28.6; the updates' cosine with the closest training LoRA falls from "
            "+0.93 (arc_easy) to +0.29 (arc_easy))") in line
    assert line.endswith("Our tokenisation is not what holds DnD back.")
    (up,) = [x for x in diagnosis([("piqa", row([0.5, 3.0]))]) if "Weight tokenisation" in x]
    assert "higher on 1 of 1 (piqa [+0.5, +3.0])" in up and "not what holds" not in up  # no such claim then


def test_the_diagnosis_says_whether_more_generator_training_would_help():
    from softprompt.dnd.diagnosis import diagnosis

    def row(mid, final, ci, steps=(500, 1000)):
        return {"valid_target": True, "ci_dnd_minus_train_mean": [-1.0, 1.0], "budget": {
            "mid_step": steps[0], "final_step": steps[1], "mid": mid, "final": final, "ci_final_minus_mid": ci}}

    lines = diagnosis([("arc_easy", row(63.8, 64.4, [0.1, 1.2])), ("piqa", row(64.9, 65.0, [-0.3, 0.4]))])
    (line,) = [x for x in lines if "Budget" in x]
    assert ("Twice the generator training (step 1000 against step 500) moves DnD by at most 0.6 points: within "
            "noise on 1 of 2 (piqa), elsewhere arc_easy 63.8 → 64.4 [+0.1, +1.2].") in line
    (mixed,) = [x for x in diagnosis([("a", row(1.0, 1.0, [-1, 1])), ("b", row(1.0, 3.5, [-1, 1], (100, 200)))])
                if "Budget" in x]
    assert "(the final generator against the one halfway through its training) moves DnD by at most 2.5 points" in mixed
    assert mixed.endswith("within noise on 2 of 2 (a, b).")


def test_the_diagnosis_compares_checkpoints_and_datasets_with_the_papers_recipe():
    from softprompt.dnd.diagnosis import diagnosis

    def row(ckpt, sets):
        return {"valid_target": True, "ci_dnd_minus_train_mean": [-1.0, 1.0],
                "training_data": {"datasets": sets, "checkpoints_per_dataset": ckpt}}

    (line,) = [x for x in diagnosis([("a", row(50, 6)), ("b", row(50, 6))]) if "Checkpoints and datasets" in x]
    assert "Each generator learned 50 checkpoints of each of 6 training datasets" in line
    assert line.endswith("so neither count falls short of the paper's.")
    (short,) = [x for x in diagnosis([("a", row(50, 6)), ("b", row(5, 2))]) if "Checkpoints and datasets" in x]
    assert "learned at least 5 checkpoints of each of at least 2 training datasets" in short
    assert short.endswith("falls short of it (5 checkpoints against 50, 2 training datasets against 6).")
    assert not [x for x in diagnosis([("a", row(None, 6))]) if "Checkpoints" in x]  # zoo stage missing: no claim


def test_the_report_takes_each_rows_condition_membership_from_the_geometry(finished):
    _, stages = finished
    geometry = {"command": "python benchmarks/dnd_conditions.py", "date": "d", "device": "cpu", "encoder": "minilm",
                "n": 256, "membership": {"commonsense/arc_easy": {"dataset": "commonsense/piqa", "cosine": 0.2,
                                                                  "ratio": 0.5},
                                         "superglue/boolq": {"dataset": "commonsense/piqa", "cosine": 0.0,
                                                             "ratio": 0.0}}}  # not in this study: ignored
    res = build_results(stages, CFG, device="cpu", versions={}, date="d", command="c", datasets=DATASETS,
                        conditions=geometry)
    assert res["condition_geometry"]["command"] == "python benchmarks/dnd_conditions.py"
    assert res["datasets"]["commonsense/arc_easy"]["condition_membership"]["ratio"] == 0.5
    assert "condition_membership" not in res["datasets"]["commonsense/piqa"]
    assert "superglue/boolq" not in res["datasets"]
    plain = build_results(stages, CFG, device="cpu", versions={}, date="d", command="c", datasets=DATASETS)
    assert plain["condition_geometry"] is None


def test_the_report_compares_dnd_with_the_zoo_mean(finished):
    """Does the condition matter? DnD against the zoo mean (the generator's output for a condition it ignores), and
    the zoo mean against the training-LoRA mean, on the same examples."""
    from softprompt.dnd.agreement import answer_agreement
    from softprompt.dnd.intervals import paired_bootstrap

    _, stages = finished
    res = build_results(stages, CFG, device="cpu", versions={}, date="d", command="c", datasets=DATASETS)
    keys = {"acc": "correct", "acc_norm": "correct_norm"}
    for d, row in res["datasets"].items():
        dnd, key = stages[f"dnd:{CFG}:{d}"], keys[row["measure"]]
        n = len(dnd["zoo_mean"][key])
        per_dnd = [sum(r[key][i] for r in dnd["draws"]) / len(dnd["draws"]) for i in range(n)]
        others = [o for o in DATASETS if o != d]
        lora = stages[f"cross:{CFG}"]["lora_on"]
        per_train = [sum(lora[o][d][key][i] for o in others) / len(others) for i in range(n)]
        assert row["ci_dnd_minus_zoo_mean"] == paired_bootstrap(per_dnd, dnd["zoo_mean"][key])
        assert row["ci_zoo_mean_minus_train_mean"] == paired_bootstrap(dnd["zoo_mean"][key], per_train)
        lo, hi = row["ci_dnd_minus_zoo_mean"]  # the interval contains the observed difference
        assert lo - 1e-6 <= row["dnd_mean"] - row["zoo_mean"] <= hi + 1e-6
        # which adapter DnD answers like, example by example (softprompt.dnd.agreement)
        assert row["answer_agreement"] == answer_agreement(per_dnd, dnd["zoo_mean"][key],
                                                           {o: lora[o][d][key] for o in others}, dnd["nearest"])
    ci = res["datasets"]["commonsense/piqa"]["ci_dnd_minus_zoo_mean"]
    assert "| vs zoo mean (95% CI) |" in render(res) and f"[{ci[0]:+.1f}, {ci[1]:+.1f}] |" in render(res)


def test_the_diagnosis_says_whether_the_condition_matters():
    from softprompt.dnd.diagnosis import diagnosis

    def row(train, zoo, zoo_train):
        return {"valid_target": True, "ci_dnd_minus_train_mean": train, "ci_dnd_minus_zoo_mean": zoo,
                "ci_zoo_mean_minus_train_mean": zoo_train}

    lines = diagnosis([("arc_easy", row([6.7, 13.0], [-2.4, 5.2], [5.8, 11.3])),
                       ("openbookqa", row([1.2, 6.3], [0.8, 6.6], [-2.0, 2.4])),
                       ("piqa", row([-0.3, 3.1], [-1.8, 2.7], [-1.0, 1.0]))])
    (line,) = [x for x in lines if "The condition." in x]
    assert "within noise of DnD on 2 of 3 (arc_easy [-2.4, +5.2], piqa [-1.8, +2.7])" in line
    assert "DnD is above it on 1 (openbookqa [+0.8, +6.6])" in line
    assert ("Of the 2 held-out datasets where DnD beats the training-LoRA mean, the zoo mean alone does too on 1 "
            "(arc_easy: zoo mean − training-LoRA mean [+5.8, +11.3])") in line
    (none,) = [x for x in diagnosis([("piqa", row([-0.3, 3.1], [-1.8, 2.7], [-1.0, 1.0]))]) if "The condition." in x]
    assert none.endswith("DnD is above it on 0 (none).")  # no win: nothing to attribute


def test_generated_adapters_are_compared_with_the_zoo_mean_in_weight_space(finished):
    from softprompt.dnd.delta import delta_cosine
    from softprompt.dnd.export import read_lora_tensors
    from softprompt.dnd.study_gen import weight_cosines, zoo_entries

    study, stages = finished
    cfg = study.configs[0]
    mean: dict = {}
    entries = zoo_entries(study, cfg, DATASETS[1:])
    for e in entries:
        for k, v in read_lora_tensors(e["path"]).items():
            mean[k] = mean.get(k, 0) + v.double() / len(entries)
    mean = {k: v.float() for k, v in mean.items()}
    piqa = read_lora_tensors(entries[-1]["path"])
    w = weight_cosines(study, cfg, "commonsense/arc_easy", [piqa, mean], zoo_mean=mean)
    assert w["to_zoo_mean"] == round((delta_cosine(piqa, mean) + 1.0) / 2, 4)  # the mean itself counts 1
    assert weight_cosines(study, cfg, "commonsense/arc_easy", [piqa])["to_zoo_mean"] is None
    for stage in (f"dnd:{CFG}:commonsense/arc_easy", f"dnd:{CFG}+nonearest:commonsense/arc_easy"):
        assert -1 <= stages[stage]["weight_cosine"]["to_zoo_mean"] <= 1
    res = build_results(stages, CFG, device="cpu", versions={}, date="d", command="c", datasets=DATASETS)
    w = res["datasets"]["commonsense/arc_easy"]["without_nearest"]
    cos = stages[f"dnd:{CFG}+nonearest:commonsense/arc_easy"]["weight_cosine"]["to_zoo_mean"]
    assert w["cosine_with_zoo_mean"] == cos
    from softprompt.dnd.diagnosis import diagnosis

    row = {**res["datasets"]["commonsense/arc_easy"], "valid_target": True}  # a tiny model's row is not valid
    (line,) = [x for x in diagnosis([("arc_easy", row)]) if "Without the nearest dataset" in x]
    ci, ab = w["ci_dnd_minus_zoo_token_mean"], w["ci_zoo_token_mean_minus_zoo_mean"]
    assert (f"{cos:+.2f} with the zoo mean, the token-space zoo mean (its exact output for an ignored condition) "
            f"scores {w['zoo_token_mean']:.1f}, this − it [{ci[0]:+.1f}, {ci[1]:+.1f}], the A,B zoo mean (the other "
            f"rows' stand-in for it) {w['zoo_mean']:.1f}, token-space − A,B [{ab[0]:+.1f}, {ab[1]:+.1f}]; answers: "
            f"kappa {w['kappa_with_left_out']:.2f} with the left-out LoRA") in line


def test_dnd_stages_score_the_exact_output_for_an_ignored_condition(finished):
    """The token-space zoo mean (:func:`grid_mean_state` over what the generator learned), scored on the same
    examples, compared in weight space, and paired against DnD in the report."""
    from softprompt.dnd.generator import load_generator
    from softprompt.dnd.hyperconv import grid_mean_state
    from softprompt.dnd.intervals import paired_bootstrap
    from softprompt.dnd.study_gen import weight_cosines, zoo_entries

    study, stages = finished
    cfg = study.configs[0]
    res = build_results(stages, CFG, device="cpu", versions={}, date="d", command="c", datasets=DATASETS)
    for tag, field in (("", None), ("+nonearest", "without_nearest")):
        st = stages[f"dnd:{CFG}{tag}:commonsense/arc_easy"]
        t = st["zoo_token_mean"]
        assert t["n"] == st["zoo_mean"]["n"] and 0 <= t["acc"] <= 1
        assert -1 <= st["weight_cosine"]["to_zoo_token_mean"] <= 1
        row = res["datasets"]["commonsense/arc_easy"]
        m, key = row["measure"], {"acc": "correct", "acc_norm": "correct_norm"}[row["measure"]]
        per = [sum(r[key][i] for r in st["draws"]) / len(st["draws"]) for i in range(t["n"])]
        got = row[field] if field else row
        assert got["zoo_token_mean"] == round(100 * t[m], 2)
        assert got["ci_dnd_minus_zoo_token_mean"] == paired_bootstrap(per, t[key])
        assert got["ci_zoo_token_mean_minus_zoo_mean"] == paired_bootstrap(t[key], st["zoo_mean"][key])
    far = stages[f"dnd:{CFG}+nonearest:commonsense/arc_easy"]
    assert row["without_nearest"]["zoo_mean"] == round(100 * far["zoo_mean"][m], 2)
    w = res["datasets"]["commonsense/arc_easy"]["without_nearest"]
    assert w["cosine_with_zoo_token_mean"] == stages[f"dnd:{CFG}+nonearest:commonsense/arc_easy"][
        "weight_cosine"]["to_zoo_token_mean"]
    gdir = study.gen_dir(cfg, "commonsense/arc_easy", "+nonearest")
    _, _, layout, gcfg = load_generator(gdir, "cpu")
    learned = stages[f"gen:{CFG}+nonearest:commonsense/arc_easy"]["train_datasets"]
    exact = grid_mean_state(zoo_entries(study, cfg, learned), layout, gcfg["target"])
    assert weight_cosines(study, cfg, "commonsense/arc_easy", [exact], token_mean=exact)["to_zoo_token_mean"] == 1.0


def test_the_retrieval_test_asks_whom_the_ablated_generator_answers_like(finished):
    from softprompt.dnd.agreement import answer_agreement, soft_kappa

    _, stages = finished
    res = build_results(stages, CFG, device="cpu", versions={}, date="d", command="c", datasets=DATASETS)
    row = res["datasets"]["commonsense/arc_easy"]
    w, key = row["without_nearest"], {"acc": "correct", "acc_norm": "correct_norm"}[row["measure"]]
    far = stages[f"dnd:{CFG}+nonearest:commonsense/arc_easy"]
    per = [sum(r[key][i] for r in far["draws"]) / len(far["draws"]) for i in range(len(far["zoo_mean"][key]))]
    lora = stages[f"cross:{CFG}"]["lora_on"]
    assert w["kappa_with_left_out"] == round(soft_kappa(per, lora[w["left_out"]]["commonsense/arc_easy"][key]), 3)
    assert w["answer_agreement"] == answer_agreement(
        per, far["zoo_mean"][key], {s: lora[s]["commonsense/arc_easy"][key] for s in w["train_datasets"]},
        far["nearest"])
