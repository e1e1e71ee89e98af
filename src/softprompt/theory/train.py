"""Training the actual linear-attention model in each regime (spec sections 4 and 7).

Protocol: Adam, one batch per task per step (the JT objective
``sum_k pi_k MSE_k`` is minimised with a single optimiser step), learning-rate
step decay (x0.1 at 60% and 85% of the phase by default), and several
restarts trained in parallel, keeping the best on fresh evaluation draws.

Regimes:

* ``pt``: ``W_q, W_k, W_v`` on the mixture, no prompts, readout ``e_{d+1}``;
* ``ft``: PT first, then the attention is frozen and only the prompts train;
* ``jt``: prompts and attention jointly;
* ``dec``: prompts, per-task heads and attention jointly.

Choices that differ from the official script (documented in docs/theory.md):
PT also uses one stratified batch per task (pi-weighted), which has the same
expected loss as mixture batches and less gradient noise; the FT phase takes
one pi-weighted step instead of one unweighted step per task (the prompts of
different tasks do not interact once the attention is frozen, and Adam is
invariant to a per-task loss scale); weight decay defaults to 0 because the
official 1e-3 L2 penalty biases the optimum; all restarts share the training
draws.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .closed_form import closed_form
from .config import TaskMixture
from .limits import check_training
from .model import LinearAttn, tokens
from .montecarlo import MCResult, evaluate_paired, reduced_predictor
from .sampling import TaskSampler

__all__ = ["TRAINABLE_REGIMES", "TrainConfig", "TrainResult", "train", "train_multi"]

TRAINABLE_REGIMES: tuple[str, ...] = ("pt", "ft", "jt", "dec")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes:
        steps: optimiser steps (for FT: of the prompt phase).
        pretrain_steps: FT only: steps of the PT phase (default: ``steps``).
        lr: Adam learning rate.
        batch: prompts per task per step.
        runs: restarts trained in parallel; the best on evaluation is kept.
        decay_at: fractions of a phase at which the learning rate is multiplied by ``decay_factor``.
        decay_factor: the step-decay factor.
        weight_decay: Adam's L2 penalty (official script: 1e-3; default 0).
        eval_batches: evaluation batches per task (fresh draws).
        eval_batch: prompts per evaluation batch.
        seed: seeds initialisation, training draws and evaluation draws.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: training dtype (evaluation is always float64).
        log_every: record the training loss every this many steps (0: 50 points per phase).
    """

    steps: int = 20_000
    pretrain_steps: int | None = None
    lr: float = 1e-3
    batch: int = 3072
    runs: int = 4
    decay_at: tuple[float, ...] = (0.6, 0.85)
    decay_factor: float = 0.1
    weight_decay: float = 0.0
    eval_batches: int = 10
    eval_batch: int = 3072
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    log_every: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["dtype"] = str(self.dtype).replace("torch.", "")
        out["decay_at"] = list(self.decay_at)
        return out


