#!/usr/bin/env python
"""Host time of one layer call, per method, ours against PEFT's and the bare model (issue 18). CPU only.

Tiny models (hidden 32, 24 layers, batch 2 x 16 tokens, fp32, one thread) make the arithmetic negligible, so what is
timed is the host work a real GPU step also pays per layer: Python, module calls, autograd bookkeeping, op dispatch.
Every variant (bare; ours: prompt, ptuning, prefix, apt, lpt, lpt_npg, idspam; PEFT's prompt, ptuning, prefix) runs
on a Qwen2 decoder and a RoBERTa encoder at two depths, in ``train`` (forward + backward) and ``forward`` (no grad)
mode, interleaved over ``--rounds`` rounds; the line through the two depths gives ``us_per_layer`` (FORMULA below).
Method and reading: docs/performance.md, "Host cost per layer call".

    python benchmarks/host_overhead.py --out benchmarks/results/host_overhead.json
    python benchmarks/host_overhead.py --quick --out /tmp/host.json        # smoke settings, a few seconds
    python benchmarks/host_overhead.py --baseline 66dae24 --out ...         # before/after, interleaved in one run

``--baseline REF`` adds ``before:<method>`` variants: the package at git ``REF``, imported beside the working tree's,
so that a change is judged against its predecessor within one run, round by round (``before_after``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import importlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# Run from a checkout without installing: the working tree's package wins over an installed one.
_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "softprompt").is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

OURS = ("prompt", "ptuning", "prefix", "apt", "lpt", "lpt_npg", "idspam")
PEFT = ("prompt", "ptuning", "prefix")  # the methods PEFT has
MODES = ("train", "forward")
MODELS = ("decoder", "encoder")
HEADLINE = "decoder/train"  # the case whose numbers fill methods[name].ours_us/peft_us/bare_us
FORMULA = ("us_per_layer = (T_variant(L) - F_bare) / L; F_bare = T_bare(L) - L * (T_bare(L) - T_bare(S)) / (L - S); "
           "T = median step time (all rounds), S = --short-layers. slope_us = (T(L) - T(S)) / (L - S), fixed_us = "
           "T(L) - L * slope_us. train = forward + loss.backward(), no optimizer step; forward = no-grad, eval mode.")
NOTE = ("Host-side CPU numbers on tiny models (one torch thread), not GPU times. The 2 cores are shared with other "
        "processes: thread CPU time ignores descheduling but not cache contention, so compare variants within one run "
        "(they are interleaved), not across runs.")


def build_base(kind: str, layers: int) -> nn.Module:
    """A random tiny model: Qwen2 decoder or RoBERTa encoder, hidden 32, ``layers`` layers, SDPA attention."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "decoder":
        cfg = tf.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=True, use_sliding_window=False, bos_token_id=1, eos_token_id=2)
        cls = tf.Qwen2ForCausalLM
    else:
        cfg = tf.RobertaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                               num_attention_heads=4, max_position_embeddings=130, type_vocab_size=1, num_labels=2,
                               pad_token_id=1, bos_token_id=0, eos_token_id=2)
        cls = tf.RobertaForSequenceClassification
    cfg._attn_implementation = "sdpa"
    return cls(cfg)


