"""Evaluation harness for causal LMs (with or without a PEFT adapter) on the DnD common-sense datasets.

Two accuracies are reported for every run:

* ``loglik_acc``: the option whose answer tokens have the highest summed log-probability given the
  prompt is the prediction (format-independent; batched over (example, option) pairs, left padding).
* ``gen_acc``: greedy generation of a few tokens, parsed for the first option letter (multiple choice)
  or the first yes/no (BoolQ); unparseable outputs count as wrong (DnD-style).

Data splits (``load_records``): a plain registry split name (``"test"``, ``"val"``, ...) or one of the DnD
parts ``"dnd:zoo"``, ``"dnd:dev"``, ``"dnd:test"``:

* ``dnd:zoo`` = ``spec.train_split``, ``dnd:dev`` = ``spec.eval_split``, ``dnd:test`` = ``spec.test_split``,
  except
* BoolQ (registry train split is the 32-example FewGLUE ``train32``): its ``val`` (3,270) is cut
  50/50 by the registry's sha256 rank rule (seed :data:`BOOLQ_SPLIT_SEED`) into ``dnd:zoo`` (1,635) and
  ``dnd:test`` (1,635); ``dnd:dev`` = ``dev32``.
* PIQA (registry ``eval_split`` == ``test_split``): ``dnd:dev`` = a hash-chosen 10% of ``train``
  (seed :data:`DEV_SPLIT_SEED`) and ``dnd:zoo`` the other 90%, so checkpoint scores never see the test part.
* WinoGrande (registry test part: 127 examples, ±9 points): the whole 1,267-record file is cut by twin pair
  (the ``-1``/``-2`` sentences of one id stay together), sha256-ranked pairs: the first 40% ``dnd:test``
  (about 507), the next 5% ``dnd:dev``, the rest ``dnd:zoo``.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .templates import Prompted, canonical_name, format_dataset

BOOLQ_SPLIT_SEED = 0
DEV_SPLIT_SEED = 0
DND_PARTS = ("zoo", "dev", "test")
WINOGRANDE = "commonsense/winogrande"


# ----------------------------------------------------------------------------------------------- data
def _rank(name: str, seed: int, n: int) -> list[int]:
    """Indices 0..n-1 ordered by ``sha256(f"{name}|{seed}|{i}")`` (the registry's derivation rule)."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{name}|{seed}|{i}".encode()).hexdigest())


def dnd_split_info(name: str) -> dict[str, str]:
    """Human-readable description of where each DnD part of ``name`` comes from."""
    from .. import tasks

    name = canonical_name(name)
    spec = tasks.get_task(name)
    if name == WINOGRANDE:
        return {"zoo": "full, sha256-ranked twin pairs after the first 45%", "dev": "full, pairs 40-45%",
                "test": f"full, sha256-ranked first 40% of twin pairs (seed {DEV_SPLIT_SEED})"}
    if name == "superglue/boolq":
        return {"zoo": f"val, sha256-ranked first half (seed {BOOLQ_SPLIT_SEED})", "dev": "dev32",
                "test": f"val, sha256-ranked second half (seed {BOOLQ_SPLIT_SEED})"}
    if spec.eval_split is None or spec.eval_split == spec.test_split:
        return {"zoo": f"{spec.train_split} minus a sha256-ranked 10% (seed {DEV_SPLIT_SEED})",
                "dev": f"{spec.train_split}, that sha256-ranked 10%", "test": str(spec.test_split)}
    return {"zoo": str(spec.train_split), "dev": str(spec.eval_split), "test": str(spec.test_split)}


def dnd_records(name: str, part: str) -> list[dict[str, Any]]:
    """Records of DnD part ``part`` (``zoo``/``dev``/``test``) of dataset ``name`` (deterministic, file order)."""
    from .. import tasks

    if part not in DND_PARTS:
        raise ValueError(f"part must be one of {DND_PARTS}, got {part!r}")
    name = canonical_name(name)
    spec = tasks.get_task(name)
    if name == "superglue/boolq":
        if part == "dev":
            return list(tasks.load_split(name, "dev32"))
        recs = tasks.load_split(name, "val")
        order = _rank(name, BOOLQ_SPLIT_SEED, len(recs))
        half = len(recs) - len(recs) // 2
        keep = sorted(order[:half] if part == "zoo" else order[half:])
        return [recs[i] for i in keep]
    if name == WINOGRANDE:
        return _winogrande(part)
    if part == "test":
        return list(tasks.load_split(name, spec.test_split))
    if spec.eval_split is None or spec.eval_split == spec.test_split:
        recs = tasks.load_split(name, spec.train_split)
        order = _rank(name + "|dnd-dev", DEV_SPLIT_SEED, len(recs))
        n_dev = round(0.1 * len(recs))
        keep = sorted(order[:n_dev] if part == "dev" else order[n_dev:])
        return [recs[i] for i in keep]
    return list(tasks.load_split(name, spec.train_split if part == "zoo" else spec.eval_split))


def _winogrande(part: str) -> list[dict[str, Any]]:
    """WinoGrande's DnD parts: twin pairs of the whole file, sha256-ranked; 40% test, 5% dev, 55% zoo."""
    from .. import tasks

    recs = tasks.load_split(WINOGRANDE, "full")
    groups = sorted({str(r["idx"]).rsplit("-", 1)[0] for r in recs})
    order = [groups[i] for i in _rank(WINOGRANDE + "|dnd-pairs", DEV_SPLIT_SEED, len(groups))]
    n_test, n_dev = round(0.40 * len(groups)), round(0.05 * len(groups))
    cut = {"test": order[:n_test], "dev": order[n_test:n_test + n_dev], "zoo": order[n_test + n_dev:]}[part]
    keep = set(cut)
    return [r for r in recs if str(r["idx"]).rsplit("-", 1)[0] in keep]


def load_records(name: str, split: str) -> list[dict[str, Any]]:
    """A registry split (``"test"``, ``"val"``, ...) or a DnD part written ``"dnd:zoo|dev|test"``."""
    from .. import tasks

    if split.startswith("dnd:"):
        return dnd_records(name, split[4:])
    return list(tasks.load_split(canonical_name(name), split))


# ----------------------------------------------------------------------------------------- encoding
def encode_item(tokenizer: Any, item: Prompted, max_prompt_tokens: int | None = 512
                ) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt and of each option's answer string.

    The prompt is tokenized without extra special tokens when it is chat-templated (the template
    already has them), otherwise with them (BOS). Over-long prompts keep their last
    ``max_prompt_tokens`` tokens (the question and the answer cue are at the end).
    """
    p = tokenizer(item.prompt, add_special_tokens=not item.chat)["input_ids"]
    if max_prompt_tokens is not None and len(p) > max_prompt_tokens:
        p = p[-max_prompt_tokens:]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in item.options]
    return list(p), [list(a) for a in answers]


def pad_id(tokenizer: Any) -> int:
    """Padding id: the tokenizer's pad, else eos, else 0."""
    for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if t is not None:
            return int(t)
    return 0


def left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``seqs`` into ``(input_ids, attention_mask)`` long tensors."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, n - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, n - len(s):] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


# ----------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def option_logliks(model: Any, tokenizer: Any, items: Sequence[Prompted], batch_size: int = 16,
                   max_prompt_tokens: int | None = 512, progress: bool = True) -> list[list[float]]:
    """Sum of log-probabilities of each option's answer tokens given the prompt.

    All (example, option) sequences are scored in batches of ``batch_size`` with left padding and
    position ids that skip the padding, so scores equal unpadded single-sequence scores.

    Returns:
        ``scores[i][j]`` for example ``i``, option ``j``.
    """
    model.eval()
    dev = _device(model)
    pad = pad_id(tokenizer)
    # (example, option or -1, ids, answer length or answer token ids): items whose answers are all one token
    # (letters, yes/no) are scored from a single forward pass of the prompt (same numbers, 1/k of the work).
    pairs: list[tuple[int, int, list[int], Any]] = []
    for i, it in enumerate(items):
        p, answers = encode_item(tokenizer, it, max_prompt_tokens)
        if answers and all(len(a) == 1 for a in answers):
            pairs.append((i, -1, p, [a[0] for a in answers]))
            continue
        for j, a in enumerate(answers):
            pairs.append((i, j, p + a, len(a)))
    order = sorted(range(len(pairs)), key=lambda k: -len(pairs[k][2]))  # similar lengths share a batch
    scores: list[list[float]] = [[0.0] * len(it.options) for it in items]
    bar = _bar(len(pairs), "loglik", progress)  # counts sequences
    for s in range(0, len(order), batch_size):
        chunk = [pairs[k] for k in order[s:s + batch_size]]
        ids, mask = left_pad([c[2] for c in chunk], pad)
        ids, mask = ids.to(dev), mask.to(dev)
        # answers sit at the right end (left padding): only the last K positions' logits are needed
        K = 1 + max((c[3] if c[1] >= 0 else 0) for c in chunk)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                       logits_to_keep=K).logits[:, -K:].float()
        logp = torch.log_softmax(logits, dim=-1)  # logp[:, k] = log p(next token | ids[:, :L-K+k+1])
        for r, (i, j, _seq, ans) in enumerate(chunk):
            if j < 0:
                scores[i] = [float(logp[r, -1, a]) for a in ans]
            elif ans:
                tgt = ids[r, -ans:]
                scores[i][j] = float(logp[r, K - ans - 1:K - 1].gather(-1, tgt[:, None]).sum())
            else:
                scores[i][j] = 0.0
        bar.update(len(chunk))
    bar.close()
    return scores


