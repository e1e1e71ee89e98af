"""``softprompt dnd zoo|train|generate|eval``: the Drag-and-Drop pipeline on the command line."""

from __future__ import annotations


def _step(module: str, function: str, dataset_attr: str | None = None):
    """A subcommand handler that imports its step lazily (torch/peft load only when it runs) and maps short
    dataset names (``arc_easy``, ``boolq``) to registry names."""

    def run(args) -> int:
        import importlib

        from .templates import canonical_name

        if dataset_attr:
            setattr(args, dataset_attr, canonical_name(getattr(args, dataset_attr)))
        getattr(importlib.import_module(module, __package__), function)(args)
        return 0

    return run


_zoo = _step(".zoo", "zoo_main")
_train = _step(".generator", "train_main", "holdout")
_generate = _step(".export", "generate_main")
_eval = _step(".harness", "eval_main", "dataset")


def add_dnd_parser(sub) -> None:
    """Register ``softprompt dnd`` and its four steps."""
    dnd = sub.add_parser("dnd", help="Drag-and-Drop: LoRA zoo, prompt-conditioned generator, zero-shot adapters")
    steps = dnd.add_subparsers(dest="dnd_command", required=True)

    p = steps.add_parser("zoo", help="train one LoRA per dataset from a shared init and keep step checkpoints")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--datasets", help="comma list (default: the seven common-sense datasets)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="all", help="all | qv | comma list of projection names")
    p.add_argument("--warmup-steps", type=int, default=75)
    p.add_argument("--checkpoints", type=int, default=50)
    p.add_argument("--out", required=True)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--train-limit", type=int)
    p.add_argument("--dev-limit", type=int)
    p.add_argument("--device")
    p.set_defaults(func=_zoo)

    p = steps.add_parser("train", help="train the hyper-convolutional generator on a zoo, holding out one dataset")
    p.add_argument("--zoo", required=True)
    p.add_argument("--holdout", required=True)
    p.add_argument("--out", required=True)
    for name, typ in (("steps", int), ("batch-size", int), ("n-prompts", int), ("lr", float), ("width", int),
                      ("n-layers", int), ("kernel", int), ("chunk", int), ("seed", int)):
        p.add_argument(f"--{name}", type=typ)
    p.add_argument("--target", help="ab (the zoo's own A, B; default) | svd (gauge-free low-rank target)")
    p.add_argument("--stats-code", choices=("relative", "dnd"),
                   help="how a token's mean/std are written for the generator (default relative; dnd = the paper's)")
    p.add_argument("--prompts", help="folder of <dataset>.jsonl or a JSON mapping (default: the registry's prompts)")
    p.add_argument("--device")
    p.set_defaults(func=_train)

    p = steps.add_parser("generate", help="prompts -> a standard PEFT LoRA folder, with a sanity report")
    p.add_argument("--generator", required=True)
    p.add_argument("--prompts", required=True, help="prompts.jsonl, or a dataset name (its unlabeled test prompts)")
    p.add_argument("--out", required=True)
    p.add_argument("--n-prompts", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--zoo")
    p.set_defaults(func=_generate)

    p = steps.add_parser("eval", help="accuracy of a causal LM with or without a LoRA (log-likelihood and generation)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--adapter")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    p.add_argument("--out")
    p.set_defaults(func=_eval)


__all__ = ["add_dnd_parser"]
