"""Summaries of ``host_overhead.py``'s step times (issue 18): the per-layer host time of each variant and case from
the line through the two depths (``summarise``), the issue's headline schema, the CPU goals and before/after
comparisons paired by round, the machine and package versions of the run, and the Markdown table it prints.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import torch
from host_overhead_steps import variants

HEADLINE = "decoder/train"  # the case whose numbers fill methods[name].ours_us/peft_us/bare_us


def summarise(samples: dict, args: argparse.Namespace) -> dict:
    """Per case ("decoder/train", ...) and variant: T, F, slope, the per-layer host time and its spread."""
    L, S = args.layers, args.short_layers
    out: dict[str, dict] = {}
    for kind in args.models:
        for mode in args.modes:
            case: dict[str, dict] = {}
            bare_long, bare_short = samples.get((kind, L, "bare", mode)), samples.get((kind, S, "bare", mode))
            if not bare_long or not bare_short:
                continue
            # F_bare: the bare model's embeddings + head + loss, from the line through the two depths.
            tb_l, tb_s = _median(bare_long), _median(bare_short)
            f_bare = tb_l - L * (tb_l - tb_s) / (L - S)
            for variant in variants(args.methods, bool(args.baseline)):
                long, short = samples.get((kind, L, variant, mode)), samples.get((kind, S, variant, mode))
                if not long or not short:
                    continue
                t_l, t_s = _median(long), _median(short)
                slope = (t_l - t_s) / (L - S)
                rounds = [(statistics.median(r) - f_bare) / L for r in long]
                all_steps = [x for r in long for x in r]
                q1, _, q3 = statistics.quantiles(all_steps, n=4, method="inclusive")
                case[variant] = {
                    "us_per_layer": round((t_l - f_bare) / L, 2),
                    "us_per_layer_rounds_min_max": [round(min(rounds), 2), round(max(rounds), 2)],
                    "us_per_layer_rounds": [round(x, 1) for x in rounds],
                    "slope_us": round(slope, 2), "fixed_us": round(t_l - L * slope, 1),
                    "step_us": round(t_l, 1), "step_us_iqr": [round(q1, 1), round(q3, 1)],
                    "step_us_short": round(t_s, 1), "steps_timed": len(all_steps),
                }
            out[f"{kind}/{mode}"] = case
    return out


def _median(rounds: list[list[float]]) -> float:
    return statistics.median(x for r in rounds for x in r)


def headline(cases: dict, methods: list[str]) -> dict:
    """The issue's schema: methods[name] = {ours_us, peft_us, bare_us} from HEADLINE, then every case's numbers."""
    out: dict[str, dict] = {}
    for m in methods:
        entry: dict = {}
        for name, case in cases.items():
            ours, peft, bare, before = (case.get(k) for k in (f"ours:{m}", f"peft:{m}", "bare", f"before:{m}"))
            row = {"ours_us": ours and ours["us_per_layer"], "peft_us": peft and peft["us_per_layer"],
                   "bare_us": bare and bare["us_per_layer"], "before_us": before and before["us_per_layer"],
                   "ours_spread_us": ours and ours["us_per_layer_rounds_min_max"],
                   "peft_spread_us": peft and peft["us_per_layer_rounds_min_max"],
                   "ours_slope_us": ours and ours["slope_us"], "peft_slope_us": peft and peft["slope_us"]}
            if name == HEADLINE:
                entry.update({k: row[k] for k in ("ours_us", "peft_us", "bare_us", "before_us")})
            entry.setdefault("cases", {})[name] = row
        out[m] = entry
    return out


def goals(cases: dict) -> list[dict]:
    """Issue 18's CPU goals, per case: prefix ours <= PEFT; APT, ID-SPAM, LPT <= 1.5x our prefix."""
    out = []
    for name, case in cases.items():
        prefix = case.get("ours:prefix")
        checks = [("ours prefix <= PEFT prefix", prefix, case.get("peft:prefix"), 1.0)]
        checks += [(f"ours {m} <= 1.5x ours prefix", case.get(f"ours:{m}"), prefix, 1.5)
                   for m in ("apt", "idspam", "lpt", "lpt_npg")]
        out += [_compare(goal, name, a, b, limit) for goal, a, b, limit in checks if a and b]
    return out


def before_after(cases: dict, methods: list[str]) -> list[dict]:
    """With ``--baseline``: each method's host time per layer call now against the baseline's, per case."""
    return [_compare(f"ours {m} <= before {m}", name, case[f"ours:{m}"], case[f"before:{m}"], 1.0)
            for name, case in cases.items() for m in methods if f"ours:{m}" in case and f"before:{m}" in case]


def _compare(goal: str, case: str, a: dict, b: dict, limit: float) -> dict:
    ratio = a["us_per_layer"] / b["us_per_layer"]
    # Paired by round: both variants ran minutes apart at most within a round, so a slow spell of the shared
    # machine cancels in the ratio; the spread of these ratios says how firm the verdict is.
    paired = sorted(x / y for x, y in zip(a["us_per_layer_rounds"], b["us_per_layer_rounds"]))
    spread = [round(paired[0], 3), round(statistics.median(paired), 3), round(paired[-1], 3)]
    return {"goal": goal, "case": case, "ratio": round(ratio, 3), "limit": limit, "met": ratio <= limit,
            "headline": case == HEADLINE, "round_ratios_min_median_max": spread,
            "rounds_met": f"{sum(x <= limit for x in paired)}/{len(paired)}"}


def environment() -> tuple[str, dict]:
    import peft
    import transformers

    import softprompt

    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    machine = (f"{names[0] if names else platform.machine()}, {os.cpu_count()} logical cores; torch threads "
               f"{torch.get_num_threads()}; host {platform.node()}")
    return machine, {"python": platform.python_version(), "torch": torch.__version__, "peft": peft.__version__,
                     "transformers": transformers.__version__, "softprompt": getattr(softprompt, "__version__", "?")}


def table(cases: dict, methods: list[str]) -> str:
    """Markdown: per case and method, us per layer call (min-max of rounds) of ours, before, PEFT's, bare."""
    def fmt(v: dict | None) -> str:
        lo, hi = (0, 0) if v is None else v["us_per_layer_rounds_min_max"]
        return "-" if v is None else f"{v['us_per_layer']:.0f} ({lo:.0f}-{hi:.0f})"

    def ratio(a: dict | None, b: dict | None) -> str:
        return f"{a['us_per_layer'] / b['us_per_layer']:.2f}x" if a and b else "-"

    lines = ["| case | method | ours us/layer | before | PEFT | bare | ours / PEFT | ours / our prefix |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in cases.items():
        for m in methods:
            ours, peft = c.get(f"ours:{m}"), c.get(f"peft:{m}")
            lines.append(f"| {name} | {m} | {fmt(ours)} | {fmt(c.get(f'before:{m}'))} | {fmt(peft)} | "
                         f"{fmt(c.get('bare'))} | {ratio(ours, peft)} | {ratio(ours, c.get('ours:prefix'))} |")
    return "\n".join(lines)