@dataclass
class TrainResult:
    """Outcome of training one regime at one context length.

    Attributes:
        regime: ``pt``, ``ft``, ``jt`` or ``dec``.
        n: context length used in training and evaluation.
        evals: one :class:`MCResult` per restart (fresh float64 draws).
        best_run: index of the restart with the lowest evaluation loss.
        seconds: wall time of the training (evaluation excluded).
        config: the :class:`TrainConfig` used.
        theory: the regime's closed-form normalised loss at ``n``.
        theory_mc: the closed-form parameters evaluated on the same draws as ``evals``
            (each eval's ``paired_diff`` is relative to it).
        history: ``(step, mean normalised training loss over runs)`` pairs.
        model: the trained (all-runs) model.
        pretrain: FT only: the result of its PT phase.
        structure: how far the best run is from the reduced form of spec section 3
            (see :func:`_structure`).
    """

    regime: str
    n: int
    evals: list[MCResult]
    best_run: int
    seconds: float
    config: TrainConfig
    theory: float
    theory_mc: MCResult
    history: list[tuple[int, float]] = field(default_factory=list)
    model: LinearAttn | None = None
    pretrain: TrainResult | None = None
    structure: dict[str, Any] = field(default_factory=dict)

    @property
    def normalised(self) -> np.ndarray:
        """Normalised evaluation loss of every restart."""
        return np.array([e.normalised for e in self.evals])

    @property
    def best(self) -> float:
        """Minimum normalised loss over restarts (the official plots' statistic)."""
        return float(self.normalised.min())

    @property
    def best_se(self) -> float:
        """Monte-Carlo standard error of :attr:`best` (normalised)."""
        return self.evals[self.best_run].se_normalised

    @property
    def best_vs_theory(self) -> tuple[float, float]:
        """Paired ``(best - closed form) / closed form`` and its standard error (relative)."""
        e = self.evals[self.best_run]
        scale = self.theory_mc.loss
        return e.paired_diff / scale, e.paired_diff_se / scale

    @property
    def mean(self) -> float:
        """Mean normalised loss over restarts."""
        return float(self.normalised.mean())

    @property
    def std(self) -> float:
        """Standard deviation over restarts (0 for a single run)."""
        return float(self.normalised.std(ddof=1)) if len(self.evals) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no tensors)."""
        return {
            "regime": self.regime,
            "n": self.n,
            "best": self.best,
            "best_se": self.best_se,
            "best_run": self.best_run,
            "mean": self.mean,
            "std": self.std,
            "runs": self.normalised.tolist(),
            "theory": self.theory,
            "theory_mc": self.theory_mc.normalised,
            "best_vs_theory_rel": self.best_vs_theory[0],
            "best_vs_theory_rel_se": self.best_vs_theory[1],
            "seconds": self.seconds,
            "config": self.config.to_dict(),
            "history": [list(h) for h in self.history],
            "structure": self.structure,
            "pretrain": None if self.pretrain is None
            else {k: v for k, v in self.pretrain.to_dict().items() if k != "history"},
        }


def _schedule(opt: torch.optim.Optimizer, steps: int, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    milestones = sorted({max(1, round(f * steps)) for f in cfg.decay_at if 0 < f < 1})
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.decay_factor)


def _fit(
    model: LinearAttn,
    params: Sequence[torch.nn.Parameter],
    mix: TaskMixture,
    ns: Sequence[int],
    steps: int,
    cfg: TrainConfig,
    sampler: TaskSampler,
    use_prompt: bool,
    callback: Callable[[int, float], None] | None = None,
) -> list[tuple[int, float]]:
    """Adam with step decay on ``sum_r sum_k pi_k MSE_{r,k}`` (runs independent).

    The runs are split into ``len(ns)`` equal groups, group ``i`` trained at
    context length ``ns[i]``. One draw of ``max(ns)`` examples serves every
    group through its first ``ns[i]`` rows: each group still sees exact
    samples of its own distribution, and the groups (like the restarts)
    merely share randomness.
    """
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, steps, cfg)
    every = cfg.log_every or max(1, steps // 50)
    history: list[tuple[int, float]] = []
    pis = torch.as_tensor(mix.pis, dtype=cfg.dtype, device=cfg.device)
    n_max = max(ns)
    for step in range(steps):
        batch = sampler.sample_all(n_max, cfg.batch)
        Z, zq = tokens(batch)
        pred = model.forward_all(prefix_grams(Z, ns), zq, use_prompt=use_prompt)  # (R, K, B)
        mse = ((pred - batch.yq) ** 2).mean(-1)  # (R, K)
        total = mse @ pis  # (R,): the JT objective sum_k pi_k MSE_k, per run
        opt.zero_grad(set_to_none=True)
        total.sum().backward()  # runs are independent: Adam is element-wise
        opt.step()
        sched.step()
        if step % every == 0 or step == steps - 1:
            val = float(total.detach().mean()) / mix.norm
            history.append((step, val))
            if callback is not None:
                callback(step, val)
    return history


def prefix_grams(Z: torch.Tensor, ns: Sequence[int]) -> torch.Tensor:
    """``Z[..., :n, :]^T Z[..., :n, :]`` for every ``n`` in ``ns``: shape ``(K, len(ns), B, D, D)``.

    Computed from the Gram matrices of the segments between consecutive
    sorted lengths and a cumulative sum, so the work is that of one Gram
    matrix of ``max(ns)`` rows.
    """
    order = sorted(range(len(ns)), key=lambda i: ns[i])
    segs, lo = [], 0
    for i in order:
        hi = ns[i]
        part = Z[..., lo:hi, :]
        segs.append(part.transpose(-1, -2) @ part)
        lo = hi
    cum = torch.cumsum(torch.stack(segs, dim=1), dim=1)  # sorted order
    inverse = [order.index(i) for i in range(len(ns))]
    return cum[:, inverse]


def _evaluate(
    model: LinearAttn, mix: TaskMixture, n: int, regime: str, cfg: TrainConfig, use_prompt: bool
) -> tuple[list[MCResult], MCResult]:
    """Fresh float64 draws (seed disjoint from training), with the regime's closed form on the same draws."""
    ref = reduced_predictor(closed_form(mix, [n], regime).params, device=cfg.device)
    return evaluate_paired(
        mix,
        n,
        model.predictor(use_prompt=use_prompt),
        ref,
        draws=cfg.eval_batches * cfg.eval_batch,
        chunk=cfg.eval_batch,
        seed=cfg.seed + 7_919_000 + n,
        device=cfg.device,
    )


