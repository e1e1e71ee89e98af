"""Shared pieces of ``benchmarks/dnd_bench.py`` (split out of it, unchanged): the experiment's sizes (``DEFAULTS``,
frozen in ``state/config.json`` at a state's first ``run``) with the option types, the dataset short names, the stage
priors and titles, and the small helpers every part uses (atomic JSON writes, sha256 ranking, short names, the
environment record). The process clock ``T_START`` and ``log`` stay in ``dnd_bench.py``, where the tests reset it."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

SHORT = {"commonsense/arc_easy": "arc_easy", "commonsense/arc_challenge": "arc_challenge",
         "superglue/boolq": "boolq", "commonsense/hellaswag": "hellaswag", "commonsense/piqa": "piqa",
         "commonsense/winogrande": "winogrande", "commonsense/openbookqa": "openbookqa"}

# Sizes of the experiment (frozen in state/config.json at the first run). Defaults: the H100 plan of docs/dnd_gpu.md.
DEFAULTS: dict = {
    "model": None,                     # HF folder of the base model (required at the first run)
    "encoder": "minilm",               # condition encoder: alias or HF folder
    "datasets": ",".join(SHORT.values()),
    "eval_n": 500,                     # evaluated test examples per dataset (sha256-ranked, fixed)
    "min_pool": 128,                   # held-out prompts come from the rest of the test part if at least this many
    "heldout_pool": 1000,              # max condition prompts of a held-out dataset
    "train_pool": 1000,                # max condition prompts per training dataset (its zoo part)
    "rank": 8, "targets": "all", "warmup_steps": 75, "checkpoints": 50, "zoo_lr": 1e-4, "zoo_batch": 32,
    "max_length": 512, "train_limit": 0, "init_seed": 42, "data_seed": 0,
    "curve_steps": "5,10,20,40,75,100",  # training-curve points scored for the cost comparison (+ the final step)
    "n_prompts": 32, "cond_length": 128, "gen_steps": 800, "gen_batch": 8, "gen_lr": 1e-3, "gen_warmup": 50,
    "gen_weight_decay": 0.1, "width": 64, "n_layers": 4, "kernel": 5, "chunk": 192, "target": "ab",
    "stats_code": "relative", "gen_seed": 0,
    "samples": 5,                      # generated adapters per held-out dataset (prompt draws, seeds 0..samples-1)
    "prompt_counts": "4,16,64",        # ablation: distinct condition prompts at generation time
    "ablation_samples": 2,
    "answer_datasets": "arc_challenge,boolq,winogrande",  # prompt+answer ablation ("all", "none" or a list)
    "measures": "loglik,gen",          # main table (base, train LoRAs, zoo mean, DnD draws, own LoRA)
    "curve_measures": "loglik",        # training-curve points of the cost comparison
    "ablation_measures": "loglik,gen",  # number-of-prompts ablation
    "max_new_tokens": 8,
}
INT_KEYS = {"eval_n", "min_pool", "heldout_pool", "train_pool", "rank", "warmup_steps", "checkpoints", "zoo_batch",
            "max_length", "train_limit", "init_seed", "data_seed", "n_prompts", "cond_length", "gen_steps",
            "gen_batch", "gen_warmup", "width", "n_layers", "kernel", "chunk", "gen_seed", "samples",
            "ablation_samples", "max_new_tokens"}
FLOAT_KEYS = {"zoo_lr", "gen_lr", "gen_weight_decay"}
# Seconds per stage kind on one H100 with the defaults (used until a stage of that kind has been measured).
PRIORS = {"base": 30.0, "zoo": 60.0, "gen": 100.0, "ans": 80.0}
KIND_TITLES = {"base": "base model evaluation (all datasets)", "zoo": "LoRA zoo for one dataset (+ its scores)",
               "gen": "generator + generated adapters + ablation (one held-out dataset)",
               "ans": "prompt+answer generator (one held-out dataset)"}

def write_json(path: Path, obj) -> None:
    """Atomic JSON write."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def sha_rank(key: str, n: int) -> list[int]:
    """Indices 0..n-1 ordered by sha256(f"{key}|{i}") (deterministic, file-order independent)."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{key}|{i}".encode()).hexdigest())


def short(d: str) -> str:
    return SHORT.get(d, d.replace("/", "__"))


def env_info() -> dict:
    import peft
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["device"] = (f"{torch.cuda.get_device_name(0)} ({p.total_memory / 2**30:.0f} GiB), "
                          f"CUDA {torch.version.cuda}")
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores)"
    return info