_WORD = re.compile(r"[A-Za-z]+")


def parse_answer(text: str, item: Prompted) -> int:
    """Option index named by a generated answer, or ``-1`` if none can be parsed.

    Multiple choice: the first standalone option letter (``"B"``, ``"B."``, ``"(B)"``, ``"[B]"``,
    ``"Answer: B"``). BoolQ: the first of yes/no/true/false (case-insensitive).
    """
    words = _WORD.findall(text)
    if item.kind == "yesno":
        for w in words:
            lw = w.lower()
            if lw in ("yes", "true"):
                return 1
            if lw in ("no", "false"):
                return 0
        return -1
    letters = [o.strip() for o in item.options]
    for w in words:
        if w in letters:
            return letters.index(w)
    return -1


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, items: Sequence[Prompted], batch_size: int = 16,
                     max_new_tokens: int = 8, max_prompt_tokens: int | None = 512,
                     progress: bool = True) -> list[str]:
    """Greedy continuations (decoded, special tokens skipped) of each item's prompt, batched, left padding."""
    model.eval()
    dev = _device(model)
    pad = pad_id(tokenizer)
    prompts = [encode_item(tokenizer, it, max_prompt_tokens)[0] for it in items]
    order = sorted(range(len(items)), key=lambda k: -len(prompts[k]))
    out: list[str] = [""] * len(items)
    eos = getattr(tokenizer, "eos_token_id", None)
    bar = _bar(len(items), "generate", progress)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = left_pad([prompts[k] for k in idx], pad)
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=eos, num_beams=1)
        new = gen[:, ids.shape[1]:].cpu()
        for r, k in enumerate(idx):
            out[k] = tokenizer.decode(new[r].tolist(), skip_special_tokens=True)
        bar.update(len(idx))
    bar.close()
    return out


