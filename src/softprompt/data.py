"""Turn task records into model features and padded batches, per task kind (used by training, evaluation and
serving alike)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def featurize(records: list[dict], spec, tokenizer, max_length: int) -> list[dict[str, Any]]:
    """Tokenise records of ``spec.kind`` (labels None are kept as -100/absent for prediction)."""
    kind = spec.kind
    feats: list[dict[str, Any]] = []
    if kind in ("classification", "regression"):
        texts = [r["text"] for r in records]
        pairs = [r.get("text_pair") for r in records]
        has_pair = any(p is not None for p in pairs)
        enc = tokenizer(texts, [p or "" for p in pairs] if has_pair else None, truncation=True, max_length=max_length)
        for i, r in enumerate(records):
            f = {k: enc[k][i] for k in enc}
            if r.get("label") is not None:
                f["labels"] = float(r["label"]) if kind == "regression" else int(r["label"])
            feats.append(f)
    elif kind == "token_classification":
        for r in records:
            enc = tokenizer(r["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
            f = dict(enc)
            if r.get("tags") is not None:
                labels, prev = [], None
                for w in enc.word_ids():
                    # Label the first sub-token of each word; the rest and special tokens are ignored.
                    labels.append(-100 if w is None or w == prev else int(r["tags"][w]))
                    prev = w
                f["labels"] = labels
            f["word_ids"] = [-1 if w is None else w for w in enc.word_ids()]
            feats.append(f)
    elif kind == "multiple_choice":
        for r in records:
            enc = tokenizer([r["text"]] * len(r["choices"]), list(r["choices"]), truncation=True,
                            max_length=max_length)
            f = {k: list(v) for k, v in enc.items()}
            if r.get("label") is not None:
                f["labels"] = int(r["label"])
            feats.append(f)
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    return feats


@dataclass
class Collator:
    """Pads a list of features into a batch (left padding for decoders, right for encoders)."""

    tokenizer: Any
    kind: str

    def __call__(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id or 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        if self.kind == "multiple_choice":
            n_choice = max(len(f["input_ids"]) for f in feats)
            length = max(len(x) for f in feats for x in f["input_ids"])
            batch = {k: [] for k in feats[0] if k != "labels"}
            for f in feats:
                for k, column in batch.items():
                    rows = [self._pad(x, length, pad_id if k == "input_ids" else 0, left) for x in f[k]]
                    rows += [[pad_id if k == "input_ids" else 0] * length] * (n_choice - len(rows))
                    column.append(rows)
            out = {k: torch.tensor(v) for k, v in batch.items()}
        else:
            length = max(len(f["input_ids"]) for f in feats)
            out = {}
            for k in feats[0]:
                if k == "labels" and self.kind != "token_classification":
                    continue
                fill = pad_id if k == "input_ids" else (-100 if k in ("labels", "word_ids") else 0)
                out[k] = torch.tensor([self._pad(f[k], length, fill, left) for f in feats])
            out.pop("word_ids", None)
        if "labels" in feats[0] and self.kind != "token_classification":
            dtype = torch.float32 if self.kind == "regression" else torch.long
            out["labels"] = torch.tensor([f["labels"] for f in feats], dtype=dtype)
        return out

    @staticmethod
    def _pad(seq: list, length: int, fill, left: bool) -> list:
        pad = [fill] * (length - len(seq))
        return pad + list(seq) if left else list(seq) + pad
