"""Subcommands that inspect trained adapters: ``gates`` and ``prune`` (APT), ``explain`` (ID-SPAM)."""

from __future__ import annotations

import json


def adapter_batches(adapter: str, *, task: str | None = None, split: str | None = None, limit: int | None = None,
                    file: str | None = None, text_column: str = "text", base_model: str | None = None,
                    batch_size: int = 64):
    """(model, batches): a saved adapter and tokenised input batches (texts only, no labels) of a registry task
    split (default: the adapter's task, its eval split) or of a user file, on the model's device."""
    from .tasks import get_task, load, load_file
    from .train.data import Collator, featurize
    from .train.runner import load_for_inference

    model, tokenizer, meta = load_for_inference(adapter, base_model)
    if file:
        recs, spec = load_file(file, text_column=text_column)
        recs = recs[:limit] if limit else recs
    else:
        task = task or meta.get("task")
        if not task:
            raise SystemExit("give --task NAME or --file F (the adapter was not trained on a registry task)")
        spec = get_task(task)
        recs = load(task, split or spec.eval_split, limit=limit)
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
                           text_column=args.text_column, base_model=args.base_model)


def cmd_gates(args) -> int:
    from .methods.apt_tools import plot_gates, probe_gates

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
    from .methods.apt_tools import allocate_lengths, probe_gates, save_layer_lengths

    model, batches = _batches(args)
    lengths = allocate_lengths(probe_gates(model, batches), args.budget)
    save_layer_lengths(lengths, args.out)
    print(json.dumps({"layer_lengths": lengths}))
    return 0


def cmd_explain(args) -> int:
    from .methods.id_spam_explain import explain, write
    from .train.runner import load_for_inference

    model, tokenizer, _ = load_for_inference(args.adapter, args.base_model)
    pairs = explain(model, tokenizer, args.text)
    for token, weight in pairs:
        print(f"{weight:8.4f}  {token}")
    if args.out:
        write(pairs, args.out, title=args.text)
        print(f"wrote {args.out}")
    return 0


def add_method_parser(sub) -> None:
    from .cli import add_adapter_flags

    p = sub.add_parser("gates", help="average APT gates over a dataset; heat map + lambda bar chart")
    add_adapter_flags(p)
    p.add_argument("--task")
    p.add_argument("--split")
    p.add_argument("--limit", type=int)
    p.add_argument("--file", help="a CSV/JSONL/TXT of texts instead of --task")
    p.add_argument("--text-column", default="text")
    p.add_argument("--out", default="gates.json")
    p.add_argument("--plot")
    p.set_defaults(func=cmd_gates)

    p = sub.add_parser("prune", help="turn APT gates into per-layer prefix lengths summing to --budget (PT-2*)")
    add_adapter_flags(p)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--task")
    p.add_argument("--split")
    p.add_argument("--limit", type=int)
    p.add_argument("--file", help="a CSV/JSONL/TXT of texts instead of --task")
    p.add_argument("--text-column", default="text")
    p.add_argument("--out", default="layer_lengths.json")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("explain", help="which input tokens drove an ID-SPAM prompt")
    add_adapter_flags(p)
    p.add_argument("--text", required=True)
    p.add_argument("--out", help="tokens.html or tokens.png")
    p.set_defaults(func=cmd_explain)
