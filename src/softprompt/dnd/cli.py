"""``softprompt dnd zoo|train|generate|eval``: the Drag-and-Drop pipeline on the command line."""

from __future__ import annotations



def _zoo(args) -> int:
    from .zoo import zoo_main

    zoo_main(args)
    return 0


def _train(args) -> int:
    from .generator import train_main
    from .templates import canonical_name

    args.holdout = canonical_name(args.holdout)
    train_main(args)
    return 0


def _generate(args) -> int:
    from .export import generate_main

    generate_main(args)
    return 0


def _eval(args) -> int:
    from .harness import eval_main
    from .templates import canonical_name

    args.dataset = canonical_name(args.dataset)
    eval_main(args)
    return 0


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
    p.add_argument("--target", help="tokens | svd (gauge-free low-rank target)")
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
