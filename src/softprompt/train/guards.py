"""Checks a training run passes before it loads anything: values that would fail late, and outputs that would be
destroyed. Every refusal is a one-line :class:`ConfigError` naming the flag and the fix, and changes nothing on disk."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..errors import ConfigError
from ..methods import config_from_dict, method_classes
from .trainer import last_checkpoint


def check_values(cfg) -> None:
    """Numbers that are wrong whatever the model: learning rate, batch size, lengths, steps."""
    method_classes(cfg.method)  # an unknown method names the known ones
    config_from_dict(cfg.method, dict(cfg.method_options))  # option errors before any model is loaded
    if cfg.lr is not None and not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"--lr must be a positive finite number, got {cfg.lr!r}")
    for name, value in (("--batch-size", cfg.batch_size), ("--max-length", cfg.max_length),
                        ("--eval-batch-size", cfg.eval_batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    if cfg.max_steps <= 0 and not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise ConfigError(f"--epochs must be > 0 (or give --max-steps), got {cfg.epochs!r}")
    if not 0 <= getattr(cfg, "carve_dev", 0.0) < 1:
        raise ConfigError(f"--carve-dev must be a fraction in [0, 1), got {cfg.carve_dev}")
    if getattr(cfg, "carve_dev", 0.0) and cfg.file:
        raise ConfigError("--carve-dev carves a registry task's train split; with --file give the held-out rows as "
                          "--eval-file")
    if cfg.save_steps is not None and cfg.save_steps < 1:
        raise ConfigError(f"--save-steps must be >= 1, got {cfg.save_steps}")


def _saved_method(folder: Path) -> str | None:
    try:
        return json.loads((folder / "adapter_config.json").read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        return None


def check_output(cfg) -> None:
    """``--output`` must be a new or empty folder, this run's own folder with ``--resume``, or (``--overwrite``) a
    folder whose adapter files may be replaced. Another run's checkpoints are never touched."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file; give a folder (it is created if missing)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    checkpoints = sorted(d.name for d in out.glob("checkpoint-*") if d.is_dir())
    if getattr(cfg, "resume", False):
        newest = last_checkpoint(str(out))
        saved = _saved_method(Path(newest)) if newest else _saved_method(out)
        if saved is not None and saved != cfg.method:
            raise ConfigError(f"--resume with --method {cfg.method}, but {out} holds a {saved!r} run; resume it "
                              f"with --method {saved}, or train into another --output")
        return
    if checkpoints:
        raise ConfigError(f"{out} holds checkpoints of another run ({', '.join(checkpoints[:3])}); continue that run "
                          "with --resume, or give another --output (nothing was changed)")
    if not getattr(cfg, "overwrite", False):
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise ConfigError(f"--output {out} is not empty ({shown}); pass --overwrite to replace the adapter files "
                          "in it, --resume to continue the run it holds, or give another --output")


def resume_point(cfg) -> str | None:
    """The checkpoint a ``--resume`` run continues from, said out loud either way."""
    if not getattr(cfg, "resume", False):
        return None
    found = last_checkpoint(cfg.output)
    if found is None:
        print(f"softprompt train: no complete checkpoint in {cfg.output} yet; starting from step 0", file=sys.stderr)
    else:
        print(f"softprompt train: resuming from {found}", file=sys.stderr)
    return found
