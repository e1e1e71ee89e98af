"""Export generated LoRA tensors as a standard PEFT folder, and a sanity report against the zoo.

The folder holds ``adapter_config.json`` (copied from a zoo checkpoint, so r, α, targets and α/r match the zoo)
and ``adapter_model.safetensors``; ``peft.PeftModel.from_pretrained(base, folder)`` loads it.
The sanity report compares each module's ‖ΔW‖_F = ‖B·A‖_F (computed in low rank, scaling α/r omitted since it is
shared with the zoo) with the zoo's range, and finds the nearest zoo checkpoint by ‖ΔW − ΔW_zoo‖ over all modules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def read_zoo(zoo: str | Path | Sequence[Mapping], root: str | Path | None = None) -> list[dict]:
    """Zoo entries (dicts with at least ``dataset`` and ``path``; ``step`` etc. kept) with ``path`` resolved to an
    adapter folder. ``zoo`` is a zoo folder (with ``manifest.json``), a manifest file, or a list of entries.
    A manifest may be a list or a dict with a ``checkpoints``/``entries`` list."""
    if isinstance(zoo, (str, Path)):
        p = Path(zoo)
        mf = p / "manifest.json" if p.is_dir() else p
        root = mf.parent
        with open(mf) as f:
            data = json.load(f)
        if isinstance(data, dict):
            for k in ("checkpoints", "entries", "adapters"):
                if k in data:
                    data = data[k]
                    break
            else:
                raise ValueError(f"{mf}: expected a list or a dict with 'checkpoints'")
        zoo = data
    out = []
    for e in zoo:
        if "dataset" not in e or "path" not in e:
            raise ValueError(f"zoo entry needs 'dataset' and 'path': {e}")
        path = Path(e["path"])
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        if path.is_file():
            path = path.parent
        out.append({**e, "path": str(path)})
    return out


def read_lora_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a PEFT adapter folder (or ``.safetensors`` file)."""
    from safetensors.torch import load_file

    p = Path(path)
    return load_file(str(p / ADAPTER_WEIGHTS if p.is_dir() else p))


def write_adapter(state: Mapping[str, torch.Tensor], template_config: str | Path | Mapping, out: str | Path,
                  dtype: torch.dtype | None = None, base_model: str | None = None) -> Path:
    """Write a PEFT LoRA folder ``out`` from ``state`` (PEFT keys) and a template ``adapter_config.json``
    (a path to the file, to the checkpoint folder holding it, or the dict itself)."""
    from safetensors.torch import save_file

    if isinstance(template_config, (str, Path)):
        p = Path(template_config)
        with open(p / ADAPTER_CONFIG if p.is_dir() else p) as f:
            cfg = json.load(f)
    else:
        cfg = dict(template_config)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"template is not a LoRA config: {cfg.get('peft_type')}")
    ranks = {int(v.shape[0]) for k, v in state.items() if k.endswith("lora_A.weight")}
    if ranks and cfg.get("r") not in ranks:
        raise ValueError(f"template r={cfg.get('r')} but tensors have rank {sorted(ranks)}")
    if base_model:
        cfg["base_model_name_or_path"] = base_model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(out / ADAPTER_CONFIG, "w") as f:
        json.dump(cfg, f, indent=2)
    return out


