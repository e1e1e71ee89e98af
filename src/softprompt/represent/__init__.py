"""Updatable text representations from task-specific prefixes (arXiv 2305.13499): a prefix bank, R(x), probes.

    from softprompt.represent import PrefixBank, add_task, FeatureSpec, Representer, run_probe
    add_task("bank", "glue/sst2", max_steps=300)                        # train + register one source prefix
    feats = Representer(FeatureSpec("concat", bank="bank")).features(["a text", ("premise", "hypothesis")])
    run_probe(FeatureSpec("concat", bank="bank"), "probes/rte", task="glue/rte")

See docs/prefix_representations.md.
"""

from __future__ import annotations

from .bank import BankEntry, BankError, PrefixBank, add_task, load_prefix_tables
from .cache import FeatureCache, text_hash
from .encoder import PrefixEncoder, pool_features
from .features import FeatureSpec, Representer

__all__ = [
    "BankEntry",
    "BankError",
    "FeatureCache",
    "FeatureSpec",
    "MultiTaskConfig",
    "PrefixBank",
    "PrefixEncoder",
    "Representer",
    "add_task",
    "load_prefix_tables",
    "pool_features",
    "probe_predict",
    "represent_file",
    "run_probe",
    "text_hash",
    "train_multitask",
]


def __getattr__(name: str):
    # The probe / multi-task modules import the task registry and the trainer: resolve them lazily.
    lazy = {"run_probe": ".api", "probe_predict": ".api", "represent_file": ".api", "MultiTaskConfig": ".multitask",
            "train_multitask": ".multitask"}
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
