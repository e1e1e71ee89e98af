"""Cloze scoring (the lm-evaluation-harness convention): each option's answer *text* is scored as a continuation.

A 135M model answers lettered multiple choice at chance; scoring the answer text itself is how small models are
measured. Per dataset (``cloze_example``):

* ARC-Easy/-Challenge, OpenBookQA, PIQA: ``"Question: <text>\\nAnswer:"`` + ``" <option>"``;
* HellaSwag: the context (light clean-up of WikiHow tags) + ``" <ending>"``;
* WinoGrande, *partial* scoring: the context is the sentence up to the blank with the option substituted, the
  continuation is the rest of the sentence (identical for both options), so only the option changes what follows;
* BoolQ (format v2): two fixed demonstrations, then ``"<passage>\\nQuestion: <question>?\\nAnswer:"`` +
  ``" no"`` / ``" yes"`` (option index = label); each block is lm-evaluation-harness's zero-shot BoolQ prompt (v1,
  used until 2026-12-04), the demonstrations are the train32 examples with the shortest passage of each label, "no"
  first, each followed by its answer and a blank line (:func:`boolq_demos`).

Two accuracies: ``acc`` (argmax of the summed log-probability of the continuation tokens) and ``acc_norm`` (argmax
of that sum divided by the continuation's length in UTF-8 bytes). Datasets with content-free inputs
(:func:`calibration_items`: BoolQ) also get ``acc_cal``, contextual calibration (Zhao et al. 2021, "Calibrate
before use"): each option's score minus its mean score on the content-free inputs (the same prompt with "N/A", ""
and "[MASK]" as passage and question), so a model's standing preference for one answer does not count as reading.
Context and continuation are tokenized apart and concatenated (no chat template, the tokenizer's own special tokens
on the context), so a score is exactly ``sum_t log p(cont_t | context, cont_<t)`` of that token sequence.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .harness import left_pad, load_records, pad_id
from .templates import canonical_name

QA = ("commonsense/arc_easy", "commonsense/arc_challenge", "commonsense/openbookqa", "commonsense/piqa")


# Cloze format version per dataset (1 when absent). Raise a dataset's version whenever its context or answer texts
# change: stage results made with another version are then stale and redone (``study.Study.fresh``).
FORMAT_VERSIONS: dict[str, int] = {"superglue/boolq": 2}  # BoolQ v2: two demonstrations (v1: zero-shot)


def format_version(name: str) -> int:
    """The current cloze format version of dataset ``name``."""
    return FORMAT_VERSIONS.get(canonical_name(name), 1)


# The reported measure per dataset: acc_norm (log-likelihood per answer byte) where options are texts of different
# lengths, as lm-evaluation-harness reports them; acc for WinoGrande, whose partial scoring gives every option the
# same continuation (acc = acc_norm); acc_cal for BoolQ, whose single-token answers make byte normalisation a mere
# reweighting of two log-probabilities and whose accuracy otherwise measures how often a model says "yes"
# (docs/dnd_gpu.md, "BoolQ: measure, chance and format").
PRIMARY_MEASURE: dict[str, str] = {"superglue/boolq": "acc_cal", "commonsense/winogrande": "acc"}
CONTENT_FREE = ("N/A", "", "[MASK]")


def primary_measure(name: str) -> str:
    """``acc``, ``acc_norm`` or ``acc_cal``: the measure reported for dataset ``name`` (:data:`PRIMARY_MEASURE`)."""
    return PRIMARY_MEASURE.get(canonical_name(name), "acc_norm")


def _boolq_block(passage: str, question: str) -> str:
    return f"{passage.strip()}\nQuestion: {question.strip().rstrip('?')}?\nAnswer:"


@functools.cache
def boolq_demos() -> str:
    """BoolQ's two demonstrations (format v2): of FewGLUE's train32, the example with the shortest passage of each
    label ("no" first), each as its prompt block + answer + a blank line."""
    from .. import tasks

    recs = sorted(tasks.load_split("superglue/boolq", "train32"), key=lambda r: (len(str(r["text"])), str(r["idx"])))
    demos = [next(r for r in recs if int(r["label"]) == k) for k in (0, 1)]
    return "".join(_boolq_block(str(r["text"]), str(r["text_pair"])) + (" yes" if int(r["label"]) else " no")
                   + "\n\n" for r in demos)


def calibration_items(name: str) -> list[Cloze]:
    """Content-free items of dataset ``name`` for ``acc_cal`` (empty: the dataset has none)."""
    if canonical_name(name) != "superglue/boolq":
        return []
    return [Cloze((boolq_demos() + _boolq_block(x, x),) * 2, (" no", " yes"), -1) for x in CONTENT_FREE]


@dataclass(frozen=True)
class Cloze:
    """One example in cloze form: option ``j`` is scored as ``continuations[j]`` after ``contexts[j]``."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int  # -1 when unlabeled


