#!/usr/bin/env python
"""Host time of one decoding step of the generation server, bare model against mixed adapters (issues 18/19). CPU.

On the GPU a decoding step of ``GenerationEngine`` is host-bound (about 100 ms inter-token latency for a 0.5B model
on an H200, ``benchmarks/results/serve_generation.md``), so the host work per step sets tokens/s. Tiny Qwen2-shaped
decoders (hidden 64, 4 heads / 2 KV heads, intermediate 128, vocab 1000, fp32, one torch thread) make the arithmetic
negligible, so what is timed is that host work: Python, module calls, op dispatch. Variants, B rows each:

- ``hf``: the plain transformers model (SDPA, no softprompt): one decode step on a ``DynamicCache`` with the engine's
  growing 2D mask and explicit position ids, then argmax and one ``.tolist()``: the floor;
- ``bare``: the engine, B bare rows; ``prefix_one``: B rows of one prefix adapter; ``prefix_mixed``: B rows over 8
  prefix adapters; ``methods_mixed``: B rows over prompt, ptuning, prefix, apt, lpt, idspam (one adapter each).

Each runs at two depths, interleaved over ``--rounds`` rounds (A B C ... A B C ..., the start rotated every round);
in a round a variant re-creates its rows (prefill, ``--warmup`` steps), then times ``--steps`` steps one by one, so
the context length stays in a fixed range. The line through the two depths gives the per-layer cost (FORMULA).

    python benchmarks/decode_overhead.py --out benchmarks/results/decode_overhead.json   # about 1.5 minutes
    python benchmarks/decode_overhead.py --quick --out /tmp/decode.json       # smoke settings, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/portable.py
from portable import portable  # noqa: E402

VARIANTS = ("hf", "bare", "prefix_one", "prefix_mixed", "methods_mixed")
METHODS = ("prompt", "ptuning", "prefix", "apt", "lpt", "idspam")
PREFIXES = 8  # adapters of prefix_mixed
VOCAB = 1000
GOAL = 0.9  # issue 19: mixed-adapter decoding at least 0.9x the bare model's tokens/s
FORMULA = ("T(L) = median thread CPU time of one decoding step (all rounds) at depth L; us_per_layer = (T(L) - T(S)) "
           "/ (L - S), fixed_ms = T(L) - L * us_per_layer, S = --short-layers; vs_bare / vs_hf = T_variant / T_bare "
           "or T_hf at the same depth; implied tokens/s ratio = T_bare / T_variant (steps purely host-bound).")
NOTE = ("A CPU proxy, not a GPU measurement: host-side thread CPU time on tiny models (one torch thread), on 2 cores "
        "shared with other processes (thread time ignores descheduling, not cache contention). The implied tokens/s "
        "ratio holds on a GPU only as far as its steps are host-bound; compare variants within one run.")


def build_base(layers: int) -> nn.Module:
    """A random tiny Qwen2 decoder with ``layers`` layers and SDPA attention, in eval mode. Weights drawn with std
    0.3 and a fast rotary base (theta 10), so that adapters and positions change the generated tokens (at the default
    std of 0.02 every row repeats one token whatever its adapter, and the test's row check would prove nothing);
    values do not change the host work."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, use_sliding_window=False, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.3, rope_parameters={"rope_type": "default", "rope_theta": 10.0})
    cfg._attn_implementation = "sdpa"
    return tf.Qwen2ForCausalLM(cfg).eval()


def adapter_configs(layers: int, tokens: int) -> dict[str, object]:
    """Name -> config: ``PREFIXES`` prefix adapters p0.. and one adapter per method. Random init with fixed seeds,
    strong enough that every adapter changes what the model generates (the test checks rows against it)."""
    import softprompt as sp

    mid = layers // 2  # LPT and ID-SPAM insert at the middle layer, within the tiny model's depth
    out: dict[str, object] = {f"p{i}": sp.PrefixConfig(num_virtual_tokens=tokens, init="random", init_std=1.0,
                                                      seed=100 + i) for i in range(PREFIXES)}
    out.update({
        "prompt": sp.PromptTuningConfig(num_virtual_tokens=tokens, init="random", init_range=1.0, seed=1),
        "ptuning": sp.PTuningConfig(num_virtual_tokens=tokens, init="random", init_range=1.0, seed=2),
        "prefix": sp.PrefixConfig(num_virtual_tokens=tokens, init="random", init_std=1.0, seed=3),
        "apt": sp.APTConfig(num_virtual_tokens=tokens, init="random", init_std=1.0, gate_init_std=1.0, seed=5),
        "lpt": sp.LatePromptConfig(num_virtual_tokens=tokens, layer=mid, init_std=1.0, seed=6),
        "idspam": sp.IDSPAMConfig(num_virtual_tokens=tokens, layer=mid, dropout=0.0, seed=8),
    })
    return out


def build_models(layers: int, tokens: int, folder: Path) -> tuple[nn.Module, object]:
    """(plain HF model for ``hf``, MultiAdapterModel with every adapter of :func:`adapter_configs`), one base's
    weights. Each gets its own copy: the MultiAdapterModel wraps its base's layers, which the floor must not see."""
    import softprompt as sp
    from softprompt.multi import MultiAdapterModel

    base = build_base(layers)
    paths = {}
    for name, config in adapter_configs(layers, tokens).items():
        sp.wrap(copy.deepcopy(base), config).save_pretrained(str(folder / f"L{layers}_{name}"))
        paths[name] = str(folder / f"L{layers}_{name}")
    return copy.deepcopy(base), MultiAdapterModel(copy.deepcopy(base), paths)


def row_adapters(variant: str, rows: int) -> list[str | None]:
    """The adapter of each of ``rows`` rows in an engine variant."""
    if variant == "bare":
        return [None] * rows
    if variant == "prefix_one":
        return ["p0"] * rows
    if variant == "prefix_mixed":
        return [f"p{i % PREFIXES}" for i in range(rows)]
    return [METHODS[i % len(METHODS)] for i in range(rows)]


def make_prompts(rows: int, length: int) -> list[list[int]]:
    """Fixed random prompts, one per row, the same for every variant and depth."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(3, VOCAB, (rows, length), generator=gen).tolist()


def engine_round(engine, adapters: list[str | None], prompts: list[list[int]], steps: int, warmup: int,
                 clock: Callable[[], int]) -> tuple[list[float], list[int], list[list[int]]]:
    """One round of an engine variant: submit the rows, prefill them (one step), ``warmup`` untimed steps, ``steps``
    timed ones, one untimed last step in which every row finishes. Returns (us per timed step, events per timed
    step, each row's tokens). Greedy and no stop tokens, so every row decodes exactly as long as the round."""
    from softprompt.multi.generation import SamplingParams

    params = SamplingParams(max_new_tokens=1 + warmup + steps + 1, stop_token_ids=[])
    ids = [engine.submit(p, a, params) for p, a in zip(prompts, adapters)]
    engine.step()  # every row joins (max_rows >= rows) and gets its first token
    for _ in range(warmup):
        engine.step()
    times, counts = [], []
    for _ in range(steps):
        t0 = clock()
        events = engine.step()
        times.append((clock() - t0) / 1000.0)
        counts.append(len(events))
    engine.step()
    if engine.busy:
        raise RuntimeError("rows outlived the round: the benchmark's step count and the engine disagree")
    tokens = [engine.result(i) for i in ids]
    for i in ids:
        engine.forget(i)
    return times, counts, tokens


def hf_round(model: nn.Module, prompts: list[list[int]], steps: int, warmup: int,
             clock: Callable[[], int]) -> tuple[list[float], list[int], list[list[int]]]:
    """The floor, shaped like :func:`engine_round`: the engine's decode step without the engine (input ids and
    positions from host lists, the mask grown by one column, argmax and one ``.tolist()`` per step)."""
    import inspect

    from transformers import DynamicCache

    # The engine's choice of cache argument (transformers 5.24+ calls it `cache`).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rows, length = len(prompts), len(prompts[0])
    cache = DynamicCache()
    with torch.inference_mode():
        ids = torch.tensor(prompts)
        mask = torch.ones_like(ids)
        out = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(length)[None].expand(rows, -1),
                     use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        last = out.logits[:, -1].argmax(-1).tolist()
    tokens = [[t] for t in last]
    positions = [length] * rows

    def step() -> None:
        nonlocal mask, last, positions
        with torch.inference_mode():  # the engine's step() pays this context too
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            out = model(input_ids=torch.tensor([[t] for t in last]), attention_mask=mask,
                        position_ids=torch.tensor([[p] for p in positions]), use_cache=True, **{cache_arg: cache})
            last = out.logits[:, -1].argmax(-1).tolist()
        positions = [p + 1 for p in positions]
        for row, t in zip(tokens, last):
            row.append(t)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = clock()
        step()
        times.append((clock() - t0) / 1000.0)
    return times, [rows] * steps, tokens


def make_cases(args: argparse.Namespace, folder: Path) -> dict[tuple[int, str], Callable[[], tuple]]:
    """(depth, variant) -> a callable running one round of it."""
    from softprompt.multi.generation import GenerationEngine

    prompts = make_prompts(args.rows, args.prompt_len)
    cases: dict[tuple[int, str], Callable[[], tuple]] = {}
    clock = time.thread_time_ns
    for layers in (args.short_layers, args.layers):
        hf, multi = build_models(layers, args.virtual_tokens, folder)
        for variant in args.variants:
            if variant == "hf":
                cases[(layers, variant)] = lambda m=hf: hf_round(m, prompts, args.steps, args.warmup, clock)
                continue
            # One engine per variant on the shared model: rows of one variant never meet another's.
            engine = GenerationEngine(multi, max_rows=args.rows, decoding="dynamic")  # the eager path it times
            adapters = row_adapters(variant, args.rows)
            cases[(layers, variant)] = lambda e=engine, a=adapters: engine_round(e, a, prompts, args.steps,
                                                                                 args.warmup, clock)
    return cases


def measure(args: argparse.Namespace) -> tuple[dict, dict]:
    """samples[(depth, variant)] -> per-round lists of us per step; events[(depth, variant)] -> events per step."""
    with tempfile.TemporaryDirectory(prefix="decode_overhead_") as tmp:
        cases = make_cases(args, Path(tmp))  # adapters are read while the engines are built: the folder may go
    for fn in cases.values():
        fn()  # one untimed round each: fail here, not in the timed loop, and warm every path
    # The models live for the whole run: keep them out of the collector's scans (noise that is not the step's).
    gc.collect()
    gc.freeze()
    samples: dict[tuple, list[list[float]]] = {key: [] for key in cases}
    events: dict[tuple, list[int]] = {key: [] for key in cases}
    order = list(cases)
    try:
        for r in range(args.rounds):
            shift = r % len(order)
            for key in order[shift:] + order[:shift]:  # rotate, so no variant always follows the same neighbour
                times, counts, _ = cases[key]()
                samples[key].append(times)
                events[key] += counts
    finally:
        gc.unfreeze()
    return samples, events


def _median(rounds: list[list[float]]) -> float:
    return statistics.median(x for r in rounds for x in r)


def summarise(samples: dict, events: dict, args: argparse.Namespace) -> dict:
    """Per variant: ms per step at both depths, the per-layer slope, ratios to bare and hf, and the implied
    tokens/s ratio (bare / variant), with per-round paired ratios at the long depth."""
    L, S = args.layers, args.short_layers
    out: dict[str, dict] = {}
    for variant in args.variants:
        t = {d: _median(samples[(d, variant)]) for d in (S, L)}
        slope = (t[L] - t[S]) / (L - S)
        all_long = [x for r in samples[(L, variant)] for x in r]
        q1, _, q3 = statistics.quantiles(all_long, n=4, method="inclusive")
        row = {"ms_per_step": {str(d): round(t[d] / 1000, 3) for d in (S, L)},
               "ms_iqr_long": [round(q1 / 1000, 3), round(q3 / 1000, 3)],
               "us_per_layer": round(slope, 1), "fixed_ms": round((t[L] - L * slope) / 1000, 3),
               "steps_timed": len(all_long),
               "events_per_step": [min(events[(L, variant)] + events[(S, variant)]),
                                   max(events[(L, variant)] + events[(S, variant)])]}
        for ref in ("bare", "hf"):
            if ref in args.variants:
                row[f"vs_{ref}"] = {str(d): round(t[d] / _median(samples[(d, ref)]), 3) for d in (S, L)}
                # Paired by round: both ran seconds apart, so a slow spell of the shared machine cancels.
                paired = sorted(statistics.median(a) / statistics.median(b)
                                for a, b in zip(samples[(L, variant)], samples[(L, ref)]))
                row[f"vs_{ref}_rounds_min_median_max"] = [round(paired[0], 3), round(statistics.median(paired), 3),
                                                          round(paired[-1], 3)]
        if "bare" in args.variants:
            row["implied_tokens_per_s_vs_bare"] = {str(d): round(_median(samples[(d, "bare")]) / t[d], 3)
                                                   for d in (S, L)}
            # In how many rounds, paired, the goal holds: how firm a verdict is on a noisy shared machine.
            met = {d: sum(statistics.median(b) >= GOAL * statistics.median(a)
                          for a, b in zip(samples[(d, variant)], samples[(d, "bare")])) for d in (S, L)}
            row["rounds_at_goal"] = {str(d): f"{n}/{args.rounds}" for d, n in met.items()}
        out[variant] = row
    return out


def goals(variants: dict, layers: list[int]) -> list[dict]:
    """Issue 19's goal on the CPU proxy: every adapter variant's implied tokens/s at least GOAL x bare's."""
    return [{"goal": f"{v} tokens/s >= {GOAL}x bare (CPU proxy)", "layers": d,
             "ratio": row["implied_tokens_per_s_vs_bare"][str(d)],
             "met": row["implied_tokens_per_s_vs_bare"][str(d)] >= GOAL, "rounds_met": row["rounds_at_goal"][str(d)]}
            for v, row in variants.items() if v not in ("hf", "bare") and "implied_tokens_per_s_vs_bare" in row
            for d in layers]


def table(variants: dict, S: int, L: int) -> str:
    """Markdown: per variant, ms per step at both depths, us per layer, ratios at the long depth."""
    def get(row: dict, key: str) -> str:
        return f"{row[key][str(L)]:.2f}x" if key in row else "-"

    lines = [f"| variant | ms/step, {S} layers | ms/step, {L} layers | us/layer | vs bare | vs hf | "
             f"implied tokens/s vs bare ({L} layers) |", "|---|---|---|---|---|---|---|"]
    for v, row in variants.items():
        ms = row["ms_per_step"]
        lines.append(f"| {v} | {ms[str(S)]:.2f} | {ms[str(L)]:.2f} | {row['us_per_layer']:.0f} | {get(row, 'vs_bare')} "
                     f"| {get(row, 'vs_hf')} | {get(row, 'implied_tokens_per_s_vs_bare')} |")
    return "\n".join(lines)


def environment() -> tuple[str, dict, str]:
    """(machine, versions, the measured code: commit, "+dirty" when src/softprompt has uncommitted changes)."""
    import transformers

    import softprompt

    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    machine = f"{names[0] if names else platform.machine()}, {os.cpu_count()} logical cores; torch threads 1"
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "softprompt": getattr(softprompt, "__version__", "?")}
    try:  # other engineers edit the engine meanwhile: say which code was measured
        git = ["git", "-C", str(_SRC.parent)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "src/softprompt"], capture_output=True, text=True)
        code = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        code = "unknown"
    return machine, versions, code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--layers", type=int, default=24, help="depth L (default 24)")
    p.add_argument("--short-layers", type=int, default=6, help="second depth S for the per-layer slope (default 6)")
    p.add_argument("--rows", type=int, default=16, help="rows B decoded per step (default 16)")
    p.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per row (default 8)")
    p.add_argument("--virtual-tokens", type=int, default=8, help="virtual tokens of every adapter (default 8)")
    p.add_argument("--rounds", type=int, default=100, help="interleaved rounds (default 100)")
    p.add_argument("--steps", type=int, default=10, help="timed decoding steps per variant and round (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the prefill in every round")
    p.add_argument("--quick", action="store_true", help="smoke settings: 4/2 layers, 2 rounds, 3 steps, 1 warm-up")
    p.add_argument("--out", default=None, help="JSON output")
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quick:
        args.layers, args.short_layers, args.rounds, args.steps, args.warmup = 4, 2, 2, 3, 1
    args.variants = [v for v in args.variants.split(",") if v]
    if set(args.variants) - set(VARIANTS) or not args.variants:
        raise SystemExit(f"unknown variants {sorted(set(args.variants) - set(VARIANTS))}; known: {', '.join(VARIANTS)}")
    if not args.layers > args.short_layers >= 1 or args.rows < 1 or args.steps < 1 or args.rounds < 1:
        raise SystemExit("need --layers > --short-layers >= 1 and --rows, --steps, --rounds >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(1)  # tiny ops gain nothing from threads, and one thread makes thread CPU time the cost
    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples, events = measure(args)
    finally:  # leave a calling process (pytest) as it was
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
    machine, versions, code = environment()
    variants = summarise(samples, events, args)
    doc = {
        "variants": variants,
        "goals": goals(variants, [args.short_layers, args.layers]),
        "formula": FORMULA,
        "note": NOTE,
        "settings": {k: getattr(args, k) for k in ("variants", "layers", "short_layers", "rows", "prompt_len",
                                                     "virtual_tokens", "rounds", "steps", "warmup")},
        "model": "Qwen2ForCausalLM, hidden 64, intermediate 128, 4 heads / 2 KV heads, vocab 1000, SDPA, fp32",
        "adapters": {"prefix_mixed": f"{PREFIXES} prefix adapters", "methods_mixed": list(METHODS)},
        "machine": machine,
        "versions": versions,
        "code": code,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": portable(" ".join(["python benchmarks/decode_overhead.py", *argv])),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(table(variants, args.short_layers, args.layers))
    for g in doc["goals"]:
        print(f"  [{'met' if g['met'] else 'NOT met'}] L={g['layers']}: {g['goal']}: {g['ratio']}x "
              f"(met in {g['rounds_met']} rounds)")
    print("  (implied tokens/s ratios are a CPU proxy of host-bound steps, not a GPU measurement)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {portable(args.out)} ({doc['wall_s']} s)")
    return doc


if __name__ == "__main__":
    main()