def evaluate_items(model: Any, tokenizer: Any, items: Sequence[Prompted], batch_size: int = 16,
                   measures: Iterable[str] = ("loglik", "gen"), max_new_tokens: int = 8,
                   max_prompt_tokens: int | None = 512, progress: bool = True,
                   return_details: bool = False) -> dict[str, Any]:
    """Accuracies of ``model`` on already-templated items (see :func:`evaluate`)."""
    measures = tuple(measures)
    res: dict[str, Any] = {"n": len(items)}
    golds = [it.gold for it in items]
    if "loglik" in measures:
        sc = option_logliks(model, tokenizer, items, batch_size, max_prompt_tokens, progress)
        pred = [max(range(len(s)), key=s.__getitem__) for s in sc]
        res["loglik_acc"] = sum(p == g for p, g in zip(pred, golds)) / max(len(items), 1)
        if return_details:
            res["loglik_scores"], res["loglik_pred"] = sc, pred
    if "gen" in measures:
        texts = generate_answers(model, tokenizer, items, batch_size, max_new_tokens, max_prompt_tokens, progress)
        pred = [parse_answer(t, it) for t, it in zip(texts, items)]
        res["gen_acc"] = sum(p == g for p, g in zip(pred, golds)) / max(len(items), 1)
        res["gen_invalid"] = sum(p < 0 for p in pred) / max(len(items), 1)
        if return_details:
            res["gen_text"], res["gen_pred"] = texts, pred
    return res


