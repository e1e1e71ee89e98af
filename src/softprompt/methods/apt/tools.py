"""Gate probing and PT-2* prefix-length allocation for APT adapters.

Pure functions (the ``softprompt gates`` / ``softprompt prune`` commands wrap them):

* :func:`probe_gates` runs an APT model over tokenized batches and averages its gates into a JSON-ready dict;
* :func:`plot_gates` draws that dict (heat map of mean alpha, layers x prefix positions, and a bar chart of lambda);
* :func:`allocate_lengths` turns the gates into per-layer prefix lengths summing to a budget (PT-2*);
* :func:`save_layer_lengths` writes them as ``{"layer_lengths": [...]}``, i.e. ``PrefixConfig(**json.load(f))``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ...errors import ConfigError

# Batch keys that are model inputs (labels are dropped: probing needs no loss).
_DROP_KEYS = ("labels", "label")


def _apt_module(model):
    from .module import APT

    method = getattr(model, "method", None)
    if not isinstance(method, APT):
        raise ConfigError(
            f"gate probing needs an APT adapter (method 'apt'); this model's method is "
            f"{getattr(getattr(model, 'method_config', None), 'method', type(method).__name__)!r}"
        )
    return method


@torch.no_grad()
def probe_gates(model, batches: Iterable[Mapping[str, Any]]) -> dict:
    """Average the gates of an APT ``SoftPromptModel`` over ``batches`` (dicts of model inputs, e.g. tokenizer output).

    The model runs in eval mode (no dropout); its training flag is restored afterwards. Every example counts once.

    Returns a JSON-serialisable dict (lists indexed by layer 0..L-1; layers without a prefix get ``[]``/``None``):
        num_layers, lengths (prefix length per layer), num_examples,
        alpha: mean token gate per layer and prefix position, E[alpha_{i,j}],
        alpha_std: its standard deviation over examples,
        lambda: the layer scalar lambda_i (a parameter, so constant over examples),
        gate: mean effective gate per position, lambda_i * E[alpha_{i,j}],
        layer_mass: g_i = |lambda_i| * mean_j E[alpha_{i,j}] (the spec's per-layer statistic; |.| because a negative
            lambda flips the prefix's sign but its strength is the magnitude),
        gate_pool, gate_target: the adapter's gate options (results must say which mode was used).
    """
    method = _apt_module(model)
    lengths = list(method.lengths)
    sums: dict[int, torch.Tensor] = {}
    sq: dict[int, torch.Tensor] = {}
    lam: dict[int, float] = {}
    n = 0
    was_training = model.training
    model.eval()
    device = model.device
    try:
        for batch in batches:
            inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                      for k, v in dict(batch).items() if k not in _DROP_KEYS}
            with method.recording() as gates:
                model(**inputs)
            if not gates:
                continue
            b = next(iter(gates.values()))["alpha"].shape[0]
            n += b
            for i, g in gates.items():
                a = g["alpha"].double()
                sums[i] = sums.get(i, 0) + a.sum(0)
                sq[i] = sq.get(i, 0) + (a * a).sum(0)
                lam[i] = g["lambda"]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("probe_gates got no examples: the batch iterable is empty")
    alpha, alpha_std, lambdas, gate, mass = [], [], [], [], []
    for i in range(len(lengths)):
        if i not in sums:
            for column, empty in ((alpha, []), (alpha_std, []), (lambdas, None), (gate, []), (mass, 0.0)):
                column.append(empty)
            continue
        mean = sums[i] / n
        var = (sq[i] / n - mean * mean).clamp(min=0)
        alpha.append(mean.tolist())
        alpha_std.append(var.sqrt().tolist())
        lambdas.append(lam[i])
        gate.append((lam[i] * mean).tolist())
        mass.append(abs(lam[i]) * float(mean.mean()))
    return {
        "num_layers": len(lengths), "lengths": lengths, "num_examples": n,
        "alpha": alpha, "alpha_std": alpha_std, "lambda": lambdas, "gate": gate, "layer_mass": mass,
        "gate_pool": method.config.gate_pool, "gate_target": method.config.gate_target,
    }


def plot_gates(gates: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> None:
    """Write a PNG: left, heat map of mean alpha (rows = layers, bottom layer at the bottom; columns = prefix
    positions; grey = no prefix there); right, a bar chart of lambda per layer on the same layer axis.

    Uses matplotlib's object API with the Agg canvas, so it never touches the global pyplot backend.
    """
    import numpy as np

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # matplotlib is the optional "plot" extra
        raise ImportError("plot_gates needs matplotlib: pip install 'softprompt[plot]'") from exc

    num_layers = int(gates["num_layers"])
    width = max([len(a) for a in gates["alpha"]] + [1])
    grid = np.full((num_layers, width), np.nan)
    for i, a in enumerate(gates["alpha"]):
        grid[i, : len(a)] = a
    lambdas = [np.nan if x is None else float(x) for x in gates["lambda"]]

    # Size grows with the grid but stays printable for long prefixes (e.g. 128 tokens) and deep models.
    fig_w = min(16.0, 6.5 + 0.2 * width)
    fig_h = min(14.0, 2.4 + 0.4 * num_layers)
    fig = Figure(figsize=(fig_w, fig_h), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    grid_spec = fig.add_gridspec(1, 2, width_ratios=[max(fig_w - 4.0, 2.5), 3.0])
    ax = fig.add_subplot(grid_spec[0, 0])
    cmap = _cmap()
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", origin="lower", cmap=cmap, vmin=0.0, vmax=1.0,
                   interpolation="nearest")
    ax.set_xlabel("prefix position j")
    ax.set_ylabel("layer i")
    ax.set_yticks(range(0, num_layers, max(1, num_layers // 24)))
    ax.set_xticks(range(0, width, max(1, width // 10)))
    ax.set_title("token gate: mean $\\alpha_{i,j}$")
    cbar = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.03)
    cbar.set_label("mean $\\alpha$ (0 = prefix token off, 1 = fully on)")

    bx = fig.add_subplot(grid_spec[0, 1], sharey=None)
    colors = ["tab:blue" if not np.isnan(v) and v >= 0 else "tab:red" for v in lambdas]
    bx.barh(range(num_layers), [0 if np.isnan(v) else v for v in lambdas], color=colors)
    for i, v in enumerate(lambdas):
        if np.isnan(v):
            bx.text(0, i, " no prefix", va="center", fontsize=8, color="grey")
    bx.set_yticks(range(0, num_layers, max(1, num_layers // 24)))
    bx.set_ylim(-0.5, num_layers - 0.5)
    bx.axvline(0, color="black", lw=0.8)
    bx.set_xlabel("$\\lambda_i$ (layer gate)")
    bx.set_ylabel("layer i")
    bx.set_title("layer gate $\\lambda_i$ (red: < 0)")
    head = title or "APT gates"
    sub = f"{gates.get('num_examples', '?')} examples, pool={gates.get('gate_pool')}, target={gates.get('gate_target')}"
    fig.suptitle(f"{head}\n{sub}", fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")


def _cmap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="lightgrey")  # grey = layer/position without a prefix


def allocate_lengths(gates: Mapping[str, Any], budget: int, min_length: int = 0) -> list[int]:
    """PT-2*: per-layer prefix lengths summing exactly to ``budget``, following the gates' per-layer mass.

    Rule (the paper's exact rule is unverified; this is the spec's "sum" rule with exact rounding):
    every layer first gets ``min_length`` (default 0, so a layer the gates switched off can get no prefix); the rest,
    R = budget - L*min_length, is shared in proportion to g_i = ``gates["layer_mass"][i]`` (|lambda_i| times the
    layer's mean alpha; 0 for layers without a prefix): quota_i = R * g_i / sum_j g_j. Each layer takes
    floor(quota_i) and the R - sum floor(quota_i) leftover tokens go to the largest fractional parts (ties: larger
    g_i, then the lower layer). If every g_i is 0 the rest is shared equally.
    The result is usable as ``PrefixConfig(layer_lengths=...)``.
    """
    mass = [float(m) for m in gates["layer_mass"]]
    num_layers = len(mass)
    if not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"budget must be a positive integer number of prefix tokens, got {budget!r}")
    if min_length < 0 or min_length * num_layers > budget:
        raise ConfigError(f"min_length={min_length} for {num_layers} layers does not fit in budget {budget}")
    if any(not math.isfinite(m) or m < 0 for m in mass):
        raise ValueError(f"layer_mass must be finite and >= 0, got {mass}")
    rest = budget - min_length * num_layers
    total = sum(mass)
    weights = mass if total > 0 else [1.0] * num_layers
    total = sum(weights)
    quotas = [rest * w / total for w in weights]
    lengths = [min_length + math.floor(q) for q in quotas]
    left = budget - sum(lengths)
    order = sorted(range(num_layers), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), -weights[i], i))
    for i in order[: max(left, 0)]:
        lengths[i] += 1
    for i in reversed(order):  # only if float rounding overshot: take back from the smallest fractions
        if sum(lengths) <= budget:
            break
        if lengths[i] > min_length:
            lengths[i] -= 1
    return lengths


def save_layer_lengths(lengths: list[int], path: str | os.PathLike) -> None:
    """Write ``{"layer_lengths": [...]}`` atomically; ``PrefixConfig(**json.load(open(path)))`` reads it back."""
    from ...io import atomic_write_json

    atomic_write_json(path, {"layer_lengths": [int(n) for n in lengths]})


def prune(model, batches: Iterable[Mapping[str, Any]], budget: int, path: str | os.PathLike | None = None,
          min_length: int = 0) -> list[int]:
    """probe_gates + allocate_lengths (+ save_layer_lengths when ``path`` is given)."""
    lengths = allocate_lengths(probe_gates(model, batches), budget, min_length=min_length)
    if path is not None:
        save_layer_lengths(lengths, path)
    return lengths


__all__ = ["allocate_lengths", "plot_gates", "probe_gates", "prune", "save_layer_lengths"]
