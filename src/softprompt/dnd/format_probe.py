"""Does any faithful zero-shot cloze format give a model BoolQ skill? (issue 21; chosen on examples never evaluated)

For each published context (lm-evaluation-harness: ``"<passage>\\nQuestion: <question>?\\nAnswer:"``; HELM /
lighteval ``boolq_helm``: ``"Passage: <passage>\\nQuestion: <Question>?\\nAnswer:"``; and lm-eval's block after
the two demonstrations of :func:`.cloze.boolq_demos`, BoolQ's format v2) and answer pair (yes/no, Yes/No, true/false,
True/False: single tokens for SmolLM2), the next-token log-probabilities of both answers give:

* ``acc`` and ``acc_norm`` (per answer byte) as the harness would score them, and the rate of "yes" answers;
* ``auc``: the probability that a yes-question gets a larger log p(yes) − log p(no) than a no-question, with a 95%
  bootstrap interval. It does not depend on the decision threshold, so it separates reading skill (auc > 0.5) from
  answer bias (which only moves accuracy between the no-rate and the yes-rate of the gold labels);
* ``balanced_acc`` at the harness's threshold (mean recall of both answers; 50 for any constant answer);
* ``acc_cal``, ``yes_rate_cal``, ``balanced_acc_cal``: the same after contextual calibration (the threshold moved by
  the mean yes-minus-no score of the context with "N/A", "" and "[MASK]" as passage and question).

Examples: the sha256-ranked first ``n`` records (key ``superglue/boolq|format-probe``) of BoolQ's DnD ``zoo`` part,
which is never evaluated.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from .harness import _rank, dnd_records, left_pad, pad_id


def _two_shot(p: str, q: str) -> str:
    from .cloze import boolq_demos

    return boolq_demos() + f"{p}\nQuestion: {q}?\nAnswer:"


CONTEXTS = {
    "lm-eval": lambda p, q: f"{p}\nQuestion: {q}?\nAnswer:",
    "helm": lambda p, q: f"Passage: {p}\nQuestion: {q[:1].upper() + q[1:]}?\nAnswer:",
    "2-shot lm-eval": _two_shot,
}
ANSWERS = {"yes/no": (" yes", " no"), "Yes/No": (" Yes", " No"), "true/false": (" true", " false"),
           "True/False": (" True", " False")}


def probe_records(n: int = 400) -> list[dict[str, Any]]:
    """The probe's examples: sha256-ranked first ``n`` of BoolQ's DnD zoo part (file order)."""
    recs = dnd_records("superglue/boolq", "zoo")
    return [recs[i] for i in sorted(_rank("superglue/boolq|format-probe", 0, len(recs))[:n])]


def auc(score: Sequence[float], label: Sequence[int]) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    pos = [s for s, y in zip(score, label) if y == 1]
    neg = [s for s, y in zip(score, label) if y == 0]
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / max(1, len(pos) * len(neg))


@torch.no_grad()
def next_token_logprobs(model: Any, tok: Any, texts: Sequence[str], token_ids: Sequence[int],
                        batch_size: int = 16, max_tokens: int = 1024) -> list[list[float]]:
    """log p(token | text) for every text and every id of ``token_ids`` (left-padded batches)."""
    dev = next(model.parameters()).device
    enc = [list(tok(t)["input_ids"])[-max_tokens:] for t in texts]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    out: list[list[float]] = [[] for _ in enc]
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = left_pad([enc[i] for i in idx], pad_id(tok))
        ids, mask = ids.to(dev), mask.to(dev)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=1).logits[:, -1].float()
        lp = torch.log_softmax(logits, -1)[:, list(token_ids)]
        for r, i in enumerate(idx):
            out[i] = lp[r].tolist()
    return out


def _balanced(pred: Sequence[bool], label: Sequence[int]) -> float:
    return 50 * sum(sum(p == bool(k) for p, y in zip(pred, label) if y == k) / max(1, label.count(k)) for k in (0, 1))


def _summary(lp: list[list[float]], label: list[int], yes: str, no: str, n_boot: int = 1000,
             cal: float | None = None) -> dict[str, Any]:
    d = [a - b for a, b in lp]
    pred = [x > 0 for x in d]
    pred_norm = [a / len(yes.encode()) > b / len(no.encode()) for a, b in lp]
    rng = random.Random(0)
    boots = []
    for _ in range(n_boot):
        idx = [rng.randrange(len(d)) for _ in d]
        boots.append(auc([d[i] for i in idx], [label[i] for i in idx]))
    boots.sort()
    n = len(label)
    out = {"acc": round(100 * sum(p == bool(y) for p, y in zip(pred, label)) / n, 2),
           "acc_norm": round(100 * sum(p == bool(y) for p, y in zip(pred_norm, label)) / n, 2),
           "yes_rate": round(100 * sum(pred) / n, 2), "balanced_acc": round(_balanced(pred, label), 2),
           "auc": round(auc(d, label), 4),
           "auc_ci": [round(boots[int(0.025 * n_boot)], 4), round(boots[int(0.975 * n_boot) - 1], 4)]}
    if cal is not None:
        pc = [x > cal for x in d]
        out.update(acc_cal=round(100 * sum(p == bool(y) for p, y in zip(pc, label)) / n, 2),
                   yes_rate_cal=round(100 * sum(pc) / n, 2), balanced_acc_cal=round(_balanced(pc, label), 2),
                   calibration=round(cal, 4))
    return out


def probe_boolq(model: Any, tok: Any, records: Sequence[dict[str, Any]], batch_size: int = 16,
                progress: Any = None) -> dict[str, Any]:
    """Every (context, answer pair) of the module docstring on ``records``: ``{"n", "yes_rate_gold", "formats":
    {"<context> <answers>": summary}}``."""
    label = [int(r["label"]) for r in records]
    words = [w for pair in ANSWERS.values() for w in pair]
    ids = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"answers must be single tokens for this probe: {dict(zip(words, ids))}")
    res: dict[str, Any] = {"n": len(records), "yes_rate_gold": round(100 * sum(label) / max(1, len(label)), 2),
                           "formats": {}}
    from .cloze import CONTENT_FREE

    for name, ctx in CONTEXTS.items():
        texts = [ctx(str(r["text"]).strip(), str(r["text_pair"]).strip().rstrip("?")) for r in records]
        lp = next_token_logprobs(model, tok, texts, [i[0] for i in ids], batch_size)
        cf = next_token_logprobs(model, tok, [ctx(x, x) for x in CONTENT_FREE], [i[0] for i in ids], batch_size)
        for k, (yes, no) in enumerate(ANSWERS.values()):
            pair = list(ANSWERS)[k]
            cal = sum(c[2 * k] - c[2 * k + 1] for c in cf) / len(cf)
            res["formats"][f"{name} {pair}"] = _summary([[x[2 * k], x[2 * k + 1]] for x in lp], label, yes, no,
                                                        cal=cal)
        if progress:
            progress(f"{name}: done")
    return res


__all__ = ["ANSWERS", "CONTEXTS", "auc", "next_token_logprobs", "probe_boolq", "probe_records"]
