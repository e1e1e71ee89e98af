"""Task metrics in pure numpy (float64), no scikit-learn / scipy / seqeval.

Conventions: undefined quantities (F1 with no positives anywhere, correlation of a constant
vector, MCC with an empty margin) are reported as 0.0, as scikit-learn does for F1/MCC.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100


def _arr(x: Any, dtype: Any = None) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensors without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check(pred: np.ndarray, lab: np.ndarray) -> None:
    if pred.shape != lab.shape:
        raise ValueError(f"predictions and labels differ in shape: {pred.shape} vs {lab.shape}")
    if pred.size == 0:
        raise ValueError("no examples")


def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of exact matches."""
    p, y = _arr(predictions).ravel(), _arr(labels).ravel()
    _check(p, y)
    return float(np.mean(p == y))


def precision_recall_f1(predictions: Any, labels: Any, pos_label: Any = 1) -> tuple[float, float, float]:
    """Precision, recall and F1 of class ``pos_label`` (0.0 where undefined)."""
    p, y = _arr(predictions).ravel(), _arr(labels).ravel()
    _check(p, y)
    tp = float(np.sum((p == pos_label) & (y == pos_label)))
    fp = float(np.sum((p == pos_label) & (y != pos_label)))
    fn = float(np.sum((p != pos_label) & (y == pos_label)))
    return _prf(tp, fp, fn)


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    prec = tp / (tp + fp) if tp + fp > 0 else 0.0
    rec = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0
    return prec, rec, f1


def f1_binary(predictions: Any, labels: Any, pos_label: Any = 1) -> float:
    """F1 of the positive class ``pos_label`` (default 1)."""
    return precision_recall_f1(predictions, labels, pos_label)[2]


def macro_f1(predictions: Any, labels: Any, classes: Sequence[Any] | None = None) -> float:
    """Unweighted mean of per-class F1 over ``classes`` (default: classes seen in labels or predictions)."""
    p, y = _arr(predictions).ravel(), _arr(labels).ravel()
    _check(p, y)
    cls = list(classes) if classes is not None else sorted(set(np.unique(y).tolist()) | set(np.unique(p).tolist()))
    return float(np.mean([f1_binary(p, y, c) for c in cls]))


def matthews_corrcoef(predictions: Any, labels: Any) -> float:
    """Matthews correlation coefficient, multiclass form (Gorodkin 2004, as in scikit-learn)."""
    p, y = _arr(predictions).ravel(), _arr(labels).ravel()
    _check(p, y)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    yi, pi = inv[: len(y)], inv[len(y):]
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (yi, pi), 1.0)
    t = cm.sum(axis=1)  # true counts per class
    q = cm.sum(axis=0)  # predicted counts per class
    c = np.trace(cm)
    s = cm.sum()
    cov_ytyp = c * s - float(t @ q)
    cov_ypyp = s * s - float(q @ q)
    cov_ytyt = s * s - float(t @ t)
    if cov_ypyp == 0 or cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation in float64 (0.0 if either input is constant)."""
    a, b = _arr(x, np.float64).ravel(), _arr(y, np.float64).ravel()
    _check(a, b)
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt(np.dot(a, a) * np.dot(b, b))
    if den == 0:
        return 0.0
    return float(np.clip(np.dot(a, b) / den, -1.0, 1.0))


def rankdata(x: Any) -> np.ndarray:
    """1-based ranks with ties given their average rank (``scipy.stats.rankdata(method="average")``)."""
    a = _arr(x, np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    sa = a[order]
    n = len(a)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.concatenate([[True], sa[1:] != sa[:-1]]))
    ends = np.concatenate([starts[1:], [n]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation: Pearson of average ranks (ties handled)."""
    return pearson(rankdata(x), rankdata(y))


def spearman_exact_p(x: Any, y: Any, max_n: int = 9) -> float:
    """One-sided exact permutation p-value of Spearman's rho: the share of all ``n!`` orderings of ``y`` whose
    rho is at least the observed one (ties kept as average ranks). For the handful of points where asymptotic
    approximations mislead; refuses ``n > max_n`` (``n!`` orderings)."""
    from itertools import permutations

    rx, ry = rankdata(x), rankdata(y)
    if len(rx) != len(ry) or not 2 <= len(rx) <= max_n:
        raise ValueError(f"spearman_exact_p needs 2 to {max_n} paired values, got {len(rx)} and {len(ry)}")
    observed = pearson(rx, ry) - 1e-12  # a permutation tying the observed rho counts, despite rounding
    hits = total = 0
    for perm in permutations(ry):
        total += 1
        hits += pearson(rx, np.asarray(perm)) >= observed
    return hits / total


