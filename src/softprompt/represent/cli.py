"""Subcommands ``bank {add,remove,list}``, ``represent``, ``probe``, ``probe-predict`` and ``multitask-train``.

The main CLI calls :func:`add_represent_parser` with its subparsers object.
"""

from __future__ import annotations

import argparse
import json

from ..cli.common import add_file_columns, texts_from_args
from ..errors import ConfigError
from .features import KINDS


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _representer_kw(args) -> dict:
    return {"cache_dir": args.cache, "device": args.device, "dtype": _dtype(args.dtype),
            "batch_size": args.batch_size, "progress": not args.no_progress}


def _feature_spec(args):
    from .features import FeatureSpec

    kind = args.combine
    if args.encoder and kind in ("concat", "joint"):
        kind = "encoder"  # --encoder alone means "features of that encoder"
    entries = [t for t in args.entries.split(",") if t] if args.entries else None
    return FeatureSpec(kind=kind, bank=args.bank, model=args.model, encoder=args.encoder, entries=entries,
                       pool=args.pool, max_length=args.max_length)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---- handlers ------------------------------------------------------------------------------------------------------
def cmd_bank_add(args) -> int:
    from .bank import PrefixBank, add_task

    if args.adapter:
        bank = PrefixBank(args.bank)
        metrics = {}
        try:
            with open(f"{args.adapter}/metrics.json") as f:
                metrics = json.load(f)
        except (OSError, json.JSONDecodeError):
            pass
        bank.check_can_add(args.task, args.model, args.replace)
        entry = bank.register(args.adapter, task=args.task, model=args.model,
                              max_length=args.max_length or bank.read_manifest().get("max_length") or 128,
                              metrics=metrics, source=args.adapter, replace=args.replace, move=False)
    else:
        entry = add_task(
            args.bank, args.task, model=args.model, file=args.file, eval_file=args.eval_file,
            text_column=args.text_column, text_pair_column=args.text_pair_column, label_column=args.label_column,
            num_virtual_tokens=args.num_virtual_tokens, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
            batch_size=args.batch_size, max_length=args.max_length, train_limit=args.train_limit,
            eval_limit=args.eval_limit, seed=args.seed, data_dir=args.data_dir, replace=args.replace, bf16=args.bf16,
        )
    _print({"added": entry.task, "id": entry.id, "steps": entry.steps, "train_seconds": entry.train_seconds,
            "sha256": entry.sha256, "metrics": entry.metrics})
    return 0


def cmd_bank_remove(args) -> int:
    from .bank import PrefixBank

    entry = PrefixBank(args.bank).remove(args.task, keep_cache=args.keep_cache)
    _print({"removed": entry.task, "id": entry.id})
    return 0


def cmd_bank_list(args) -> int:
    from .bank import PrefixBank

    bank = PrefixBank(args.bank)
    if args.json:
        _print(bank.read_manifest())
    else:
        print(bank.describe())
    return 0


def cmd_represent(args) -> int:
    from .api import represent_file

    summary = represent_file(_feature_spec(args), args.input, args.out, text_column=args.text_column,
                             text_pair_column=args.text_pair_column, **_representer_kw(args))
    _print(summary)
    return 0


def cmd_probe(args) -> int:
    from .api import run_probe
    from .probe import ProbeConfig

    if not args.task and not args.file:
        raise ConfigError("no training data: give --task NAME or --file train.csv")
    cfg = ProbeConfig(classifier=args.classifier, hidden=args.hidden, lr=args.lr, epochs=args.epochs,
                      patience=args.patience, seed=args.seed)
    metrics = run_probe(_feature_spec(args), args.output, task=args.task, file=args.file, eval_file=args.eval_file,
                        test_file=args.test_file, text_column=args.text_column,
                        text_pair_column=args.text_pair_column, label_column=args.label_column,
                        data_dir=args.data_dir, train_limit=args.train_limit, dev_limit=args.dev_limit,
                        test_limit=args.test_limit, split_seed=args.split_seed, probe_cfg=cfg,
                        **_representer_kw(args))
    _print({k: v for k, v in metrics.items() if k not in ("dev_history", "test", "dev")})
    return 0


def cmd_probe_predict(args) -> int:
    from .api import probe_predict

    texts = texts_from_args(args)
    pairs = list(args.text_pair) if args.text_pair else None
    if pairs is not None and len(pairs) != len(texts):
        raise ConfigError(f"{len(pairs)} --text-pair for {len(texts)} --text: give one --text-pair per --text")
    rows = probe_predict(args.probe, texts, pairs=pairs, choices=args.choice, cache_dir=args.cache,
                         device=args.device, batch_size=args.batch_size, progress=False)
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    return 0


def cmd_multitask(args) -> int:
    from .multitask import MultiTaskConfig, train_multitask

    cfg = MultiTaskConfig(tasks=[t for t in args.tasks.split(",") if t], output=args.output, model=args.model,
                          steps_per_task=args.steps_per_task, max_steps=args.max_steps, batch_size=args.batch_size,
                          lr=args.lr, max_length=args.max_length, train_limit=args.train_limit, pool=args.pool,
                          seed=args.seed, data_dir=args.data_dir, bf16=args.bf16, progress=not args.no_progress)
    metrics = train_multitask(cfg)
    _print({k: v for k, v in metrics.items() if k != "config"})
    return 0


