#!/usr/bin/env python
"""APT's outputs and gradients: the working tree's package against an older commit's, and both against float64.

A change that only moves float rounding (session 16: lambda_i scales the tables instead of the gate) should leave
both versions equally close to a float64 reference. The models and batch are those of ``host_overhead.py`` (tiny
Qwen2 decoder and RoBERTa encoder, hidden 32), at ``--layers`` layers, batch 4 x 16 with one row padded, 20 virtual
tokens, dropout off; APT's parameters are drawn at random (lambdas around 1) and copied into both versions. One
training step each (loss.backward()), in fp32 and under bf16 autocast.

    python benchmarks/apt_rounding.py --baseline 8edf46b

Per case: the largest difference of the logits between the two versions, and each version's relative error (norm of
the difference over norm of the reference) of the logits and of the gradients, by parameter group, against float64.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_overhead as ho  # its load_baseline, model builders and batch


def _step(model, batch: dict, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    for p in model.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.double() for n, p in model.method.named_parameters() if p.grad is not None}
    return out.logits.detach().double(), grads


def _group(name: str) -> str:
    return "tables" if name.startswith("prefix.") else name.split(".")[0]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x - ref).norm().item() / max(ref.norm().item(), 1e-300)


def compare(kind: str, target: str, layers: int, packages: dict) -> list[dict]:
    """One row per precision: differences between the versions and each version's error against float64."""
    base = ho.build_base(kind, layers)
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the two versions must see the same network
    batch = ho.make_batch(kind, 4, 16)
    batch["attention_mask"][1, 12:] = 0
    models = {name: sp.wrap(copy.deepcopy(base), sp.APTConfig(num_virtual_tokens=20, init="random",
                                                              gate_target=target))
              for name, sp in packages.items()}
    first, *others = models.values()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in first.method.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "gate_proj" in name else 1.0)
                    + (1.0 if "gate_lambda" in name else 0.0))
        for m in others:
            m.method.load_state_dict(first.method.state_dict())
    ref_logits, ref_grads = _step(copy.deepcopy(first).double(), batch, False)
    rows = []
    for autocast in (False, True):
        row = {"case": f"{kind} {target} {'bf16 autocast' if autocast else 'fp32'}"}
        logits = {}
        for name, model in models.items():
            logits[name], grads = _step(model, batch, autocast)
            errors: dict[str, float] = {}
            for n, g in grads.items():
                errors[_group(n)] = max(errors.get(_group(n), 0.0), _rel(g, ref_grads[n]))
            row[name] = {"logits": _rel(logits[name], ref_logits), **errors}
        a, b = logits.values()
        row["max_abs_logit_diff"] = (a - b).abs().max().item()
        row["max_abs_logit"] = ref_logits.abs().max().item()
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, metavar="GIT_REF", help="the older package")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--models", nargs="+", choices=("encoder", "decoder"), default=["encoder", "decoder"])
    args = parser.parse_args(argv)
    ho.load_baseline(args.baseline)
    packages = {"now": importlib.import_module("softprompt"), "before": importlib.import_module(ho.BASELINE)}
    rows = [r for kind in args.models for target in ("kv", "v") for r in compare(kind, target, args.layers, packages)]
    for r in rows:
        errs = "; ".join(f"{v}: " + ", ".join(f"{k} {e:.2e}" for k, e in r[v].items()) for v in packages)
        print(f"{r['case']}: logits differ by <= {r['max_abs_logit_diff']:.2e} (|logit| <= {r['max_abs_logit']:.2g});"
              f" relative error against float64, {errs}")
    return rows


if __name__ == "__main__":
    main()
