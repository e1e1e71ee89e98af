"""``softprompt train | eval | predict | tasks | demo``."""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError
from .common import (
    add_adapter_flags,
    add_file_columns,
    add_task_flags,
    label_map_arg,
    method_choices,
    method_options,
    texts_from_args,
)


def _release_process_group() -> None:
    """Close the distributed process group the Trainer opened under torchrun/accelerate. A worker that exits with
    its gloo/NCCL group still alive can abort in C++ teardown ("terminate called without an active exception",
    seen intermittently with 2 CPU workers). This process owns the group (the CLI is the whole program), so it closes
    it; library callers of ``train()`` keep theirs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_train(args) -> int:
    from ..train import TrainConfig, train

    if not args.task and not args.file:
        raise ConfigError("no training data: give --task NAME (see `softprompt tasks`) or --file F.csv|F.jsonl")
    cfg = TrainConfig(
        method=args.method, model=args.model, output=args.output, task=args.task, file=args.file,
        eval_file=args.eval_file, text_column=args.text_column, text_pair_column=args.text_pair_column,
        label_column=args.label_column, data_dir=args.data_dir, train_split=args.train_split,
        eval_split=args.eval_split, epochs=args.epochs, max_steps=args.max_steps,
        lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        train_limit=args.train_limit, eval_limit=args.eval_limit, method_options=method_options(args),
        bf16=args.bf16, fp16=args.fp16, gradient_checkpointing=args.gradient_checkpointing,
        compile=None if args.compile == "off" else args.compile, full_batches=args.full_batches,
        save_steps=args.save_steps, eval_steps=args.eval_steps, resume=args.resume, overwrite=args.overwrite,
        strict=args.strict, label_map=args.label_map, readout=args.readout, carve_dev=args.carve_dev,
        fsdp=args.fsdp or "", weight_decay=args.weight_decay,
    )
    try:
        metrics = train(cfg)
    except KeyboardInterrupt:
        return _interrupted(cfg, args)
    finally:
        _release_process_group()
    shown = {k: v for k, v in metrics.items() if k != "loss_history"}
    print(json.dumps(shown, indent=2))
    return 0


def _interrupted(cfg, args) -> int:
    """Ctrl-C: say where the last checkpoint is and the exact command that continues the run; exit 130."""
    import shlex
    import sys

    from ..train.trainer import last_checkpoint

    found = last_checkpoint(cfg.output)
    where = f"the last checkpoint is {found}" if found else \
        "no checkpoint was written yet (--save-steps N makes a run resumable)"
    argv = [a for a in getattr(args, "argv", None) or ["train"] if a != "--resume"]
    again = "softprompt " + " ".join(shlex.quote(a) for a in argv) + " --resume"
    print(f"softprompt train: interrupted; {where}. Continue with: {again}", file=sys.stderr)
    return 130


def cmd_eval(args) -> int:
    from ..train import evaluate

    metrics = evaluate(args.adapter, task=args.task, file=args.file, text_column=args.text_column,
                       text_pair_column=args.text_pair_column, label_column=args.label_column, split=args.split,
                       data_dir=args.data_dir, limit=args.limit, base_model=args.base_model)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_predict(args) -> int:
    from ..train import predict

    texts = texts_from_args(args)
    for row in predict(args.adapter, texts, base_model=args.base_model):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def cmd_tasks(args) -> int:
    from .. import tasks

    print(tasks.describe_tasks())
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    return run_demo(output=args.output, steps=args.max_steps, data_dir=args.data_dir)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help=method_choices())
    p.add_argument("--model", default="minilm", help="alias (minilm, smollm2) or a transformers model path")
    p.add_argument("--task", help="registry task, e.g. glue/sst2 (see `softprompt tasks`)")
    add_file_columns(p, "your own labelled CSV/TSV/JSONL training file")
    p.add_argument("--eval-file", help="your own labelled evaluation file (default: --file)")
    p.add_argument("--output", required=True, help="adapter folder to write")
    p.add_argument("--data-dir", help="benchmark data folder (default: $SOFTPROMPT_DATA_DIR or ../shared/data)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--lr", type=float, help="learning rate (default depends on the method)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--num-virtual-tokens", type=int)
    p.add_argument("--layer", type=int, help="insertion layer m (lpt, idspam)")
    p.add_argument("--layer-lengths", help="JSON file with per-layer prefix lengths (from `softprompt prune`)")
    p.add_argument("--option", action="append", help="extra method option key=value (JSON values), repeatable")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--train-limit", type=int, help="train on a seeded subsample of this many examples")
    p.add_argument("--eval-limit", type=int, help="evaluate on a seeded subsample of this many examples")
    p.add_argument("--train-split", help="registry split to train on (default: the task's; e.g. train32 for FewGLUE)")
    p.add_argument("--eval-split", help="registry split to evaluate on (default: the task's; e.g. val)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", nargs="?", const="default", default="auto",
                   choices=("auto", "off", "default", "reduce-overhead", "max-autotune", "cudagraphs"),
                   help="run the training forward through torch.compile. auto (the default): on CUDA, CUDA graphs "
                        "with batches padded to a few lengths when the planned steps pay for compiling (cudagraphs, "
                        "or reduce-overhead for very long runs: the one that saves the most), else eager; on CPU "
                        "eager; the decision is printed. off: eager. A mode (bare "
                        "--compile: 'default') compiles always. cudagraphs (CUDA only): CUDA graphs of the "
                        "captured step without Inductor's code generation (compiles in seconds; eager's kernels). "
                        "Compiled runs turn Inductor's mix-order reduction off (it produced wrong gradients on "
                        "torch 2.10-2.13; softprompt/inductor.py)")
    p.add_argument("--full-batches", action="store_true",
                   help="drop each epoch's short last batch, as compiled runs do, so that an eager run trains on "
                        "the same batches as a compiled one")
    p.add_argument("--save-steps", type=int, help="write a resumable checkpoint every N steps")
    p.add_argument("--eval-steps", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--readout", choices=("pooler", "mean"), default="pooler",
                   help="what a classification head reads: the model's pooler, or the masked mean of the last "
                        "hidden states (saved with the adapter)")
    p.add_argument("--carve-dev", type=float, default=0.0, metavar="FRACTION",
                   help="hold out this fraction of the train split and evaluate on it (model selection without the "
                        "reported dev set)")
    p.add_argument("--overwrite", action="store_true",
                   help="--output is not empty: replace the adapter files in it (another run's checkpoints are "
                        "never deleted: use --resume or another --output then)")
    p.add_argument("--strict", action="store_true", help="fail on the first malformed data row")
    p.add_argument("--label-map", type=label_map_arg,
                   help="rename label values of --file before classes are inferred (a JSON object or a .json "
                        "file), e.g. '{\"1.0\": \"1\", \"pos\": \"1\"}'")
    p.add_argument("--fsdp", help="passed to the Trainer, e.g. 'full_shard auto_wrap'")


def add_train_parsers(sub) -> None:
    """Register train, eval, predict, tasks and demo."""
    p = sub.add_parser("train", help="train an adapter on a task or your own file")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a saved adapter")
    add_adapter_flags(p)
    add_task_flags(p)
    add_file_columns(p, "your own labelled CSV/TSV/JSONL file instead of --task")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="predict with a saved adapter")
    add_adapter_flags(p)
    p.add_argument("--text", action="append", help="a text to label (repeatable)")
    p.add_argument("--file", help="one text per line")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("tasks", help="list the task registry")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("demo", help="train a prefix on SST-2 with MiniLM, evaluate, save, reload, predict")
    p.add_argument("--output", default="runs/demo-sst2-prefix")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_demo)