def adapt(kind: str, variant: str, base: nn.Module, tokens: int) -> tuple[nn.Module, dict]:
    """(model to call, extra forward kwargs) for ``variant``: "bare", "ours:<method>" or "peft:<method>".
    Prompt/ptuning/prefix/APT get ``tokens`` virtual tokens, LPT and ID-SPAM half (their defaults, as in perf.py)."""
    causal = kind == "decoder"
    extra = {"use_cache": False} if causal else {}
    half = max(1, tokens // 2)
    if variant == "bare":
        base.requires_grad_(False)
        anchor = nn.Parameter(torch.zeros(()))
        base.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out + anchor)
        base.register_parameter("_bench_anchor", anchor)  # so that it is found among the trainable parameters
        for name, p in base.named_parameters():
            p.requires_grad_(name.startswith("classifier.") or name == "_bench_anchor")
        return base, extra
    owner, method = variant.split(":")
    if owner in ("ours", "before"):
        sp = importlib.import_module("softprompt" if owner == "ours" else BASELINE)

        cfg = {"prompt": lambda: sp.PromptTuningConfig(num_virtual_tokens=tokens),
               "ptuning": lambda: sp.PTuningConfig(num_virtual_tokens=tokens, encoder="mlp"),
               "prefix": lambda: sp.PrefixConfig(num_virtual_tokens=tokens, init="random"),
               "apt": lambda: sp.APTConfig(num_virtual_tokens=tokens, init="random"),
               "lpt": lambda: sp.LatePromptConfig(num_virtual_tokens=half),
               "lpt_npg": lambda: sp.LatePromptConfig(num_virtual_tokens=half, generator="npg"),
               "idspam": lambda: sp.IDSPAMConfig(num_virtual_tokens=half)}[method]()
        return sp.wrap(base, cfg), extra
    import peft

    task = "CAUSAL_LM" if causal else "SEQ_CLS"
    cfg = {"prompt": lambda: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=tokens),
           "ptuning": lambda: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=tokens,
                                                       encoder_hidden_size=base.config.hidden_size,
                                                       encoder_reparameterization_type="MLP"),
           "prefix": lambda: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=tokens)}[method]()
    model = peft.get_peft_model(base, cfg)
    return model, ({} if method == "prefix" else extra)  # PEFT's prefix travels as a KV cache: leave use_cache be


