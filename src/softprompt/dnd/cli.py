"""``softprompt dnd zoo|train|generate|eval``: the Drag-and-Drop pipeline on the command line.

Every handler lives here and imports its step lazily, so ``softprompt --help`` never loads torch or peft. The
``*_main`` functions take an argparse namespace (tests and the benchmark call them with ``Namespace``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import SoftPromptError


def _names(value: str | list[str] | None) -> list[str] | None:
    if value is None or isinstance(value, list):
        return value
    return [x.strip() for x in value.split(",") if x.strip()]


def zoo_main(args: argparse.Namespace) -> dict[str, Any]:
    """``softprompt dnd zoo``: one LoRA per dataset from a shared init, many checkpoints under a decaying lr.

    Reads ``model``, ``datasets`` (comma string or list; default the seven), ``rank``, ``targets``,
    ``warmup_steps``, ``checkpoints``, ``out``; optional ``format``, ``lr``, ``checkpoint_lr``, ``checkpoint_every``,
    ``schedule``, ``min_lr_ratio``, ``batch_size``, ``max_length``, ``init_seed``, ``train_limit``, ``dev_limit``,
    ``device``."""
    from .templates import DATASETS, canonical_name
    from .zoo import build_zoo

    ds = [canonical_name(d) for d in (_names(getattr(args, "datasets", None)) or list(DATASETS))]
    kw = {k: getattr(args, k) for k in ("lr", "checkpoint_lr", "checkpoint_every", "schedule", "min_lr_ratio",
                                         "format", "batch_size", "max_length", "init_seed", "train_limit",
                                         "dev_limit", "device")
          if getattr(args, k, None) is not None}
    m = build_zoo(args.model, ds, rank=getattr(args, "rank", None) or 8,
                  targets=getattr(args, "targets", None) or "all", warmup_steps=args.warmup_steps,
                  checkpoints=args.checkpoints, out=args.out, **kw)
    print(json.dumps({"out": str(args.out), "datasets": list(m["datasets"]),
                      "checkpoints": len(m["checkpoints"])}, indent=2))
    return m


def train_main(args: argparse.Namespace) -> dict[str, Any]:
    """``softprompt dnd train --zoo ZOO --holdout D --out GEN``.

    Optional attributes (defaults of :func:`.generator.train_generator` otherwise): steps, batch_size, n_prompts,
    max_length, lr, width, n_layers, kernel, chunk, target, stats_code, encoder, seed, device, condition, and
    ``prompts`` (a folder of ``<dataset>.jsonl``, or a JSON mapping dataset -> JSONL) or ``prompts_for``."""
    from .generator import train_generator
    from .templates import canonical_name

    names = ("steps", "batch_size", "n_prompts", "max_length", "lr", "width", "n_layers", "kernel", "chunk",
             "target", "stats_code", "encoder", "seed", "device", "prompts", "prompts_for", "weight_decay", "warmup",
             "log_every", "condition")
    kw = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    holdout = ",".join(canonical_name(h) for h in _names(args.holdout) or [])
    res = train_generator(args.zoo, holdout, args.out, **kw)
    print(f"generator: {res['parameters']:,} parameters, final loss {res['losses'][-1]:.5f}, "
          f"{res['seconds']:.1f} s -> {res['out']}")
    return res


def _check_out(out: str | Path, overwrite: bool) -> None:
    """Refuse to write into an existing non-empty folder (a user's adapter) unless ``--overwrite``."""
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not overwrite:
        raise SoftPromptError(f"--out {out} exists and is not empty: choose another folder or pass --overwrite")


def generate_main(args: argparse.Namespace) -> dict[str, Any]:
    """``softprompt dnd generate --generator GEN --prompts FILE|DATASET --out ADAPTER``.

    ``prompts``: a JSONL/JSON/TXT file, a CSV/TSV file (``column`` names the prompt column; default the first of
    prompt/text/question/...), or a registry dataset name (its DnD ``prompts_part``, default ``test``, unlabeled).
    Optional: ``n_prompts``, ``seed`` (0), ``zoo`` (default: the generator's zoo, if still there), ``base_model``,
    ``dtype`` ("float32"), ``overwrite``. Prints the seconds and the sanity report; returns the report."""
    import torch

    from .condition import read_prompts
    from .export import format_report, sanity_report, write_adapter
    from .generator import generate, load_generator_config, registry_prompts_for

    _check_out(args.out, bool(getattr(args, "overwrite", False)))
    if not (Path(args.generator) / "generator_config.json").exists():
        raise SoftPromptError(f"--generator {args.generator}: no generator_config.json there (train one with "
                              "`softprompt dnd train --zoo ZOO --holdout D --out GEN`)")
    cfg = load_generator_config(args.generator)
    if Path(args.prompts).exists():
        try:
            prompts = read_prompts(args.prompts, column=getattr(args, "column", None))
        except (ValueError, KeyError) as exc:  # a malformed line or a missing column: one line, not a traceback
            raise SoftPromptError(f"--prompts {args.prompts}: {exc}") from None
    else:  # a registry dataset name: its unlabeled DnD test prompts (transductive, as DnD)
        from .. import tasks
        from .templates import canonical_name

        name = canonical_name(args.prompts)
        try:
            tasks.get_task(name)
        except tasks.UnknownTaskError:
            raise SoftPromptError(f"--prompts {args.prompts}: no such file or dataset (give a .jsonl/.txt/.csv "
                                  "file of prompts or a dataset name such as arc_easy)") from None
        prompts = registry_prompts_for(name, getattr(args, "prompts_part", None) or "test",
                                       cfg.get("condition", "instruction"))
    if not prompts:
        raise SoftPromptError(f"--prompts {args.prompts}: no prompts found")
    state, seconds = generate(args.generator, prompts, n_prompts=getattr(args, "n_prompts", None),
                              seed=getattr(args, "seed", 0) or 0)
    dtype = getattr(torch, getattr(args, "dtype", None) or "float32")
    write_adapter(state, Path(args.generator) / "template_adapter_config.json", args.out, dtype=dtype,
                  base_model=getattr(args, "base_model", None))
    print(f"wrote {args.out} in {seconds:.3f} s (generation, {len(prompts)} prompts available)")
    zoo = getattr(args, "zoo", None) or cfg.get("zoo_entries")
    rep: dict[str, Any] = {"seconds": seconds}
    if zoo:
        try:
            rep = sanity_report(state, zoo, seconds=seconds)
            print(format_report(rep))
        except FileNotFoundError as exc:
            print(f"sanity report skipped: zoo not found ({exc})")
    with open(Path(args.out) / "dnd_report.json", "w") as f:
        json.dump(rep, f, indent=2, default=str)
    return rep


def eval_main(args: argparse.Namespace) -> dict[str, Any]:
    """``softprompt dnd eval``: accuracy of a causal LM, with or without a LoRA, on one dataset.

    Reads ``model``, ``adapter`` (or None), ``dataset``, ``split`` (default ``dnd:test``), ``limit``; optional
    ``format`` (``cloze``, the default: acc and acc_norm, and acc_cal for BoolQ; ``letter``: the lettered prompt),
    ``batch_size``, ``measures`` (letter format: comma list of loglik,gen), ``device``, ``out`` (JSON file). Prints a
    table with the chance level and returns the result dict."""
    from .harness import evaluate, load_model
    from .templates import canonical_name

    dataset = canonical_name(args.dataset)
    split = getattr(args, "split", None) or "dnd:test"
    fmt = getattr(args, "format", None) or "cloze"
    model, tok = load_model(args.model, getattr(args, "adapter", None), getattr(args, "device", None))
    bs = getattr(args, "batch_size", None) or 16
    if fmt == "cloze":
        from .cloze import evaluate_cloze

        res = evaluate_cloze(model, tok, dataset, split, limit=getattr(args, "limit", None), batch_size=bs)
        keys = tuple(k for k in ("acc", "acc_norm", "acc_cal") if k in res)
    elif fmt == "letter":
        measures = _names(getattr(args, "measures", None)) or ["loglik", "gen"]
        res = evaluate(model, tok, dataset, split, limit=getattr(args, "limit", None), batch_size=bs,
                       measures=measures)
        keys = tuple(k for k in ("loglik_acc", "gen_acc") if k in res)
    else:
        raise SoftPromptError(f"--format {fmt}: use cloze or letter")
    res = {"model": args.model, "adapter": getattr(args, "adapter", None), "dataset": dataset, "split": split,
           "format": fmt, **res}
    print(f"{'dataset':<28} {'n':>5} " + " ".join(f"{k:>10}" for k in keys) + f" {'chance':>8}")
    print(f"{dataset:<28} {res['n']:>5} " + " ".join(f"{100 * res[k]:>10.1f}" for k in keys)
          + f" {100 * res['chance']:>8.1f}")
    if getattr(args, "out", None):
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


def _run(fn) -> Any:
    def run(args: argparse.Namespace) -> int:
        if getattr(args, "data_dir", None):
            # The harness reads the registry's datasets wherever it is called from; the flag points it at a folder
            # the way `softprompt train --data-dir` does, for this process only.
            import os

            from ..tasks import ENV_VAR

            os.environ[ENV_VAR] = args.data_dir
        fn(args)
        return 0

    return run


def add_dnd_parser(sub: Any) -> None:
    """Register ``softprompt dnd`` and its four steps."""
    dnd = sub.add_parser("dnd", help="Drag-and-Drop: LoRA zoo, prompt-conditioned generator, zero-shot adapters")
    steps = dnd.add_subparsers(dest="dnd_command", required=True)

    p = steps.add_parser("zoo", help="train one LoRA per dataset from a shared init and keep step checkpoints")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--datasets", help="comma list (default: the seven common-sense datasets)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="all", help="all | qv | comma list of projection names")
    p.add_argument("--format", choices=("cloze", "letter"), help="training text (default cloze: answer text)")
    p.add_argument("--warmup-steps", type=int, default=200, help="steps before the first kept checkpoint")
    p.add_argument("--checkpoints", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, help="steps between kept checkpoints (default 1)")
    p.add_argument("--schedule", choices=("cosine", "linear", "constant"), help="lr schedule (default cosine)")
    p.add_argument("--min-lr-ratio", type=float, help="final lr / peak lr (default 0.1)")
    p.add_argument("--out", required=True)
    for name, typ in (("lr", float), ("checkpoint-lr", float), ("batch-size", int), ("max-length", int),
                      ("train-limit", int), ("dev-limit", int), ("init-seed", int)):
        p.add_argument(f"--{name}", type=typ)
    p.add_argument("--device")
    p.add_argument("--data-dir", help="benchmark data folder (default: $SOFTPROMPT_DATA_DIR or ../shared/data)")
    p.set_defaults(func=_run(zoo_main))

    p = steps.add_parser("train", help="train the hyper-convolutional generator on a zoo, holding out one dataset")
    p.add_argument("--zoo", required=True)
    p.add_argument("--holdout", required=True)
    p.add_argument("--out", required=True)
    for name, typ in (("steps", int), ("batch-size", int), ("n-prompts", int), ("max-length", int), ("lr", float),
                      ("width", int), ("n-layers", int), ("kernel", int), ("chunk", int), ("seed", int)):
        p.add_argument(f"--{name}", type=typ)
    p.add_argument("--target", help="ab (the zoo's own A, B; default) | svd (gauge-free low-rank target)")
    p.add_argument("--stats-code", choices=("relative", "dnd"),
                   help="how a token's mean/std are written for the generator (default relative; dnd = the paper's)")
    p.add_argument("--condition", choices=("raw", "instruction"),
                   help="registry prompts: raw question + options (default, as the official code) or our template")
    p.add_argument("--prompts", help="folder of <dataset>.jsonl or a JSON mapping (default: the registry's prompts)")
    p.add_argument("--device")
    p.add_argument("--data-dir", help="benchmark data folder (default: $SOFTPROMPT_DATA_DIR or ../shared/data)")
    p.set_defaults(func=_run(train_main))

    p = steps.add_parser("generate", help="prompts -> a standard PEFT LoRA folder, with a sanity report")
    p.add_argument("--generator", required=True)
    p.add_argument("--prompts", required=True,
                   help="my_prompts.jsonl | .txt (one per line) | .csv (see --column), or a dataset name")
    p.add_argument("--column", help="CSV/TSV column holding the prompts")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing --out folder")
    p.add_argument("--n-prompts", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--zoo")
    p.add_argument("--data-dir", help="benchmark data folder (default: $SOFTPROMPT_DATA_DIR or ../shared/data)")
    p.set_defaults(func=_run(generate_main))

    p = steps.add_parser("eval", help="accuracy of a causal LM with or without a LoRA (cloze acc / acc_norm)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--adapter")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", help="registry split or dnd:zoo|dnd:dev|dnd:test (default dnd:test)")
    p.add_argument("--format", choices=("cloze", "letter"), help="cloze (default) or the lettered prompt")
    p.add_argument("--measures", help="letter format: loglik,gen")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    p.add_argument("--out")
    p.add_argument("--data-dir", help="benchmark data folder (default: $SOFTPROMPT_DATA_DIR or ../shared/data)")
    p.set_defaults(func=_run(eval_main))


__all__ = ["add_dnd_parser", "eval_main", "generate_main", "train_main", "zoo_main"]
