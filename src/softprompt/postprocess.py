"""Logits to labels: one function for ``predict`` (CLI and Python) and for serving."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def row_prediction(logits: torch.Tensor, kind: str, labels: Sequence[Any]) -> dict[str, Any]:
    """One row's prediction from its head outputs (``logits`` [C], already cut to the head's width).

    Regression: ``{"score": value}``. Classification: ``{"label", "score", "scores"}``, where ``score`` is the
    softmax probability of the chosen label and ``scores`` maps every label to its probability; ``labels`` names
    the columns (column indices are used where it has the wrong length).
    """
    logits = logits.detach().float().cpu().reshape(-1)
    if kind == "regression":
        return {"score": float(logits[0])}
    width = logits.shape[0]
    names = list(labels) if len(labels) == width else list(range(width))
    probs = torch.softmax(logits, -1)
    best = int(probs.argmax())
    return {"label": names[best], "score": float(probs[best]),
            "scores": {str(names[i]): float(probs[i]) for i in range(width)}}
