"""Where the held-out datasets' condition prompts lie among the training datasets' (issue 21's "why").

A DnD generator sees each dataset only through its condition prompts, encoded by the frozen sentence encoder. If
the datasets form tight, well separated clusters in that space and a held-out dataset's prompts fall outside every
training cluster, a generator trained on the clusters has nothing between them to interpolate: it can only map the
new prompts to what its nearest cluster taught it (retrieval). These measures say how far that holds, from
per-prompt embeddings (mean over tokens, as the study's nearest-dataset rule pools them):

* ``centroid_cosine[h][d]``: cosine of the centroid of h's held-out condition prompts (what a held-out generator is
  fed) with the centroid of d's training prompts (what generators learn from); the diagonal is the same dataset's
  other part, the reference for "inside its cluster";
* ``assigned[h]``: the share of h's held-out prompts whose nearest training centroid is each dataset, with all seven
  centroids (``accuracy``: the share assigned to h itself, how separable the datasets are) and with h's own left
  out (where a held-out generator's inputs land);
* ``spread[d]``: mean cosine of d's training prompts with their own centroid (the cluster's tightness), against
  ``held_out_to_nearest[h]``: mean cosine of h's held-out prompts with the nearest other training centroid (each
  prompt's own nearest), and ``membership[h]``: h's held-out prompts' mean cosine with the centroid of the dataset
  nearest to h (by centroid) divided by that dataset's spread: 1 means h's prompts sit in that cluster as closely as
  its own training prompts do; well below 1, outside it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def condition_geometry(train: Mapping[str, torch.Tensor], held_out: Mapping[str, torch.Tensor]) -> dict:
    """Measures above from per-prompt embeddings: ``train[d]`` [N_d, D] (d's training prompts) and ``held_out[h]``
    [M_h, D] (h's held-out condition prompts), float64 for exact cosines. Every ``held_out`` key must be in
    ``train`` (its own part there is the reference)."""
    names = list(train)
    missing = [h for h in held_out if h not in train]
    if missing:
        raise ValueError(f"held-out datasets without training prompts: {missing}")
    cent = torch.stack([_unit(train[d].double().mean(0)) for d in names])  # [K, D]
    out: dict = {"datasets": names, "centroid_cosine": {}, "assigned": {}, "spread": {}, "held_out_to_nearest": {},
                 "membership": {}}
    for d in names:
        out["spread"][d] = round(float((_unit(train[d].double()) @ cent[names.index(d)]).mean()), 4)
    for h, x in held_out.items():
        u = _unit(x.double())
        c = _unit(x.double().mean(0))
        out["centroid_cosine"][h] = {d: round(float(c @ cent[i]), 4) for i, d in enumerate(names)}
        sims = u @ cent.T  # [M, K]
        pick = sims.argmax(1)
        share_all = {d: round(float((pick == i).double().mean()) * 100, 2) for i, d in enumerate(names)}
        k = names.index(h)
        others = sims.clone()
        others[:, k] = -torch.inf
        pick_o = others.argmax(1)
        share_o = {d: round(float((pick_o == i).double().mean()) * 100, 2) for i, d in enumerate(names) if i != k}
        out["assigned"][h] = {"accuracy": share_all[h], "all": share_all, "without_own": share_o}
        out["held_out_to_nearest"][h] = round(float(others.max(1).values.mean()), 4)
        near = max((d for d in names if d != h), key=out["centroid_cosine"][h].__getitem__, default=None)
        if near is not None:
            to = float(sims[:, names.index(near)].mean())
            out["membership"][h] = {"dataset": near, "cosine": round(to, 4),
                                    "ratio": round(to / out["spread"][near], 3)}
    return out


__all__ = ["condition_geometry"]
