#!/usr/bin/env python
"""Aten ops dispatched per layer call: bare model, prefix tuning and APT (issue 18, part 2). CPU, deterministic.

On a host-bound step every dispatched op is host work (and at least one kernel launch on a GPU), and unlike a CPU
timing its count is exact and repeatable. The models, batch and methods are those of ``host_overhead.py`` (tiny Qwen2
decoder and RoBERTa encoder, hidden 32, batch 2 x 16 tokens, 20 virtual tokens, fp32); a ``TorchDispatchMode`` counts
every op of one step (forward + backward with gradients reset, or a no-grad forward) at two depths, and the difference
divided by the difference in depth is the count per layer call (what a layer adds, whatever the fixed cost).

    python benchmarks/apt_host_ops.py                     # the table of benchmarks/results/apt_host_ops.md
    python benchmarks/apt_host_ops.py --breakdown         # plus, per op, what APT dispatches beyond prefix
    python benchmarks/apt_host_ops.py --json /tmp/ops.json
    python benchmarks/apt_host_ops.py --kernels           # plus the same counts without view ops

Views (``view``, ``t``, ``detach``, ``unbind``, ...: ops whose schema returns an alias) cost host time but launch no
kernel on a GPU; ``--kernels`` counts the other ops, roughly the kernels a GPU step launches per layer call.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import sys
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_HERE = Path(__file__).resolve().parent
if (_HERE.parent / "src" / "softprompt").is_dir() and str(_HERE.parent / "src") not in sys.path:
    sys.path.insert(0, str(_HERE.parent / "src"))  # the checkout's package wins over an installed one

VARIANTS = ("bare", "ours:prefix", "ours:apt")
MODELS = ("decoder", "encoder")
MODES = ("train", "forward")


def _host_overhead():
    """benchmarks/host_overhead.py as a module (its model builders and step functions)."""
    name = "softprompt_bench_host_overhead"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _HERE / "host_overhead.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class _CountOps(TorchDispatchMode):
    """Counts every aten op dispatched inside the ``with`` block, by name (backward ops included)."""

    views: ClassVar[set[str]] = set()  # names of the view ops seen (by any counter)

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        if func.is_view:
            _CountOps.views.add(str(func))
        return func(*args, **(kwargs or {}))


def count_step(kind: str, variant: str, layers: int, mode: str, *, batch: int, seq: int, tokens: int
               ) -> collections.Counter:
    """Ops of one ``mode`` step of ``variant`` on a ``kind`` model of ``layers`` layers (after two warm-up steps)."""
    ho = _host_overhead()
    model, extra = ho.adapt(kind, variant, ho.build_base(kind, layers), tokens)
    step = ho.make_steps(model, extra, ho.make_batch(kind, batch, seq))[mode]
    step()
    step()
    counter = _CountOps()
    with counter:
        step()
    return counter.ops


def measure(args: argparse.Namespace) -> dict:
    """{"decoder/train": {variant: {"per_layer": n, "by_op": {op: n}, "non_view_per_layer": n}}, ...}: ops per layer
    call (all, by op, and those that are not views)."""
    short, long = args.short_layers, args.layers
    out: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # op counts do not depend on it; the run is just quicker on a shared machine
    try:
        for kind in args.models:
            for mode in args.modes:
                case = out[f"{kind}/{mode}"] = {}
                for variant in VARIANTS:
                    a, b = (count_step(kind, variant, n, mode, batch=args.batch, seq=args.seq, tokens=args.tokens)
                            for n in (short, long))
                    by_op = {op: (b[op] - a[op]) / (long - short) for op in sorted(set(a) | set(b)) if b[op] != a[op]}
                    case[variant] = {"per_layer": (sum(b.values()) - sum(a.values())) / (long - short),
                                     "by_op": by_op}
        for case in out.values():
            for counts in case.values():
                counts["non_view_per_layer"] = sum(n for op, n in counts["by_op"].items()
                                                   if op not in _CountOps.views)
    finally:
        torch.set_num_threads(threads)
    return out


def table(cases: dict, key: str = "per_layer") -> str:
    lines = ["| case | bare | prefix | APT | APT - prefix | APT / prefix |", "|---|---|---|---|---|---|"]
    for name, case in cases.items():
        bare, prefix, apt = (case[v][key] for v in VARIANTS)
        lines.append(f"| {name} | {bare:g} | {prefix:g} | {apt:g} | {apt - prefix:g} | {apt / prefix:.3f}x |")
    return "\n".join(lines)


def breakdown(cases: dict) -> str:
    """Per op, per layer call: APT's count minus prefix's (ops APT dispatches that prefix does not, and back)."""
    lines = []
    for name, case in cases.items():
        apt, prefix = case["ours:apt"]["by_op"], case["ours:prefix"]["by_op"]
        diff = {op: apt.get(op, 0) - prefix.get(op, 0) for op in set(apt) | set(prefix)}
        items = sorted(((op, n) for op, n in diff.items() if n), key=lambda x: (-x[1], x[0]))
        lines.append(f"{name}: " + ", ".join(f"{op.removeprefix('aten.')} {n:+g}" for op, n in items))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="the deeper of the two models (default 6)")
    parser.add_argument("--short-layers", type=int, default=2, help="the shallower one (default 2)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=20, help="virtual tokens of prefix and APT (default 20)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--breakdown", action="store_true", help="print APT's ops beyond prefix's, by op")
    parser.add_argument("--kernels", action="store_true", help="also print the counts without view ops")
    parser.add_argument("--json", help="also write the counts (per layer and by op) to this file")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.layers <= args.short_layers:
        raise SystemExit("--layers must exceed --short-layers")
    cases = measure(args)
    print("aten ops per layer call (forward + backward for train, no-grad forward for forward)")
    print(table(cases))
    if args.kernels:
        print("the same without view ops (about the kernels a GPU launches)")
        print(table(cases, "non_view_per_layer"))
    if args.breakdown:
        print(breakdown(cases))
    if args.json:
        Path(args.json).write_text(json.dumps(cases, indent=1))
    return cases


if __name__ == "__main__":
    main()