# ---- parsers -------------------------------------------------------------------------------------------------------
def _feature_flags(p: argparse.ArgumentParser, *, bank_required: bool = False) -> None:
    p.add_argument("--bank", required=bank_required, help="prefix-bank folder")
    p.add_argument("--combine", default="concat", choices=KINDS,
                   help="concat: one block per prefix (T*h dims); joint: all prefixes in one pass (h dims); "
                        "frozen: the base encoder without prefixes; encoder: a fine-tuned encoder (--encoder)")
    p.add_argument("--pool", default="cls", choices=("cls", "mean"))
    p.add_argument("--entries", help="comma-separated bank tasks to use, in this order (default: all)")
    p.add_argument("--encoder", help="fine-tuned encoder folder (multi-task baseline: <multitask output>/encoder)")
    p.add_argument("--model", help="base model for --combine frozen without a bank")
    p.add_argument("--max-length", type=int, help="tokens per text (default: the bank's)")
    p.add_argument("--cache", help="feature-cache folder (default: <bank>/cache)")
    p.add_argument("--device", help="cpu / cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bf16", "fp16"))
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward chunk")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_represent_parser(sub) -> None:
    """Register the prefix-bank subcommands on the main CLI's subparsers object."""
    p = sub.add_parser("bank", help="prefix bank: add (train + register), remove, list source-task prefixes")
    bsub = p.add_subparsers(dest="bank_command", required=True)

    a = bsub.add_parser("add", help="train one source-task prefix on the frozen encoder and register it")
    a.add_argument("--bank", required=True)
    a.add_argument("--task", required=True, help="registry task (glue/sst2) or a name for --file data")
    a.add_argument("--model", default="minilm")
    a.add_argument("--adapter", help="register this already trained prefix adapter instead of training")
    add_file_columns(a, "labelled CSV/JSONL to train on instead of the registry task")
    a.add_argument("--eval-file", help="labelled evaluation file (default: --file)")
    a.add_argument("--num-virtual-tokens", type=int, default=10, help="prefix length m")
    a.add_argument("--epochs", type=float, default=3.0)
    a.add_argument("--max-steps", type=int, default=-1)
    a.add_argument("--lr", type=float)
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--max-length", type=int, help="default: the bank's (128 for a new bank)")
    a.add_argument("--train-limit", type=int)
    a.add_argument("--eval-limit", type=int)
    a.add_argument("--seed", type=int, default=42)
    a.add_argument("--data-dir")
    a.add_argument("--replace", action="store_true", help="retrain a task already in the bank")
    a.add_argument("--bf16", action="store_true")
    a.set_defaults(func=cmd_bank_add)

    r = bsub.add_parser("remove", help="unregister a task and drop its cached feature block")
    r.add_argument("--bank", required=True)
    r.add_argument("--task", required=True)
    r.add_argument("--keep-cache", action="store_true")
    r.set_defaults(func=cmd_bank_remove)

    lst = bsub.add_parser("list", help="show the bank's entries")
    lst.add_argument("--bank", required=True)
    lst.add_argument("--json", action="store_true", help="print the manifest")
    lst.set_defaults(func=cmd_bank_list)

    p = sub.add_parser("represent", help="compute R(x) for a text file with a prefix bank (cached)")
    _feature_flags(p)
    p.add_argument("--input", required=True, help="texts: .txt (one per line), .csv/.tsv or .jsonl")
    p.add_argument("--text-column", default="text")
    p.add_argument("--text-pair-column")
    p.add_argument("--out", required=True, help="output .safetensors (tensor 'features' [n, D])")
    p.set_defaults(func=cmd_represent)

    p = sub.add_parser("probe", help="fit a small classifier on cached R(x) for a target task")
    _feature_flags(p)
    p.add_argument("--task", help="registry target task")
    add_file_columns(p, "labelled training file instead of a registry task")
    p.add_argument("--eval-file", help="labelled dev file (default: 20%% of --file)")
    p.add_argument("--test-file", help="labelled test file (default: the dev split)")
    p.add_argument("--output", required=True, help="probe folder (probe.safetensors, probe.json, metrics.json)")
    p.add_argument("--classifier", default="logreg", choices=("logreg", "mlp"))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the dev split carved from train")
    p.add_argument("--train-limit", type=int)
    p.add_argument("--dev-limit", type=int)
    p.add_argument("--test-limit", type=int)
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("probe-predict", help="predict with a probe written by `softprompt probe`")
    p.add_argument("--probe", required=True)
    p.add_argument("--text", action="append")
    p.add_argument("--text-pair", action="append")
    p.add_argument("--choice", action="append", help="answer options (multiple-choice probes)")
    p.add_argument("--file", help="one text per line")
    p.add_argument("--cache")
    p.add_argument("--device")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_probe_predict)

    p = sub.add_parser("multitask-train", help="baseline: fine-tune the encoder on the union of source tasks")
    p.add_argument("--tasks", required=True, help="comma-separated registry source tasks")
    p.add_argument("--output", required=True)
    p.add_argument("--model", default="minilm")
    p.add_argument("--steps-per-task", type=int, default=1000)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--train-limit", type=int)
    p.add_argument("--pool", default="cls", choices=("cls", "mean"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_multitask)
