"""Theory lab: task-specific prompts for multi-task in-context learning on linear attention.

Reproduces the closed forms and experiments of "Provable Benefits of
Task-Specific Prompts for In-context Learning" (arXiv 2503.02102); see
``docs/theory.md``.

* :mod:`.config`: the data model (:class:`TaskMixture`) and named presets;
* :mod:`.closed_form`: optimal parameters and losses per regime (float64 numpy);
* :mod:`.montecarlo`: Monte-Carlo evaluation with standard errors;
* :mod:`.model` / :mod:`.train`: the one-layer linear attention and its training;
* :mod:`.plot`, :mod:`.cli`: figures and ``softprompt theory ...``.

The numpy-only parts are imported eagerly; torch-based names load on first use.
"""

from __future__ import annotations

from typing import Any

from .closed_form import (
    ALL_REGIMES,
    REGIMES,
    ClosedForm,
    ReducedParams,
    closed_form,
    closed_form_isotropic,
    exact_loss,
    theory_curves,
)
from .config import (
    PRESETS,
    TaskMixture,
    load_config,
    preset,
    preset_names,
    resolve_config,
)

_LAZY = {
    "MCResult": ".montecarlo",
    "monte_carlo": ".montecarlo",
    "evaluate_predictor": ".montecarlo",
    "evaluate_paired": ".montecarlo",
    "reduced_predictor": ".montecarlo",
    "TaskSampler": ".sampling",
    "LinearAttn": ".model",
    "TrainConfig": ".train",
    "TrainResult": ".train",
    "train": ".train",
    "train_multi": ".train",
    "plot_curves": ".plot",
    "add_theory_parser": ".cli",
    "curves": ".cli",
}

__all__ = [
    "ALL_REGIMES",
    "PRESETS",
    "REGIMES",
    "ClosedForm",
    "LinearAttn",
    "MCResult",
    "ReducedParams",
    "TaskMixture",
    "TaskSampler",
    "TrainConfig",
    "TrainResult",
    "add_theory_parser",
    "closed_form",
    "closed_form_isotropic",
    "curves",
    "evaluate_paired",
    "evaluate_predictor",
    "exact_loss",
    "load_config",
    "monte_carlo",
    "plot_curves",
    "preset",
    "preset_names",
    "reduced_predictor",
    "resolve_config",
    "theory_curves",
    "train",
    "train_multi",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
