"""The report's per-dataset measure (acc for BoolQ and WinoGrande), valid targets (base above chance and majority),
balanced accuracy of unbalanced binary datasets, stale-format notes, and the BoolQ format probe's statistics."""

import pytest

from softprompt.dnd import format_probe as P
from softprompt.dnd.cloze import primary_measure
from softprompt.dnd.report import build_results, render

BQ, ARC = "superglue/boolq", "commonsense/arc_easy"


def _score(correct, correct_norm, chance, majority, correct_cal=None):
    n = len(correct)
    res = {"n": n, "acc": sum(correct) / n, "acc_norm": sum(correct_norm) / n, "chance": chance,
           "majority": majority, "correct": correct, "correct_norm": correct_norm}
    if correct_cal is not None:
        res.update(acc_cal=sum(correct_cal) / n, correct_cal=correct_cal)
    return res


def test_primary_measure_validity_and_balanced_accuracy():
    assert primary_measure("boolq") == "acc_cal" and primary_measure("winogrande") == "acc"
    assert primary_measure("arc_easy") == "acc_norm"
    gold = [1, 1, 1, 0]  # majority 75 %
    # acc_cal 50 (says no thrice), acc 25, acc_norm 75 (always yes)
    base_bq = _score([0, 0, 0, 1], [1, 1, 1, 0], 0.5, 0.75, correct_cal=[0, 0, 1, 1])
    own_bq = _score([1, 1, 1, 0], [1, 1, 1, 0], 0.5, 0.75, correct_cal=[1, 1, 1, 0])
    base_arc = _score([1, 0, 1, 0], [1, 1, 1, 0], 0.25, 0.25)
    stages = {"base": {"datasets": {BQ: {"test": base_bq, "dev": base_bq}, ARC: {"test": base_arc, "dev": base_arc}},
                       "formats": {BQ: 1, ARC: 1}},
              "zoo:c:" + BQ: {"test": own_bq, "dev": own_bq}, "zoo:c:" + ARC: {"test": base_arc, "dev": base_arc}}
    res = build_results(stages, "c", device="cpu", versions={}, date="d", command="x", datasets=[BQ, ARC],
                        golds={BQ: gold, ARC: gold})
    bq, arc = res["datasets"][BQ], res["datasets"][ARC]
    assert res["measures"] == {BQ: "acc_cal", ARC: "acc_norm"} and bq["measure"] == "acc_cal"
    assert bq["base"] == 50.0 and bq["base_other_measure"] == 25.0 and arc["base"] == 75.0
    assert bq["valid_target"] is False and arc["valid_target"] is True  # 50 is not above the majority rate 75
    # base answers yes on 1 of 3 yes-questions and no on the no-question: recalls 1/3 and 1, balanced 66.67
    assert bq["binary"]["base"] == {"balanced_acc": 66.67, "option1_rate": 25.0}
    assert bq["binary"]["own_lora"] == {"balanced_acc": 50.0, "option1_rate": 100.0}  # always yes
    assert "binary" not in arc  # four options
    g = res["zoo_gate"]
    assert g["mean_gain"] == 12.5 and g["valid_targets"] == {"n_datasets": 1, "mean_gain": 0.0,
                                                             "datasets_gaining_3": 0}
    text = render(res)
    assert "acc_norm; acc_cal for boolq" in text and "Not a valid held-out target" in text
    assert "boolq (base 50.0 acc_cal, chance 50.0, majority 75.0)" in text and "On the 1 valid targets" in text
    acc_only = build_results(stages, "c", "acc", device="cpu", versions={}, date="d", command="x", datasets=[BQ, ARC])
    assert acc_only["datasets"][ARC]["base"] == 50.0 and "binary" not in acc_only["datasets"][BQ]
    assert acc_only["datasets"][BQ]["base"] == 25.0
    del base_bq["acc_cal"]  # stages of BoolQ's format v1 have no acc_cal: the row falls back to acc, marked stale
    old = build_results(stages, "c", device="cpu", versions={}, date="d", command="x", datasets=[BQ, ARC])
    assert old["datasets"][BQ]["measure"] == "acc" and old["datasets"][BQ]["base"] == 25.0
    assert old["datasets"][BQ]["format"] == 1 and "Stale:" in render(old)


def test_stale_format_is_named(monkeypatch):
    from softprompt.dnd import cloze

    s = _score([1, 0], [1, 0], 0.5, 0.5)
    stages = {"base": {"datasets": {BQ: {"test": s, "dev": s}}}}  # no formats recorded: v1
    monkeypatch.setitem(cloze.FORMAT_VERSIONS, BQ, 2)  # (the current version; set for clarity)
    res = build_results(stages, "c", device="cpu", versions={}, date="d", command="x", datasets=[BQ])
    assert res["datasets"][BQ]["format"] == 1 and res["datasets"][BQ]["format_current"] == 2
    assert "Stale: these stages predate the current cloze format of boolq (format v1, current v2)" in render(res)


def test_probe_statistics():
    assert P.auc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0 and P.auc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert P.auc([1, 1], [1, 0]) == 0.5
    lp = [[-1.0, -2.0], [-3.0, -2.0], [-1.0, -1.1], [-2.0, -1.0]]  # log p(yes), log p(no)
    r = P._summary(lp, [1, 0, 0, 0], " yes", " no", n_boot=50)
    assert r["yes_rate"] == 50.0 and r["acc"] == 75.0 and r["balanced_acc"] == pytest.approx(83.33, abs=0.01)
    # per byte: -1/4 > -2/3, -3/4 < -2/3, -1/4 > -1.1/3, -2/4 > -1/3? no: acc_norm answers yes, no, yes, no
    assert r["acc_norm"] == 75.0 and r["auc"] == 1.0 and r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1]
    c = P._summary(lp, [1, 0, 0, 0], " yes", " no", n_boot=50, cal=0.5)  # yes only where it leads by > 0.5
    assert c["yes_rate_cal"] == 25.0 and c["acc_cal"] == 100.0 and c["balanced_acc_cal"] == 100.0
    assert c["acc"] == r["acc"] and c["calibration"] == 0.5
    recs = P.probe_records(5)
    assert len(recs) == 5 and all(set(x) >= {"text", "text_pair", "label"} for x in recs)
    assert P.CONTEXTS["helm"]("P.", "is it") == "Passage: P.\nQuestion: Is it?\nAnswer:"
    assert P.CONTEXTS["lm-eval"]("P.", "is it") == "P.\nQuestion: is it?\nAnswer:"
    from softprompt.dnd.cloze import cloze_example

    ex = cloze_example("boolq", {"text": "P.", "text_pair": "is it", "label": 1})
    assert P.CONTEXTS["2-shot lm-eval"]("P.", "is it") == ex.contexts[1]  # the probe scores format v2 itself
