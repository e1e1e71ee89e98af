"""Metrics against hand-computed float64 reference values (no scipy / sklearn / seqeval needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from softprompt import tasks as T
from softprompt.tasks import metrics as M


def test_accuracy_and_binary_f1():
    assert M.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    # tp=2 fp=1 fn=1 -> P=R=F1=2/3
    assert M.precision_recall_f1([1, 1, 0, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # tp=1 fp=2 fn=0 -> P=1/3 R=1 F1=2/(2+2)=0.5
    assert M.precision_recall_f1([1, 1, 1], [1, 0, 0]) == pytest.approx((1 / 3, 1.0, 0.5))
    assert M.f1_binary([0, 0], [0, 0]) == 0.0
    with pytest.raises(ValueError):
        M.accuracy([0, 1], [0])


def test_macro_f1_and_mcc_multiclass():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 2, 0]
    # per-class F1: c0 tp1 fp1 fn1 -> 1/2; c1 tp2 fp1 fn0 -> 4/5; c2 tp1 fp0 fn1 -> 2/3
    assert M.macro_f1(p, y) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # confusion rows (true) [1,1,0],[0,2,0],[1,0,1]: c=4 s=6 t=[2,2,2] q=[2,3,1]
    # cov = 4*6 - (4+6+2) = 12 ; s^2 - q.q = 36-14 = 22 ; s^2 - t.t = 36-12 = 24
    assert M.matthews_corrcoef(p, y) == pytest.approx(12 / math.sqrt(22 * 24), abs=1e-12)
    # A class that is only predicted counts by default: c2 has tp0 fp1 fn0 -> F1 0 ; c0 2/3 ; c1 1.
    assert M.macro_f1([0, 2, 1, 1], [0, 0, 1, 1]) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert M.macro_f1([0, 2, 1, 1], [0, 0, 1, 1], classes=[0, 1]) == pytest.approx((2 / 3 + 1) / 2)


def test_mcc_binary_matches_textbook_formula():
    p = [1, 1, 0, 1, 0]
    y = [1, 0, 0, 1, 1]
    tp, tn, fp, fn = 2, 1, 1, 1
    ref = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.matthews_corrcoef(p, y) == pytest.approx(ref, abs=1e-12)
    assert M.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction
    assert M.matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert M.matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)


def test_mcc_with_unequal_true_and_predicted_margins():
    """The cases above have as many predicted as true examples per class (t == q), where swapping the two margins
    in the denominator changes nothing; here they differ (true counts 5/3, predicted 4/4)."""
    y = [1, 1, 1, 0, 0, 0, 0, 0]
    p = [1, 1, 0, 1, 1, 0, 0, 0]
    tp, tn, fp, fn = 2, 3, 2, 1
    ref = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.matthews_corrcoef(p, y) == pytest.approx(ref, abs=1e-12) == pytest.approx(4 / math.sqrt(240))


def test_pearson_spearman_hand_values():
    x = [1, 2, 3, 4, 5]
    y = [2, 4, 5, 4, 5]
    # dx=[-2,-1,0,1,2], dy=[-2,0,1,0,1]: sum dxdy=6, sum dx^2=10, sum dy^2=6
    assert M.pearson(x, y) == pytest.approx(6 / math.sqrt(60), abs=1e-12)
    # ranks of y with ties: [1, 2.5, 4.5, 2.5, 4.5]; sum dxdy=7, sum dy^2=9
    assert M.rankdata(y).tolist() == [1.0, 2.5, 4.5, 2.5, 4.5]
    assert M.spearman(x, y) == pytest.approx(7 / math.sqrt(90), abs=1e-12)
    assert M.rankdata([10, 20, 20, 30, 10]).tolist() == [1.5, 3.5, 3.5, 5.0, 1.5]
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_spearman_exact_p_counts_orderings_by_hand():
    # n = 4: rho = 1 - sum(d^2) / 10; over the 24 orderings sum(d^2) takes 0 once, 2 three times, 4 once, 6 four
    # times (then 8, 10, ...), so P(rho >= 0.8) = 4/24, P(rho >= 0.6) = 5/24 and P(rho >= 0.4) = 9/24.
    assert M.spearman_exact_p([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 24, abs=1e-15)  # sum(d^2) = 2
    assert M.spearman_exact_p([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(5 / 24, abs=1e-15)  # sum(d^2) = 4
    assert M.spearman_exact_p([1, 2, 3, 4], [1, 3, 4, 2]) == pytest.approx(9 / 24, abs=1e-15)  # sum(d^2) = 6
    assert M.spearman_exact_p([1, 2, 3, 4], [4, 3, 2, 1]) == 1.0  # every ordering is at least rho = -1
    assert M.spearman_exact_p(range(6), range(6)) == pytest.approx(1 / 720, abs=1e-15)
    # ties keep average ranks: y ranks [1.5, 1.5, 3]; 2 of its 6 orderings reach the observed rho
    assert M.spearman_exact_p([1, 2, 3], [5, 5, 7]) == pytest.approx(2 / 6, abs=1e-15)
    with pytest.raises(ValueError, match="2 to 9 paired values"):
        M.spearman_exact_p(range(10), range(10))


def test_pearson_float64_on_float32_input():
    rng = np.random.default_rng(0)
    a = rng.normal(size=5000).astype(np.float32) + 1e4  # large offset: float32 arithmetic would lose digits
    b = (a - 1e4) * 0.5 + rng.normal(size=5000).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    da, db = a64 - a64.mean(), b64 - b64.mean()
    ref = float((da * db).sum() / math.sqrt((da * da).sum() * (db * db).sum()))
    assert M.pearson(a, b) == pytest.approx(ref, abs=1e-12)
    # spearman without ties equals pearson of argsort-ranks
    ra = np.empty(5000)
    ra[np.argsort(a64, kind="mergesort")] = np.arange(1, 5001)
    rb = np.empty(5000)
    rb[np.argsort(b64, kind="mergesort")] = np.arange(1, 5001)
    if len(np.unique(a)) == 5000 and len(np.unique(b)) == 5000:
        assert M.spearman(a, b) == pytest.approx(M.pearson(ra, rb), abs=1e-12)


def test_entities_conlleval_rules():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-ORG", "I-PER", "B-MISC", "B-MISC"]
    assert M.get_entities(tags) == [("PER", 0, 1), ("LOC", 3, 4), ("ORG", 5, 5), ("PER", 6, 6),
                                    ("MISC", 7, 7), ("MISC", 8, 8)]
    assert M.get_entities(["I-PER"]) == [("PER", 0, 0)]
    assert M.get_entities(["O", "O"]) == []


def test_entity_scores():
    y = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    p = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    # gold entities 3, predicted 3, correct 2 -> P=R=F1=2/3 ; tokens 5/6
    s = M.entity_scores(p, y)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3) and s["accuracy"] == pytest.approx(5 / 6)
    # partial span is wrong: gold PER(0,1), predicted PER(0,0)
    assert M.entity_f1([["B-PER", "O"]], [["B-PER", "I-PER"]]) == 0.0


def test_compute_metrics_token_classification_ids_and_padding():
    spec = T.get_task("conll2003")
    names = spec.label_names
    gold = [[names.index(t) for t in s] for s in (["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"])]
    pred = [[names.index(t) for t in s] for s in (["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"])]
    lab = np.full((2, 6), -100)
    prd = np.zeros((2, 6), dtype=int)
    for i, (g, q) in enumerate(zip(gold, pred)):
        lab[i, 1:1 + len(g)] = g
        prd[i, 1:1 + len(q)] = q
    out = T.compute_metrics(spec, prd, lab)
    assert out["f1"] == pytest.approx(2 / 3) and out["main"] == out["f1"]
    assert T.compute_metrics("conll2003", pred, gold)["f1"] == pytest.approx(2 / 3)


def test_compute_metrics_classification_variants():
    mrpc = T.compute_metrics("glue/mrpc", [1, 1, 0, 1, 0], [1, 0, 0, 1, 1])
    assert mrpc["accuracy"] == pytest.approx(0.6) and mrpc["f1"] == pytest.approx(2 / 3)
    assert mrpc["accuracy_f1_mean"] == pytest.approx((0.6 + 2 / 3) / 2) == mrpc["main"]
    cola = T.compute_metrics("glue/cola", np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]]), [1, 0, 0])
    assert cola["accuracy"] == pytest.approx(2 / 3) and cola["main"] == cola["matthews_correlation"]
    cb = T.compute_metrics("superglue/cb", [0, 1, 2, 2], [0, 1, 2, 1])
    assert cb["main"] == cb["accuracy"] == 0.75 and "macro_f1" in cb
    mrc = T.compute_metrics("superglue/multirc", [1, 0, 1, 1], [1, 0, 0, 1], groups=["a", "a", "b", "c"])
    assert mrc["exact_match"] == pytest.approx(2 / 3) and mrc["main"] == mrc["f1"] == pytest.approx(0.8)
    stsb = T.compute_metrics("glue/stsb", [1, 2, 3, 4, 5], [2.0, 4.0, 5.0, 4.0, 5.0])
    assert stsb["main"] == pytest.approx(6 / math.sqrt(60)) and stsb["spearman"] == pytest.approx(7 / math.sqrt(90))
    assert stsb["pearson_spearman_mean"] == pytest.approx((6 / math.sqrt(60) + 7 / math.sqrt(90)) / 2)
    assert stsb["mse"] == pytest.approx((1 + 4 + 4 + 0 + 0) / 5)  # errors -1, -2, -2, 0, 0
    mc = T.compute_metrics("commonsense/arc_easy", np.array([[0.1, 0.5, -np.inf], [3.0, 0.0, 1.0]]), [1, 2])
    assert mc["accuracy"] == 0.5 and mc["main"] == 0.5
    with pytest.raises(ValueError, match="unlabeled"):
        T.compute_metrics("glue/sst2", [0, 1], [None, None])


def test_exact_match_by_group():
    """A group counts only if every member is right, wherever the wrong one sits in it."""
    assert M.exact_match_by_group([1, 0, 1], [1, 1, 1], ["q1", "q1", "q2"]) == 0.5
    assert M.exact_match_by_group([0, 1, 1], [1, 1, 1], ["q1", "q1", "q2"]) == 0.5  # first member wrong
    assert M.exact_match_by_group([1, 0, 1, 1], [1, 1, 1, 1], ["a", "b", "a", "b"]) == 0.5  # interleaved groups