def _clean(text: str) -> str:
    """HellaSwag's WikiHow tags (``[title]``, ``[step]``, ``[header]``) removed, spaces collapsed (lm-eval's rule)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def cloze_example(name: str, record: Mapping[str, Any]) -> Cloze:
    """The cloze form of one registry record of dataset ``name`` (see the module docstring)."""
    name = canonical_name(name)
    label = record.get("label")
    gold = int(label) if label is not None else -1
    if name == "superglue/boolq":
        ctx = boolq_demos() + _boolq_block(str(record["text"]), str(record["text_pair"]))
        return Cloze((ctx, ctx), (" no", " yes"), gold)
    choices = [str(c).strip() for c in record["choices"]]
    text = str(record["text"]).strip()
    if name == "commonsense/winogrande":
        cut = text.index("_")
        rest = " " + text[cut + 1:].strip()
        return Cloze(tuple(text[:cut].rstrip() + " " + c if text[:cut].strip() else c for c in choices),
                     (rest,) * len(choices), gold)
    if name == "commonsense/hellaswag":
        ctx = _clean(text)
        return Cloze((ctx,) * len(choices), tuple(" " + _clean(c) for c in choices), gold)
    ctx = f"Question: {text}\nAnswer:"
    return Cloze((ctx,) * len(choices), tuple(" " + c for c in choices), gold)


def condition_text(name: str, record: Mapping[str, Any]) -> str:
    """Unlabeled condition prompt as the official DnD code feeds its generator: the raw question and its options,
    no instruction line; BoolQ's question comes first (a long passage would otherwise push it past the
    encoder's window)."""
    name = canonical_name(name)
    if name == "superglue/boolq":
        return f"{str(record['text_pair']).strip().rstrip('?')}?\n{str(record['text']).strip()}"
    return "\n".join([str(record["text"]).strip(), *(str(c).strip() for c in record["choices"])])