def evaluate(model: Any, tokenizer: Any, dataset: str, split: str = "dnd:test", limit: int | None = None,
             batch_size: int = 16, measures: Iterable[str] = ("loglik", "gen"), max_new_tokens: int = 8,
             max_prompt_tokens: int | None = 512, progress: bool = True,
             records: list[Mapping[str, Any]] | None = None, return_details: bool = False) -> dict[str, Any]:
    """Accuracy of a causal LM (a plain model or a ``PeftModel``) on one dataset.

    Args:
        dataset: registry name or short name (``arc_easy``, ``boolq``, ...).
        split: registry split or DnD part (``dnd:zoo``/``dnd:dev``/``dnd:test``; see module docstring).
        limit: evaluate only the first ``limit`` records (file order).
        records: use these records instead of loading ``dataset``/``split``.

    Returns:
        ``{"loglik_acc", "gen_acc", "gen_invalid", "n"}`` (the accuracies of the requested ``measures``).
    """
    recs = list(records) if records is not None else load_records(dataset, split)
    if limit is not None:
        recs = recs[:limit]
    items = format_dataset(canonical_name(dataset), recs, tokenizer)
    return evaluate_items(model, tokenizer, items, batch_size, measures, max_new_tokens, max_prompt_tokens,
                          progress, return_details)


# ------------------------------------------------------------------------------------------ loading
def default_device() -> str:
    """``cuda`` when available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model: str, adapter: str | None = None, device: str | None = None,
               dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from an alias (``smollm2``) or folder, optionally wrapped by a PEFT adapter."""
    from ..loading import HeadSpec, load_base, load_tokenizer

    m, _ = load_base(model, HeadSpec("causal_lm"), dtype=dtype or torch.float32)
    tok = load_tokenizer(model)
    if adapter:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter)
    m.to(device or default_device()).eval()
    return m, tok


# adapter_config.json fields that name where a folder came from, not the modules it builds
_PROVENANCE = ("base_model_name_or_path", "revision", "peft_version", "inference_mode")


class AdapterSlot:
    """One base model on the device, whose LoRA weights are swapped from adapter to adapter.

    Scoring many adapters of one configuration (a ``dnd`` stage's draws, the zoo checkpoints that
    ``lora_to_match`` bisects) then loads and moves the base model once instead of once per adapter. The forward
    is PEFT's own with the same weights as a fresh :func:`load_model`, so the scores are the same to the bit
    (``tests/test_dnd_harness.py``). An adapter of another configuration gets a fresh model; one whose tensors do
    not cover every LoRA weight of the slot raises, since the previous adapter's weights would otherwise remain.
    """

    def __init__(self, model: str, device: str | None = None) -> None:
        self.model_path, self.device = model, device
        self._loaded: tuple[Any, Any] | None = None
        self._config: dict | None = None

    def load(self, adapter: str) -> tuple[Any, Any]:
        """``(model, tokenizer)`` with ``adapter``'s weights (a PEFT LoRA folder)."""
        import json
        from pathlib import Path

        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        raw = json.loads((Path(adapter) / "adapter_config.json").read_text())
        config = {k: v for k, v in raw.items() if k not in _PROVENANCE}
        if self._loaded is None or config != self._config:
            self._loaded, self._config = load_model(self.model_path, adapter, self.device), config
            return self._loaded
        model = self._loaded[0]
        result = set_peft_model_state_dict(model, load_peft_weights(adapter, device=str(_device(model))))
        own = {k for k, _ in model.named_parameters() if "lora_" in k}
        missing = own & set(result.missing_keys)
        if missing or result.unexpected_keys:
            raise ValueError(f"adapter {adapter} does not match the loaded LoRA layout: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(result.unexpected_keys)[:3]}; load it with load_model instead")
        return self._loaded
