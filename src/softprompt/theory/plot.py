"""Figures of the theory lab (matplotlib, Agg backend, imported lazily).

The input is the JSON-friendly result dict that ``softprompt theory curves``
writes, so a figure can be redrawn from a saved ``.json`` without rerunning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .closed_form import REGIME_LABELS

__all__ = ["check_result", "config_title", "load_result", "plot_curves"]

_COLORS = {
    "pt": "tab:blue", "ft": "tab:orange", "jt": "tab:green", "dec": "tab:red",
    "oracle": "tab:purple", "jt_gc": "tab:olive",
}
_PANEL_TITLES = {
    "pt": "Plain training",
    "ft": "Fine-tuning with prompts",
    "jt": "Joint training with prompts",
    "dec": "Joint training with even more parameters",
    "oracle": "Per-task optimal W (oracle)",
    "jt_gc": "JT + global centring",
}


def _fmt(x: float) -> str:
    return f"{x:g}"


def config_title(cfg: Mapping[str, Any]) -> str:
    """A compact title like the paper's ``K=2, mu1=1.4, mu2=-0.6, Sigma_b1=1, Sigma_b2=2, pi=(0.3, 0.7)``."""
    mus, cs, pis = cfg.get("mus", []), cfg.get("cs", []), cfg.get("pis", [])
    parts = [f"K={len(pis)}"]
    for i, m in enumerate(mus, 1):
        parts.append(f"μ{i}={_fmt(m)}" if isinstance(m, (int, float)) else f"μ{i}=vector")
    for i, c in enumerate(cs, 1):
        parts.append(f"Σβ{i}={_fmt(c)}" if isinstance(c, (int, float)) else f"Σβ{i}=matrix")
    parts.append("π=(" + ", ".join(_fmt(round(p, 4)) for p in pis) + ")")
    sig = cfg.get("sigma", 0)
    if sig not in (0, 0.0, None):
        parts.append(f"σ={sig}")
    if cfg.get("sigma_x") is not None:
        parts.append("Σx≠I")
    return ", ".join(parts)


def _numbers(value: Any, length: int | None) -> bool:
    """A list of real numbers (JSON null allowed: a missing point), of ``length`` entries when given."""
    ok = isinstance(value, list) and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)) for v in value
    )
    return ok and (length is None or len(value) == length)


def check_result(result: Any) -> None:
    """Check that ``result`` has the schema :func:`plot_curves` reads (what ``theory curves --json`` writes).

    Raises:
        ValueError: naming the first key that is missing or malformed.
    """
    if not isinstance(result, Mapping):
        raise ValueError(f"expected a JSON object, found a JSON {type(result).__name__}")
    ns = result.get("n")
    if not _numbers(ns, None) or not ns or None in ns:
        raise ValueError("key 'n' must be a non-empty list of context lengths")
    theory = result.get("theory")
    if not isinstance(theory, Mapping) or not any(r in _COLORS for r in theory):
        raise ValueError(f"key 'theory' must map at least one regime of {sorted(_COLORS)} to a list of losses")
    for r, ys in theory.items():
        if not _numbers(ys, len(ns)):
            raise ValueError(f"theory[{r!r}] must be a list of {len(ns)} numbers (one per n)")
    for key in ("mc", "train", "config"):
        if not isinstance(result.get(key) or {}, Mapping):
            raise ValueError(f"key {key!r} must be an object")
    for r, mc in (result.get("mc") or {}).items():
        mc = mc if isinstance(mc, Mapping) else {}
        if not (_numbers(mc.get("normalised"), len(ns)) and _numbers(mc.get("se_normalised"), len(ns))):
            raise ValueError(f"mc[{r!r}] must hold 'normalised' and 'se_normalised', {len(ns)} numbers each")
    for r, tr in (result.get("train") or {}).items():
        tr = tr if isinstance(tr, Mapping) else {}
        runs = tr.get("runs")
        if not (_numbers(tr.get("best"), len(ns)) and isinstance(runs, list) and runs and isinstance(runs[0], list)):
            raise ValueError(f"train[{r!r}] must hold 'best' ({len(ns)} numbers) and 'runs' (a list per n)")