def encode_cloze(tokenizer: Any, item: Cloze, max_context_tokens: int | None = 1024
                 ) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per option; an over-long context keeps its last ``max_context_tokens``."""
    out = []
    for ctx, cont in zip(item.contexts, item.continuations):
        c = list(tokenizer(ctx)["input_ids"])
        if max_context_tokens is not None and len(c) > max_context_tokens:
            c = c[-max_context_tokens:]
        out.append((c, list(tokenizer(cont, add_special_tokens=False)["input_ids"])))
    return out


@torch.no_grad()
def continuation_logliks(model: Any, tokenizer: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                         batch_size: int = 32, progress: bool = False) -> list[float]:
    """``sum_t log p(cont_t | ctx, cont_<t)`` of each (context ids, continuation ids) pair.

    Batched with left padding and position ids that skip the padding (so a score equals the unpadded sequence's);
    pairs of similar length share a batch, and only the logits of the continuation positions are computed."""
    from tqdm.auto import tqdm

    model.eval()
    dev = next(model.parameters()).device
    pad = pad_id(tokenizer)
    order = sorted(range(len(pairs)), key=lambda k: -(len(pairs[k][0]) + len(pairs[k][1])))
    scores = [0.0] * len(pairs)
    bar = tqdm(total=len(pairs), desc="cloze", disable=not progress, leave=False)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = left_pad([list(pairs[k][0]) + list(pairs[k][1]) for k in idx], pad)
        ids, mask = ids.to(dev), mask.to(dev)
        keep = 1 + max(len(pairs[k][1]) for k in idx)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=keep).logits[:, -keep:].float()
        logp = torch.log_softmax(logits, dim=-1)  # logp[:, i] predicts ids[:, L - keep + i + 1]
        for r, k in enumerate(idx):
            n = len(pairs[k][1])
            if n:
                tgt = ids[r, -n:]
                scores[k] = float(logp[r, keep - n - 1:keep - 1].gather(-1, tgt[:, None]).sum())
        bar.update(len(idx))
    bar.close()
    return scores


def score_items(model: Any, tokenizer: Any, items: Sequence[Cloze], batch_size: int = 32,
                max_context_tokens: int | None = 1024, progress: bool = False,
                return_details: bool = False, calibration: Sequence[Cloze] = ()) -> dict[str, Any]:
    """``{"acc", "acc_norm", "n", "chance", "majority"}`` over ``items`` (fractions); with ``return_details``
    also ``correct`` / ``correct_norm`` (0/1 per example, for paired bootstraps) and ``scores``.

    ``chance`` is the mean of 1/(number of options); ``majority`` the share of the most frequent gold index. With
    ``calibration`` (content-free items with the items' options): ``acc_cal`` (argmax of score minus the option's
    mean content-free score), ``calibration`` (those means) and, with details, ``correct_cal``."""
    pairs, owner = [], []
    for i, it in enumerate([*items, *calibration]):
        for p in encode_cloze(tokenizer, it, max_context_tokens):
            pairs.append(p)
            owner.append(i)
    flat = continuation_logliks(model, tokenizer, pairs, batch_size, progress)
    per: list[list[float]] = [[] for _ in range(len(items) + len(calibration))]
    for i, s in zip(owner, flat):
        per[i].append(s)
    per, cal_scores = per[:len(items)], per[len(items):]
    offset = [sum(c[j] for c in cal_scores) / len(cal_scores) for j in range(len(cal_scores[0]))] if calibration \
        else None
    correct, correct_norm, correct_cal = [], [], []
    for it, sc in zip(items, per):
        nb = [max(len(c.encode("utf-8")), 1) for c in it.continuations]
        correct.append(int(max(range(len(sc)), key=sc.__getitem__) == it.gold))
        correct_norm.append(int(max(range(len(sc)), key=lambda j: sc[j] / nb[j]) == it.gold))
        if offset is not None:
            correct_cal.append(int(max(range(len(sc)), key=lambda j: sc[j] - offset[j]) == it.gold))
    n = len(items)
    golds = [it.gold for it in items]
    res: dict[str, Any] = {
        "n": n, "acc": sum(correct) / max(n, 1), "acc_norm": sum(correct_norm) / max(n, 1),
        "chance": sum(1 / len(it.continuations) for it in items) / max(n, 1),
        "majority": max((golds.count(g) for g in set(golds)), default=0) / max(n, 1)}
    if offset is not None:
        res.update(acc_cal=sum(correct_cal) / max(n, 1), calibration=offset)
    if return_details:
        res.update(correct=correct, correct_norm=correct_norm, scores=per)
        if offset is not None:
            res["correct_cal"] = correct_cal
    return res


def evaluate_cloze(model: Any, tokenizer: Any, dataset: str, split: str = "dnd:test", limit: int | None = None,
                   batch_size: int = 32, records: Sequence[Mapping[str, Any]] | None = None,
                   max_context_tokens: int | None = 1024, progress: bool = False,
                   return_details: bool = False) -> dict[str, Any]:
    """Cloze accuracies of a causal LM (plain or ``PeftModel``) on ``dataset``/``split`` (or on ``records``),
    ``acc_cal`` too where the dataset has content-free inputs (:func:`calibration_items`)."""
    recs = list(records) if records is not None else load_records(dataset, split)
    if limit is not None:
        recs = recs[:limit]
    items = [cloze_example(dataset, r) for r in recs]
    return score_items(model, tokenizer, items, batch_size, max_context_tokens, progress, return_details,
                       calibration_items(dataset))


def training_pairs(tokenizer: Any, items: Sequence[Cloze], max_length: int = 512
                   ) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per labeled item for the zoo: the gold option's context masked with -100, its
    continuation tokens as the targets (LM loss on the answer text only). Over-long contexts keep their end."""
    out = []
    for it in items:
        if it.gold < 0:
            continue
        ctx, cont = encode_cloze(tokenizer, it, None)[it.gold]
        ctx = ctx[-max(max_length - len(cont), 1):]
        out.append((ctx + cont, [-100] * len(ctx) + cont))
    return out
