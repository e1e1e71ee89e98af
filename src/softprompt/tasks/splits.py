"""Deterministic, seeded derived splits (see :class:`~softprompt.tasks.spec.SplitDerivation`)."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from .spec import SplitDerivation


def hash_order(indices: Sequence[int], key: str, seed: int) -> list[int]:
    """``indices`` ordered by ``sha256(f"{key}|{seed}|{i}")`` (platform- and version-independent)."""
    return sorted(indices, key=lambda i: hashlib.sha256(f"{key}|{seed}|{i}".encode()).digest())


def _cut(order: list[int], parts: Sequence[tuple[str, float]]) -> dict[str, list[int]]:
    n = len(order)
    sizes = {name: int(frac * n + 0.5) for name, frac in parts[1:]}
    first = parts[0][0]
    sizes[first] = n - sum(sizes.values())
    if sizes[first] < 0:
        raise ValueError(f"split fractions {parts} exceed 1")
    out: dict[str, list[int]] = {}
    pos = 0
    # the remainder part is cut last so that the held-out parts come first in hash order
    for name, _ in list(parts[1:]) + [parts[0]]:
        out[name] = order[pos:pos + sizes[name]]
        pos += sizes[name]
    return out


def derive_indices(task: str, n: int, derivation: SplitDerivation, labels: Sequence[Any] | None = None,
                   seed: int | None = None) -> dict[str, list[int]]:
    """Indices (into the ``n`` source records) of every derived split, each sorted ascending.

    Args:
        task: task name (part of the hash key, so different tasks get unrelated orders).
        n: number of source records.
        derivation: parts, fractions, seed and whether to stratify.
        labels: per-record labels, needed when ``derivation.stratify`` is true.
        seed: overrides ``derivation.seed``.
    """
    seed = derivation.seed if seed is None else seed
    if derivation.stratify:
        if labels is None or len(labels) != n:
            raise ValueError("stratified split needs one label per record")
        groups: dict[Any, list[int]] = {}
        for i, lab in enumerate(labels):
            groups.setdefault(lab, []).append(i)
        out: dict[str, list[int]] = {name: [] for name in derivation.names}
        for lab in sorted(groups, key=repr):
            part = _cut(hash_order(groups[lab], task, seed), derivation.parts)
            for name, idx in part.items():
                out[name].extend(idx)
    else:
        out = _cut(hash_order(range(n), task, seed), derivation.parts)
    return {name: sorted(out[name]) for name in derivation.names}