def load_result(path: str | Path) -> dict[str, Any]:
    """Read and check a ``theory curves --json`` file.

    Raises:
        ValueError: one line naming the file and what is wrong with it (missing, not JSON, wrong schema).
    """
    p = Path(path)
    fix = "give a JSON written by 'softprompt theory curves --json'"
    if not p.is_file():
        raise ValueError(f"{p}: {'is a directory' if p.is_dir() else 'file not found'}; {fix}")
    try:
        result = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{p}: not valid JSON ({str(exc)[:200]}); {fix}") from None
    try:
        check_result(result)
    except ValueError as exc:
        raise ValueError(f"{p}: not a theory curves result: {exc}; {fix}") from None
    return result


def _measured(result: Mapping[str, Any], regime: str) -> tuple[str, list[float], list[float] | None] | None:
    """The solid curve of a regime: trained best over restarts if present, else Monte-Carlo."""
    tr = (result.get("train") or {}).get(regime)
    if tr:
        return f"trained (best of {len(tr['runs'][0])})", tr["best"], None
    mc = (result.get("mc") or {}).get(regime)
    if mc:
        return "Monte-Carlo ±2 SE", mc["normalised"], [2 * s for s in mc["se_normalised"]]
    return None


def plot_curves(result: Mapping[str, Any], path: str | Path, layout: str = "panels", dpi: int = 110) -> Path:
    """Draw theory (dashed) and trained or Monte-Carlo (solid) normalised losses against n.

    Args:
        result: the dict written by ``softprompt theory curves`` (keys ``n``,
            ``theory``, optionally ``train`` and ``mc``, and ``config``).
        path: output PNG path (parent folders are created).
        layout: ``"panels"`` (one panel per regime, as the paper's overview
            figure, with PT theory as a grey reference) or ``"overlay"``.
        dpi: resolution.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede pyplot
    import matplotlib.pyplot as plt

    ns = result["n"]
    present = [r for r in result["theory"] if r in _COLORS]
    # References that are not paper regimes go into the panel they refine.
    host = {"oracle": "dec", "jt_gc": "jt"}
    regimes = [r for r in present if r not in host or layout == "overlay" or host[r] not in present]
    cfg = result.get("config") or {}
    try:
        title = f"{cfg.get('name', '')}: {config_title(cfg)}"
    except (TypeError, ValueError):  # a hand-edited config block: the title is decoration, the curves still draw
        title = str(cfg.get("name", ""))
    ylabel = r"$L^\star / \mathbb{E}[(x^\top\beta)^2]$"
    if layout == "overlay":
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        axes = [ax] * len(regimes)
    elif layout == "panels":
        fig, axs = plt.subplots(1, len(regimes), figsize=(3.6 * len(regimes), 3.8), sharey=True, squeeze=False)
        axes = list(axs[0])
    else:
        raise ValueError(f"layout must be 'panels' or 'overlay', got {layout!r}")

    for ax, r in zip(axes, regimes):
        col = _COLORS[r]
        if layout == "panels" and r != "pt" and "pt" in result["theory"]:
            ax.plot(ns, result["theory"]["pt"], "--", color="0.7", lw=1.2, label="PT theory")
        ax.plot(ns, result["theory"][r], "--", color=col, lw=1.8, label=f"{r.upper()} theory")
        if layout == "panels":
            for extra, h in host.items():
                if h == r and extra in present:
                    ax.plot(ns, result["theory"][extra], ":", color=_COLORS[extra], lw=1.6,
                            label=f"{REGIME_LABELS[extra]}")
        meas = _measured(result, r)
        if meas is not None:
            label, ys, err = meas
            if err is None:
                ax.plot(ns, ys, "-o", color=col, ms=4, lw=1.4, label=f"{r.upper()} {label}")
            else:
                ax.errorbar(ns, ys, yerr=err, fmt="-o", color=col, ms=4, lw=1.4, capsize=2,
                            label=f"{r.upper()} {label}")
        if layout == "panels":
            ax.set_title(_PANEL_TITLES.get(r, REGIME_LABELS.get(r, r)), fontsize=10)
            ax.set_xlabel("n (in-context examples)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    axes[0].set_ylabel(ylabel)
    if layout == "overlay":
        axes[0].set_xlabel("n (in-context examples)")
        axes[0].grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        axes[0].set_title(title, fontsize=9)
    else:
        fig.suptitle(f"{title}\nfully coupled  →  fully decoupled", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