def _factors(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from .tokenizer import lora_modules

    return {p: (state[p + ".lora_A.weight"].double(), state[p + ".lora_B.weight"].double())
            for p in lora_modules(state)}


def delta_norms(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """‖B·A‖_F per module, computed in low rank."""
    return {p: float(torch.trace((b.t() @ b) @ (a @ a.t())).clamp_min(0).sqrt())
            for p, (a, b) in _factors(state).items()}


def delta_distance(s1: Mapping[str, torch.Tensor], s2: Mapping[str, torch.Tensor]) -> float:
    """sqrt(Σ_modules ‖B₁A₁ − B₂A₂‖²_F), in low rank."""
    f1, f2 = _factors(s1), _factors(s2)
    tot = 0.0
    for p, (a1, b1) in f1.items():
        a2, b2 = f2[p]
        tot += float(torch.trace((b1.t() @ b1) @ (a1 @ a1.t())) + torch.trace((b2.t() @ b2) @ (a2 @ a2.t()))
                     - 2 * torch.trace((b1.t() @ b2) @ (a2 @ a1.t())))
    return math.sqrt(max(tot, 0.0))


def zoo_norm_ranges(entries: Sequence[Mapping]) -> dict[str, tuple[float, float]]:
    """Per-module (min, max) of ‖B·A‖_F over zoo checkpoints."""
    ranges: dict[str, list[float]] = {}
    for e in entries:
        for p, n in delta_norms(read_lora_tensors(e["path"])).items():
            lo, hi = ranges.get(p, [math.inf, -math.inf])
            ranges[p] = [min(lo, n), max(hi, n)]
    return {p: (lo, hi) for p, (lo, hi) in ranges.items()}


def sanity_report(state: Mapping[str, torch.Tensor], zoo: str | Path | Sequence[Mapping],
                  seconds: float | None = None) -> dict:
    """Compare a generated adapter with a zoo. Fields: ``modules`` {prefix: {norm, zoo_min, zoo_max, in_range}},
    ``n_modules``, ``n_out_of_range``, ``total_norm``, ``zoo_total_norm_range``, ``nearest`` {dataset, step,
    path, distance, relative_distance} (relative to the nearest checkpoint's total norm), ``distances`` per
    checkpoint, ``finite`` and ``seconds``."""
    entries = read_zoo(zoo)
    norms = delta_norms(state)
    ranges: dict[str, list[float]] = {}
    totals, dists = [], []
    for e in entries:
        zs = read_lora_tensors(e["path"])
        zn = delta_norms(zs)
        for p, n in zn.items():
            lo, hi = ranges.get(p, [math.inf, -math.inf])
            ranges[p] = [min(lo, n), max(hi, n)]
        totals.append(math.sqrt(sum(v * v for v in zn.values())))
        dists.append(delta_distance(state, zs))
    mods = {}
    for p, n in norms.items():
        lo, hi = ranges.get(p, [math.nan, math.nan])
        mods[p] = {"norm": n, "zoo_min": lo, "zoo_max": hi, "in_range": bool(lo <= n <= hi)}
    best = min(range(len(entries)), key=lambda i: dists[i]) if entries else None
    nearest = None
    if best is not None:
        e = entries[best]
        nearest = {"dataset": e["dataset"], "step": e.get("step"), "path": e["path"], "distance": dists[best],
                   "relative_distance": dists[best] / totals[best] if totals[best] > 0 else math.inf}
    return {
        "seconds": seconds,
        "finite": all(bool(torch.isfinite(v).all()) for v in state.values()),
        "n_modules": len(mods),
        "n_out_of_range": sum(not m["in_range"] for m in mods.values()),
        "total_norm": math.sqrt(sum(m["norm"] ** 2 for m in mods.values())),
        "zoo_total_norm_range": (min(totals), max(totals)) if totals else None,
        "modules": mods,
        "nearest": nearest,
        "distances": [{"dataset": e["dataset"], "step": e.get("step"), "distance": d} for e, d in zip(entries, dists)],
    }


def format_report(rep: Mapping, max_lines: int = 10) -> str:
    """Human-readable summary of :func:`sanity_report` (at most ``max_lines`` out-of-range modules listed)."""
    lines = []
    if rep.get("seconds") is not None:
        lines.append(f"generated in {rep['seconds']:.3f} s")
    lo_hi = rep.get("zoo_total_norm_range")
    rng = f"zoo range [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else "no zoo"
    lines.append(f"total ||dW|| = {rep['total_norm']:.4g} ({rng}); finite: {rep['finite']}")
    lines.append(f"modules outside the zoo's norm range: {rep['n_out_of_range']}/{rep['n_modules']}")
    bad = [(p, m) for p, m in rep["modules"].items() if not m["in_range"]]
    for p, m in bad[:max_lines]:
        lines.append(f"  {p}: {m['norm']:.4g} not in [{m['zoo_min']:.4g}, {m['zoo_max']:.4g}]")
    if len(bad) > max_lines:
        lines.append(f"  ... and {len(bad) - max_lines} more")
    n = rep.get("nearest")
    if n:
        lines.append(f"nearest zoo checkpoint: {n['dataset']} step {n['step']} ({n['path']}), distance "
                     f"{n['distance']:.4g} ({n['relative_distance']:.1%} of its norm)")
    return "\n".join(lines)
