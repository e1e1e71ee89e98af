"""``softprompt gates`` (APT's gates averaged over a dataset: heat map and lambdas) and ``softprompt prune``
(per-layer prefix lengths for PT-2* from those gates)."""

from __future__ import annotations

import json

from ...cli.common import add_adapter_flags, add_task_flags
from ...errors import ConfigError


def adapter_batches(adapter: str, *, task: str | None = None, split: str | None = None, limit: int | None = None,
                    file: str | None = None, text_column: str = "text", base_model: str | None = None,
                    data_dir: str | None = None,
                    batch_size: int = 64):
    """(model, batches): a saved adapter and tokenised input batches (texts only, no labels) of a registry task
    split (default: the adapter's task, its eval split) or of a user file, on the model's device."""
    from ... import tasks
    from ...data import Collator, featurize
    from ...io import read_adapter_config
    from ...loading import load_for_inference

    task = None if file else task or read_adapter_config(adapter).get("task")
    if not file and not task:  # checked before the model loads
        raise ConfigError("give --task NAME or --file F (the adapter was not trained on a registry task)")
    model, tokenizer, meta = load_for_inference(adapter, base_model)
    if file:
        recs, spec = tasks.load_file(file, text_column=text_column)
        recs = recs[:limit] if limit else recs
    else:
        spec = tasks.get_task(task)
        recs = tasks.load_split(task, split or spec.eval_split, data_dir, limit=limit)
    feats = featurize(recs, spec, tokenizer, meta.get("max_length", 128))
    collate = Collator(tokenizer, spec.kind)
    batches = []
    for i in range(0, len(feats), batch_size):
        b = collate(feats[i : i + batch_size])
        b.pop("labels", None)
        batches.append({k: v.to(model.device) for k, v in b.items()})
    return model, batches


def _batches(args):
    return adapter_batches(args.adapter, task=args.task, split=args.split, limit=args.limit, file=args.file,
                           text_column=args.text_column, base_model=args.base_model,
                           data_dir=args.data_dir)


def cmd_gates(args) -> int:
    from .tools import plot_gates, probe_gates

    model, batches = _batches(args)
    gates = probe_gates(model, batches)
    with open(args.out, "w") as f:
        json.dump(gates, f, indent=2)
    print(f"wrote {args.out}")
    if args.plot:
        plot_gates(gates, args.plot, title=f"APT gates: {args.adapter}")
        print(f"wrote {args.plot}")
    return 0


def cmd_prune(args) -> int:
    from .tools import allocate_lengths, probe_gates, save_layer_lengths

    model, batches = _batches(args)
    lengths = allocate_lengths(probe_gates(model, batches), args.budget)
    save_layer_lengths(lengths, args.out)
    print(json.dumps({"layer_lengths": lengths}))
    return 0


def add_apt_parsers(sub) -> None:
    """Register ``gates`` and ``prune``."""
    p = sub.add_parser("gates", help="average APT gates over a dataset; heat map + lambda bar chart")
    add_adapter_flags(p)
    add_task_flags(p)
    p.add_argument("--file", help="a CSV/JSONL/TXT of texts instead of --task")
    p.add_argument("--text-column", default="text", help="column of the texts in --file")
    p.add_argument("--out", default="gates.json")
    p.add_argument("--plot")
    p.set_defaults(func=cmd_gates)

    p = sub.add_parser("prune", help="turn APT gates into per-layer prefix lengths summing to --budget (PT-2*)")
    add_adapter_flags(p)
    p.add_argument("--budget", type=int, required=True)
    add_task_flags(p)
    p.add_argument("--file", help="a CSV/JSONL/TXT of texts instead of --task")
    p.add_argument("--text-column", default="text", help="column of the texts in --file")
    p.add_argument("--out", default="layer_lengths.json")
    p.set_defaults(func=cmd_prune)