# ---------------------------------------------------------------- entities (IOB1/IOB2/IOBES)
def _split_tag(tag: str) -> tuple[str, str]:
    if tag in ("O", "", None):
        return "O", ""
    if len(tag) > 1 and tag[1] in "-_" and tag[0] in "BIES":
        return tag[0], tag[2:]
    return "I", tag  # bare type: treat as inside


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag != "O" and prev_type != type_


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag != "O" and prev_type != type_


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity chunks ``(type, start, end_inclusive)`` of one tag sequence, conlleval rules.

    As in conlleval/seqeval's default mode, ``I-X`` after ``O`` or after a different type starts a
    new entity, and a type change ends one.
    """
    out = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, t in enumerate(list(tags) + ["O"]):
        tag, type_ = _split_tag(t)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            out.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return out


def _to_tag_seqs(predictions: Any, labels: Any, label_names: Sequence[str] | None
                 ) -> tuple[list[list[str]], list[list[str]]]:
    preds_out, labs_out = [], []
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predicted sequences but {len(labels)} label sequences")
    for ps, ls in zip(predictions, labels):
        ps = ps if isinstance(ps, list) else _arr(ps).ravel().tolist()
        ls = ls if isinstance(ls, list) else _arr(ls).ravel().tolist()
        if len(ps) < len(ls):
            raise ValueError(f"a predicted sequence is shorter ({len(ps)}) than its labels ({len(ls)})")
        pp, ll = [], []
        for p, lab in zip(ps, ls):
            if isinstance(lab, (int, np.integer)) and not isinstance(lab, bool) and lab == IGNORE_INDEX:
                continue
            pp.append(_name(p, label_names))
            ll.append(_name(lab, label_names))
        preds_out.append(pp)
        labs_out.append(ll)
    return preds_out, labs_out


def _name(x: Any, label_names: Sequence[str] | None) -> str:
    if isinstance(x, str):
        return x
    if label_names is None:
        raise ValueError("integer tags need label_names")
    return label_names[int(x)]


def entity_scores(predictions: Iterable[Any], labels: Iterable[Any], label_names: Sequence[str] | None = None
                  ) -> dict[str, float]:
    """Entity-level micro precision / recall / F1 and token accuracy for tagged sequences.

    Args:
        predictions, labels: one sequence per sentence, of tag strings or of tag ids (then
            ``label_names`` maps ids to tags). Positions whose label is -100 are dropped (padding /
            sub-word positions as produced by HF token-classification collators). Padded 2-D
            arrays work too.
    Returns:
        ``{"precision", "recall", "f1", "accuracy"}`` (accuracy = token-level).
    """
    preds, labs = _to_tag_seqs(list(predictions), list(labels), label_names)
    tp = n_pred = n_true = 0
    correct = total = 0
    for p, y in zip(preds, labs):
        pe, ye = set(get_entities(p)), set(get_entities(y))
        tp += len(pe & ye)
        n_pred += len(pe)
        n_true += len(ye)
        correct += sum(a == b for a, b in zip(p, y))
        total += len(y)
    prec, rec, f1 = _prf(tp, n_pred - tp, n_true - tp)
    return {"precision": prec, "recall": rec, "f1": f1, "accuracy": correct / total if total else 0.0}


def entity_f1(predictions: Iterable[Any], labels: Iterable[Any], label_names: Sequence[str] | None = None) -> float:
    """Entity-level micro F1 (see :func:`entity_scores`)."""
    return entity_scores(predictions, labels, label_names)["f1"]


def exact_match_by_group(predictions: Any, labels: Any, groups: Sequence[Any]) -> float:
    """Fraction of groups (e.g. MultiRC questions) whose every member is predicted correctly."""
    p, y = _arr(predictions).ravel(), _arr(labels).ravel()
    _check(p, y)
    if len(groups) != len(p):
        raise ValueError(f"{len(groups)} groups for {len(p)} predictions")
    ok: dict[Any, bool] = {}
    for g, a, b in zip(groups, p, y):
        ok[g] = ok.get(g, True) and bool(a == b)
    return float(np.mean(list(ok.values())))


# ---------------------------------------------------------------- per task
def _class_preds(predictions: Any) -> np.ndarray:
    p = _arr(predictions)
    if p.ndim == 2 and p.dtype.kind == "f":
        return p.argmax(axis=-1)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    return p.ravel()


def compute_metrics(spec: Any, predictions: Any, labels: Any, *, groups: Sequence[Any] | None = None
                    ) -> dict[str, float]:
    """Every metric relevant to ``spec`` plus ``"main"`` (= the value of ``spec.metric``).

    Args:
        spec: a :class:`TaskSpec` or a task name.
        predictions: class ids or a 2-D float array of logits/scores (argmax is taken) for
            classification and multiple choice (pad missing choices with ``-inf``); floats for
            regression; tag sequences for token classification (see :func:`entity_scores`).
        labels: gold labels (no None: unlabeled splits cannot be scored).
        groups: optional group id per example; adds ``exact_match`` (MultiRC question ids are in
            each record's ``group`` field).
    """
    if isinstance(spec, str):
        from .registry import get_task

        spec = get_task(spec)
    out: dict[str, float] = {}
    if spec.kind == "token_classification":
        out.update(entity_scores(predictions, labels, spec.label_names))
    else:
        lab_list = labels.tolist() if hasattr(labels, "tolist") else list(labels)
        if any(v is None for v in lab_list):
            raise ValueError(f"labels contain None: the split is unlabeled and cannot be scored ({spec.name})")
        if spec.kind == "regression":
            p = _arr(predictions, np.float64).reshape(-1)
            y = _arr(lab_list, np.float64).reshape(-1)
            out["pearson"] = pearson(p, y)
            out["spearman"] = spearman(p, y)
            out["pearson_spearman_mean"] = (out["pearson"] + out["spearman"]) / 2
            out["mse"] = float(np.mean((p - y) ** 2))
        else:
            p = _class_preds(predictions)
            y = _arr(lab_list).ravel()
            out["accuracy"] = accuracy(p, y)
            if spec.kind == "classification":
                if len(spec.label_names) == 2:
                    prec, rec, f1 = precision_recall_f1(p, y, 1)
                    out.update(f1=f1, precision=prec, recall=rec)
                else:
                    out["macro_f1"] = macro_f1(p, y)
                out["matthews_correlation"] = matthews_corrcoef(p, y)
                if "f1" in out:
                    out["accuracy_f1_mean"] = (out["accuracy"] + out["f1"]) / 2
            if groups is not None:
                out["exact_match"] = exact_match_by_group(p, y, groups)
    if spec.metric not in out:
        raise ValueError(f"main metric {spec.metric!r} of {spec.name} was not computed (have {sorted(out)})")
    out["main"] = out[spec.metric]
    return out
