"""Flags and helpers shared by the subcommands of every part (the only part of ``softprompt.cli`` that other CLI
modules import)."""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError
from ..methods import METHODS


def method_choices() -> str:
    """The ``--method`` names, from the method registry."""
    return " | ".join(METHODS)


def add_adapter_flags(p: argparse.ArgumentParser) -> None:
    """``--adapter DIR`` and ``--base-model``, for every command that loads a saved adapter."""
    p.add_argument("--adapter", required=True)
    p.add_argument("--base-model", help="use this base model (alias, folder or Hub name) instead of the one recorded "
                                        "in the adapter, e.g. after moving the adapter to another machine")


def texts_from_args(args) -> list[str]:
    """Texts of a prediction command: repeated ``--text`` flags, or ``--file`` with one text per line."""
    if args.text:
        return list(args.text)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    raise ConfigError("no texts: give --text \"...\" (repeatable) or --file texts.txt")


def method_options(args) -> dict:
    """Method options from the flags that apply to the chosen method, plus ``--option key=value`` pairs."""
    opts: dict = {}
    if args.num_virtual_tokens is not None:
        opts["num_virtual_tokens"] = args.num_virtual_tokens
    if args.layer is not None:
        opts["layer"] = args.layer
    if args.layer_lengths:
        try:
            with open(args.layer_lengths) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--layer-lengths {args.layer_lengths}: not a readable JSON file of per-layer lengths "
                              f"({' '.join(str(exc).split())[:120]}); write one with `softprompt prune`") from None
        lengths = data.get("layer_lengths") if isinstance(data, dict) else data
        if not isinstance(lengths, list):
            raise ConfigError(f"--layer-lengths {args.layer_lengths}: expected a list of lengths or "
                              '{"layer_lengths": [...]}; write one with `softprompt prune`')
        opts["layer_lengths"] = lengths
    for item in args.option or []:
        key, _, value = item.partition("=")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    return opts


def label_map_arg(text: str) -> dict:
    """argparse type of ``--label-map``: a JSON object (inline, or a .json file) mapping label values to labels."""
    import argparse
    import os
    from pathlib import Path

    try:
        raw = Path(text).read_text(encoding="utf-8") if os.path.isfile(text) else text
        value = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"positive\": \"pos\"}}' or a .json file "
                                         f"holding one ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object mapping label values to labels, got {value!r}")
    return value


def add_file_columns(p: argparse.ArgumentParser, file_help: str) -> None:
    """``--file`` (a user's CSV/TSV/JSONL) and the columns to read from it: text, optional pair, label."""
    p.add_argument("--file", help=file_help)
    p.add_argument("--text-column", default="text", help="column of the texts in --file")
    p.add_argument("--text-pair-column", help="column of the second texts (sentence pairs)")
    p.add_argument("--label-column", default="label", help="column of the labels in --file")


def add_task_flags(p: argparse.ArgumentParser, *, limit: bool = True) -> None:
    """``--task``, ``--split``, ``--data-dir`` (and ``--limit``), for every command that reads a registry task."""
    p.add_argument("--task", help="registry task, e.g. glue/sst2 (see `softprompt tasks`)")
    p.add_argument("--split", help="registry split (default: the task's evaluation split)")
    p.add_argument("--data-dir", help="benchmark data folder (default: $SOFTPROMPT_DATA_DIR or ../shared/data)")
    if limit:
        p.add_argument("--limit", type=int, help="use only the first N examples")