def make_batch(kind: str, batch: int, seq: int) -> dict:
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, 128, (batch, seq), generator=gen)  # never RoBERTa's pad id (1)
    labels = ids.clone() if kind == "decoder" else torch.randint(0, 2, (batch,), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_steps(model: nn.Module, extra: dict, batch: dict) -> dict[str, Callable[[], None]]:
    """The two timed calls of one variant."""
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def train() -> None:
        model.train()
        model(**batch, **extra).loss.backward()
        for p in params:
            p.grad = None

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(**inputs, **extra)

    return {"train": train, "forward": forward}


BASELINE = "softprompt_baseline"


def load_baseline(ref: str) -> None:
    """Make the package as it was at git ``ref`` importable as ``softprompt_baseline`` (a temporary folder on
    ``sys.path``). Its imports are relative; only the attention function's registered name must differ, since
    transformers looks attention functions up by name when a layer runs."""
    root = Path(tempfile.mkdtemp(prefix="host_baseline_"))
    tar = subprocess.run(["git", "-C", str(_SRC.parent), "archive", ref, "src/softprompt"], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(root, filter="data")  # a snapshot: other engineers edit the working tree meanwhile
    (root / "src" / "softprompt").rename(root / BASELINE)
    attn = root / BASELINE / "engine" / "attention.py"
    attn.write_text(attn.read_text().replace('ATTN_NAME = "softprompt"', f'ATTN_NAME = "{BASELINE}"'))
    sys.path.insert(0, str(root))
    sys.modules.pop(BASELINE, None)


def variants(methods: list[str], baseline: bool = False) -> list[str]:
    """bare, then per method ours (before, with a baseline) and PEFT's where PEFT has the method."""
    out = ["bare"]
    for m in methods:
        out.append(f"ours:{m}")
        out += [f"before:{m}"] * baseline
        if m in PEFT:
            out.append(f"peft:{m}")
    return out


def measure(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """samples[(kind, layers, variant, mode)] -> per-round lists of step times in microseconds; and failures."""
    clock = time.thread_time_ns if args.clock == "thread" else time.perf_counter_ns
    cases: list[tuple[tuple, Callable[[], None]]] = []
    failures: list[str] = []
    for kind in args.models:
        batch = make_batch(kind, args.batch, args.seq)
        for layers in (args.layers, args.short_layers):
            base = build_base(kind, layers)
            for variant in variants(args.methods, bool(args.baseline)):
                try:
                    model, extra = adapt(kind, variant, copy.deepcopy(base), args.virtual_tokens)
                    steps = make_steps(model, extra, batch)
                    for mode in args.modes:
                        steps[mode]()  # fail here, not in the timed loop
                except Exception as exc:  # a variant that cannot run is a result (null), not a crash
                    failures.append(f"{kind} L={layers} {variant}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                cases.extend(((kind, layers, variant, mode), steps[mode]) for mode in args.modes)
    for _ in range(args.warmup):
        for _, fn in cases:
            fn()
    # The models live for the whole run: keep them out of the collector's scans (noise that is not the method's).
    gc.collect()
    gc.freeze()
    samples: dict[tuple, list[list[float]]] = {key: [] for key, _ in cases}
    for r in range(args.rounds):
        shift = r % len(cases)
        for key, fn in cases[shift:] + cases[:shift]:  # rotate, so no variant always follows the same neighbour
            samples[key].append([_timed(fn, clock) for _ in range(args.reps)])
    gc.unfreeze()
    return samples, failures


def _timed(fn: Callable[[], None], clock: Callable[[], int]) -> float:
    t0 = clock()
    fn()
    return (clock() - t0) / 1000.0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma list of decoder, encoder")
    p.add_argument("--methods", default=",".join(OURS), help=f"comma list of {', '.join(OURS)}")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of train, forward")
    p.add_argument("--layers", type=int, default=24, help="depth L of the measured models (default 24)")
    p.add_argument("--short-layers", type=int, default=4, help="second depth for the per-forward/per-layer split")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--virtual-tokens", type=int, default=20, help="LPT and ID-SPAM use half")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    p.add_argument("--reps", type=int, default=3, help="consecutive timed steps of a variant per round (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of every variant before the rounds")
    p.add_argument("--clock", choices=("thread", "wall"), default="thread")
    p.add_argument("--quick", action="store_true", help="smoke settings: 4/2 layers, 2 rounds, 2 reps, 1 warm-up")
    p.add_argument("--baseline", metavar="GIT_REF", help="also time the package as it was at this commit (before:*)")
    p.add_argument("--out", default=None, help="JSON output")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.layers, args.short_layers, args.rounds, args.reps, args.warmup = 4, 2, 2, 2, 1
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    for given, known in ((args.models, MODELS), (args.methods, OURS), (args.modes, MODES)):
        if set(given) - set(known):
            raise SystemExit(f"unknown {sorted(set(given) - set(known))}; known: {', '.join(known)}")
    if not args.layers > args.short_layers >= 1:
        raise SystemExit("need --layers > --short-layers >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.baseline:
        load_baseline(args.baseline)
    import transformers

    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(1)  # tiny ops gain nothing from threads, and one thread makes thread CPU time the cost
    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples, failures = measure(args)
        machine, versions = environment()
    finally:  # leave a calling process (pytest) as it was
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
    cases = summarise(samples, args)
    doc = {
        "methods": headline(cases, args.methods),
        "headline_case": HEADLINE,
        "cases": cases,
        "goals": goals(cases),
        "before_after": before_after(cases, args.methods),
        "failures": failures,
        "formula": FORMULA,
        "settings": {k: getattr(args, k) for k in ("models", "methods", "modes", "layers", "short_layers", "batch",
                                                     "seq", "virtual_tokens", "rounds", "reps", "warmup", "clock",
                                                     "baseline")},
        "models": {"decoder": "Qwen2ForCausalLM, hidden 32, intermediate 64, 4 heads / 2 KV heads, vocab 128, fp32",
                   "encoder": "RobertaForSequenceClassification (2 labels), hidden 32, intermediate 64, 4 heads, "
                              "vocab 128, dropout 0.1, fp32"},
        "machine": machine,
        "note": NOTE,
        "versions": versions,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/host_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(table(cases, args.methods))
    for g in doc["goals"] + doc["before_after"]:
        lo, mid, hi = g["round_ratios_min_median_max"]
        print(f"  [{'met' if g['met'] else 'NOT met'}] {g['case']}: {g['goal']}: {g['ratio']}x (per round "
              f"{lo}-{hi}, median {mid}; met in {g['rounds_met']} rounds)")
    for f in failures:
        print(f"  failed: {f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out} ({doc['wall_s']} s)")
    return doc


if __name__ == "__main__":
    main()