def _structure(model: LinearAttn, mix: TaskMixture) -> dict[str, Any]:
    """Reduced-form diagnostics of a single-run model (spec section 3).

    ``a_rel = |a| / |A|_F`` and ``u_x_rel = |u_x| / |u_y|`` vanish at the
    plain/prompt optimum of the reduced model; with heads, the decoupled
    solution has ``u_x,k`` parallel to ``-mu_k`` (cosine +1).
    """
    out: dict[str, Any] = {}
    views = [model.reduced_view(k) for k in range(mix.K if model.heads is not None else 1)]
    v0 = views[0]
    out["a_rel"] = float(v0["a"].norm() / v0["A"].norm())
    out["u_x_rel"] = [float(v["u_x"].norm() / v["u_y"].abs().clamp_min(1e-30)) for v in views]
    if model.heads is not None:
        cos = []
        for k, v in enumerate(views):
            mu = torch.as_tensor(mix.mus[k], dtype=v["u_x"].dtype, device=v["u_x"].device)
            ux = v["u_x"][0] * torch.sign(v["u_y"][0])  # orientation relative to u_y
            cos.append(float(torch.dot(ux, -mu) / (ux.norm() * mu.norm()).clamp_min(1e-30)))
        out["cos_u_x_minus_mu"] = cos
    return out


def _results(
    model: LinearAttn,
    regime: str,
    mix: TaskMixture,
    ns: Sequence[int],
    cfg: TrainConfig,
    seconds: float,
    history: list[tuple[int, float]],
    use_prompt: bool,
) -> dict[int, TrainResult]:
    out: dict[int, TrainResult] = {}
    R = cfg.runs
    for i, n in enumerate(ns):
        sub = model.subset(slice(i * R, (i + 1) * R))
        evals, ref = _evaluate(sub, mix, n, regime, cfg, use_prompt=use_prompt)
        best = int(np.argmin([e.loss for e in evals]))
        theory = float(closed_form(mix, [n], regime, normalise=True).loss[0])
        # Wall time and history are shared by the groups trained together.
        out[n] = TrainResult(regime, n, evals, best, seconds, cfg, theory, ref, history, sub)
        out[n].structure = _structure(sub.subset([best]), mix)
    return out


def train_multi(
    mix: TaskMixture,
    regime: str,
    ns: Sequence[int],
    config: TrainConfig | None = None,
    callback: Callable[[int, float], None] | None = None,
    **overrides: Any,
) -> dict[int, TrainResult]:
    """Train ``config.runs`` restarts of ``regime`` at every context length in ``ns`` at once.

    Args:
        mix: the task mixture.
        regime: ``pt``, ``ft``, ``jt`` or ``dec``.
        ns: distinct context lengths (no 1/n in the model, so each model is
            trained and evaluated at its own n).
        config: settings; keyword ``overrides`` replace its fields.
        callback: optional ``f(step, mean normalised train loss)``.

    Returns:
        ``{n: TrainResult}``; for FT each result's ``pretrain`` holds its PT phase.
    """
    regime = regime.lower()
    if regime not in TRAINABLE_REGIMES:
        raise ValueError(f"unknown regime {regime!r}; trainable regimes: {TRAINABLE_REGIMES}")
    cfg = replace(config or TrainConfig(), **overrides)
    if cfg.steps < 1 or cfg.runs < 1 or cfg.batch < 1:
        raise ValueError("steps, runs and batch must be >= 1")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} requested but CUDA is not available")
    ns = [int(n) for n in ns]
    if len(set(ns)) != len(ns) or min(ns) < 0:
        raise ValueError(f"ns must be distinct non-negative integers, got {ns}")
    # Before the model and the first batch exist: a step holds every restart at every n at once.
    check_training(mix.d, mix.K, ns, cfg.batch, cfg.runs, cfg.dtype.itemsize, str(cfg.device))
    gen = torch.Generator().manual_seed(cfg.seed)
    model = LinearAttn(mix.d, mix.K, runs=cfg.runs * len(ns), prompt_len=1, heads=(regime == "dec"), generator=gen)
    model = model.to(device=cfg.device, dtype=cfg.dtype)
    sampler = TaskSampler(mix, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed + 1)

    t0 = time.perf_counter()
    pre: dict[int, TrainResult] | None = None
    if regime == "ft":
        pre_steps = cfg.pretrain_steps or cfg.steps
        hist = _fit(model, model.attention_parameters(), mix, ns, pre_steps, cfg, sampler,
                    use_prompt=False, callback=callback)
        t_pre = time.perf_counter() - t0
        pre = _results(model, "pt", mix, ns, replace(cfg, steps=pre_steps), t_pre, hist, use_prompt=False)
        for p in model.attention_parameters():
            p.requires_grad_(False)  # FT: the pretrained attention is frozen
        t1 = time.perf_counter()
        history = _fit(model, model.task_parameters(), mix, ns, cfg.steps, cfg, sampler,
                       use_prompt=True, callback=callback)
        seconds = t_pre + time.perf_counter() - t1
    else:
        use_prompt = regime != "pt"
        params = model.attention_parameters() + (model.task_parameters() if use_prompt else [])
        history = _fit(model, params, mix, ns, cfg.steps, cfg, sampler, use_prompt=use_prompt, callback=callback)
        seconds = time.perf_counter() - t0
    out = _results(model, regime, mix, ns, cfg, seconds, history, use_prompt=regime != "pt")
    if pre is not None:
        for n in ns:
            out[n].pretrain = pre[n]
    return out


def train(
    mix: TaskMixture,
    regime: str,
    n: int,
    config: TrainConfig | None = None,
    callback: Callable[[int, float], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``config.runs`` restarts of the linear-attention model in ``regime`` at context length ``n``.

    Keyword ``overrides`` replace :class:`TrainConfig` fields, e.g.
    ``train(mix, "pt", 10, steps=2000, runs=2)``. Returns a :class:`TrainResult`
    whose ``model`` holds all restarts (``best_run`` indexes the best).
    """
    return train_multi(mix, regime, [n], config, callback, **overrides)[int(n)]
