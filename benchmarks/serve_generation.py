"""Generation serving under open-loop Poisson load: mixed-adapter batches vs one adapter per batch vs the bare model.

For each model, mode and arrival rate, requests arrive at Poisson times for ``--duration`` seconds, each naming one
of ``--adapters`` prefix (or, ``--method prompt``, prompt-tuning) adapters uniformly (mode ``bare``: no adapter),
with a fixed prompt and output length (EOS ignored, so every request decodes exactly ``--output-len`` tokens). The
engine (``softprompt.multi.generation``) runs in this process, so the numbers measure scheduling and decoding, not
HTTP. Per point: generated tokens/s and the p50/p99 of time to first token (TTFT) and inter-token latency (ITL).
Goodput: the highest rate whose p99 TTFT stays under ``--slo-ms`` with every request finished.

    python benchmarks/serve_generation.py run --model smollm2 --rates 1,2,4,8,16,32
    python benchmarks/serve_generation.py report --plot benchmarks/results/serve_generation.png

Points already in ``--out`` are skipped, so a run cut by a time limit continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/portable.py, also when run from elsewhere
from portable import portable

MODES = ("mixed", "per_adapter", "bare")


def build_model(name: str, adapters: int, prefix_len: int, device: str, dtype: torch.dtype, method: str = "prefix"):
    """(MultiAdapterModel, vocab size): the base model with ``adapters`` random adapters of ``method`` ("prefix":
    deep prefixes; "prompt": prompt tuning, the adapters vLLM served until 2025), ``prefix_len`` virtual tokens."""
    import transformers as tf

    import softprompt as sp
    from softprompt.multi import MultiAdapterModel

    if name == "smollm2":
        path = sp.resources.resolve("smollm2")

        def base():
            return tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    elif name == "qwen0.5b-random":  # Qwen2.5-0.5B's shape, random weights (speed only)
        cfg = tf.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                             tie_word_embeddings=True)

        def base():
            torch.manual_seed(0)
            with torch.device(device):  # initialise on the GPU: half a billion random weights are slow on a CPU
                return tf.Qwen2ForCausalLM(cfg).to(dtype)
    elif name == "tiny":  # CPU smoke test
        cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

        def base():
            torch.manual_seed(0)
            return tf.LlamaForCausalLM(cfg).to(dtype)
    else:
        raise SystemExit(f"unknown --model {name!r}: smollm2, qwen0.5b-random or tiny")
    folder = Path(tempfile.mkdtemp(prefix="serve_gen_"))
    paths = {}
    shared = base().to(device)  # one base: wrapping only adds a method module (and freezes what is frozen anyway)
    for i in range(adapters):
        config = (sp.PrefixConfig(num_virtual_tokens=prefix_len, init="random", init_std=0.5, seed=i)
                  if method == "prefix" else
                  sp.PromptTuningConfig(num_virtual_tokens=prefix_len, init="random", init_range=0.5, seed=i))
        sp.wrap(shared, config).save_pretrained(folder / f"a{i}")
        paths[f"a{i}"] = str(folder / f"a{i}")
    model = MultiAdapterModel(shared, paths)
    return model, model.base_model.get_input_embeddings().weight.shape[0]


def prompt_lengths(spec: str) -> tuple[int, int]:
    """``--prompt-len``: "128" (every prompt) or "64:192" (uniform over the range, inclusive)."""
    lo, _, hi = str(spec).partition(":")
    try:
        lo_n, hi_n = int(lo), int(hi or lo)
    except ValueError:
        raise SystemExit(f"--prompt-len must be N or LO:HI, got {spec!r}") from None
    if not 1 <= lo_n <= hi_n:
        raise SystemExit(f"--prompt-len needs 1 <= LO <= HI, got {spec!r}")
    return lo_n, hi_n


def _as_given(spec: str) -> int | str:
    lo, hi = prompt_lengths(spec)
    return lo if lo == hi else f"{lo}:{hi}"


def run_point(model, vocab: int, mode: str, rate: float, args) -> dict:
    """One open-loop run; returns the point's metrics."""
    from softprompt.multi.generation import GenerationEngine, SamplingParams

    engine = GenerationEngine(model, max_rows=args.max_rows, policy="per_adapter" if mode == "per_adapter" else "mixed",
                              max_prefill_padding=args.max_prefill_padding, decoding=args.decoding,
                              max_context=args.max_context)
    rng = np.random.default_rng(args.seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * args.duration * 3) + 10)
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < args.duration]
    names = [None if mode == "bare" else f"a{int(k)}" for k in rng.integers(0, args.adapters, len(arrivals))]
    lo, hi = prompt_lengths(args.prompt_len)
    sizes = rng.integers(lo, hi + 1, size=len(arrivals))  # one length for all unless a LO:HI range is given
    prompts = [rng.integers(10, vocab - 10, size=int(n)).tolist() for n in sizes]
    params = SamplingParams(max_new_tokens=args.output_len, stop_token_ids=[])
    # Warm-up: one request per adapter kind, untimed (kernels, allocator).
    for name in dict.fromkeys(names[: args.adapters * 2]):
        engine.submit(prompts[0], name, SamplingParams(max_new_tokens=2, stop_token_ids=[]))
    engine.run()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[int, list[float]] = {}
    arrival_of: dict[int, float] = {}
    start = time.perf_counter()
    deadline = start + args.duration * args.max_overrun
    sent = 0
    decode_steps: list[float] = []  # seconds per step in which no request joined (decoding only)
    prefill_steps: list[float] = []  # steps in which requests joined (their prefill passes + the decode)
    while sent < len(arrivals) or engine.busy:
        now = time.perf_counter() - start
        while sent < len(arrivals) and arrivals[sent] <= now:
            rid = engine.submit(prompts[sent], names[sent], params)
            arrival_of[rid] = float(arrivals[sent])
            sent += 1
        if not engine.busy:
            time.sleep(max(0.0, min(0.01, arrivals[sent] - now)) if sent < len(arrivals) else 0)
            continue
        before = time.perf_counter()
        events = engine.step()
        sync()
        stamp = time.perf_counter() - start
        joined = any(e.request_id not in times for e in events)
        (prefill_steps if joined else decode_steps).append(time.perf_counter() - before)
        for e in events:
            times.setdefault(e.request_id, []).append(stamp)
        if time.perf_counter() > deadline:
            break
    finished = [rid for rid, ts in times.items() if len(ts) == args.output_len]
    ttft = [times[r][0] - arrival_of[r] for r in arrival_of if r in times]
    ttft += [math.inf] * (len(arrival_of) - len(ttft) + len(arrivals) - sent)  # never started: SLO missed
    itl = [b - a for r in finished for a, b in zip(times[r], times[r][1:])]
    tokens = sum(len(ts) for ts in times.values())
    span = max((ts[-1] for ts in times.values()), default=0.0)
    def pct(xs: list[float], q: float) -> float | None:
        """Percentile in ms, without interpolation (a request that never started is an infinite TTFT; JSON gets
        null for it)."""
        value = float(np.percentile(xs, q, method="higher")) * 1000 if xs else None
        return value if value is not None and math.isfinite(value) else None

    return {"mode": mode, "adapters": 0 if mode == "bare" else args.adapters, "rate": rate,
            "requests": len(arrivals), "finished": len(finished), "tokens_per_s": tokens / span if span else 0.0,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50),
            "itl_p99_ms": pct(itl, 99), "decode_step_p50_ms": pct(decode_steps, 50),
            "join_step_p50_ms": pct(prefill_steps, 50), "steps": len(decode_steps) + len(prefill_steps)}


def goodput(runs: list[dict], slo_ms: float) -> dict:
    """model -> mode -> the highest rate with p99 TTFT under the SLO and every request finished (0 if none; None for
    a mode that was not run)."""
    out: dict = {}
    for r in runs:
        ok = r["finished"] == r["requests"] and r["ttft_p99_ms"] is not None and r["ttft_p99_ms"] <= slo_ms
        best = out.setdefault(r["model"], {m: None for m in MODES})
        best[r["mode"]] = max(best[r["mode"]] or 0.0, r["rate"] if ok else 0.0)
    return out


def first_failure(runs: list[dict], model: str, mode: str, slo_ms: float, above: float) -> float | None:
    """The lowest measured rate above ``above`` that misses the SLO: the goodput lies between the two."""
    rates = [r["rate"] for r in runs if r["model"] == model and r["mode"] == mode and r["rate"] > above
             and not (r["finished"] == r["requests"] and r["ttft_p99_ms"] is not None and r["ttft_p99_ms"] <= slo_ms)]
    return min(rates, default=None)


def cmd_run(args) -> int:
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"runs": []}
    import transformers

    data.update({
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "date": datetime.date.today().isoformat(), "command": portable("python " + " ".join(sys.argv)),
        "slo_ttft_p99_ms": args.slo_ms,
        "setup": {"prompt_len": _as_given(args.prompt_len), "output_len": args.output_len, "duration_s": args.duration,
                  "max_rows": args.max_rows,
                  "max_prefill_padding": args.max_prefill_padding, "decoding": args.decoding,
                  "max_context": args.max_context, "prefix_len": args.prefix_len, "method": args.method,
                  "dtype": args.dtype,
                  "adapters": args.adapters, "arrivals": "Poisson, open loop, uniform over adapters"},
    })
    budget_end = time.time() + args.time_budget
    for model_name in args.model.split(","):
        model, vocab = build_model(model_name, args.adapters, args.prefix_len, device, dtype, args.method)
        for mode in args.modes.split(","):
            for rate in [float(r) for r in args.rates.split(",")]:
                if any(r["model"] == model_name and r["mode"] == mode and r["rate"] == rate for r in data["runs"]):
                    continue
                if time.time() > budget_end:
                    print("STATUS: time budget reached; run again to continue", flush=True)
                    return 0
                point = {"model": model_name, **run_point(model, vocab, mode, rate, args)}
                data["runs"].append(point)
                data["goodput"] = goodput(data["runs"], args.slo_ms)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(data, indent=1) + "\n")
                print(json.dumps(point), flush=True)
        del model
    print("STATUS: complete", flush=True)
    return 0


def cmd_report(args) -> int:
    data = json.loads(Path(args.results).read_text())
    setup = data["setup"]
    lines = [f"Generation serving, {data['device']} ({data['date']}); prompt {setup['prompt_len']} / output "
             f"{setup['output_len']} tokens, {setup['adapters']} {setup.get('method', 'prefix')} adapters; SLO p99 "
             f"TTFT < {data['slo_ttft_p99_ms']:.0f} ms.", "",
             "| model | mode | rate (req/s) | tokens/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | decode step p50 "
             "(ms) | finished |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else ("inf" if math.isinf(x) else f"{x:.0f}")
    for r in sorted(data["runs"], key=lambda r: (r["model"], MODES.index(r["mode"]), r["rate"])):
        lines.append(f"| {r['model']} | {r['mode']} | {r['rate']:g} | {r['tokens_per_s']:.0f} | "
                     f"{fmt(r['ttft_p50_ms'])} / {fmt(r['ttft_p99_ms'])} | {fmt(r['itl_p50_ms'])} / "
                     f"{fmt(r['itl_p99_ms'])} | {fmt(r.get('decode_step_p50_ms'))} | {r['finished']}/{r['requests']} |")
    lines += ["", "Goodput (req/s): the highest measured rate that meets the SLO; in brackets, the next measured rate, "
              "which misses it (none: no measured rate above it misses it).", "",
              "| model | goodput mixed | per adapter | bare | mixed / per adapter | mixed / bare "
              "| peak tokens/s mixed / bare |", "|---|---|---|---|---|---|---|"]
    goodputs = goodput(data["runs"], data["slo_ttft_p99_ms"])  # from the runs, whatever the file's own summary says

    def cell(model: str, mode: str) -> str:
        g = goodputs[model][mode]
        if g is None:
            return "not run"
        fail = first_failure(data["runs"], model, mode, data["slo_ttft_p99_ms"], g)
        return f"{g:g} (<{fail:g})" if fail is not None else f"{g:g} (none)"

    def ratio(a: float | None, b: float | None) -> str:
        if a is None or b is None:
            return "-"
        return f"{a / b:.2f}x" if b else ("inf (0 req/s)" if a else "-")

    def peak(model: str, mode: str) -> float | None:
        return max((r["tokens_per_s"] for r in data["runs"] if r["model"] == model and r["mode"] == mode), default=None)

    for m, g in goodputs.items():
        a, b = peak(m, "mixed"), peak(m, "bare")
        tokens = "-" if a is None or b is None else f"{a:,.0f} / {b:,.0f} = {a / b:.2f}x"
        lines.append(f"| {m} | {cell(m, 'mixed')} | {cell(m, 'per_adapter')} | {cell(m, 'bare')} | "
                     f"{ratio(g['mixed'], g['per_adapter'])} | {ratio(g['mixed'], g['bare'])} | {tokens} |")
    lines += ["", "Peak tokens/s: the highest generated tokens/s of any measured rate (saturation only where the bare "
              "model misses the SLO at some measured rate)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        models = sorted({r["model"] for r in data["runs"]})
        fig = Figure(figsize=(5 * len(models), 3.6))
        FigureCanvasAgg(fig)
        for k, m in enumerate(models):
            ax = fig.add_subplot(1, len(models), k + 1)
            runs = [r for r in data["runs"] if r["model"] == m]
            top = max((r["ttft_p99_ms"] for r in runs if r["ttft_p99_ms"] is not None), default=1000.0) * 2
            for mode in MODES:
                pts = sorted((r["rate"], r["ttft_p99_ms"]) for r in runs if r["mode"] == mode)
                if not pts:
                    continue
                line = ax.plot([x for x, y in pts if y is not None], [y for x, y in pts if y is not None], "-o",
                               ms=3, label=mode)[0]
                lost = [x for x, y in pts if y is None]  # requests left unfinished: p99 TTFT unbounded
                if lost:
                    ax.plot(lost, [top] * len(lost), "x", color=line.get_color(), ms=6)
            ax.axhline(data["slo_ttft_p99_ms"], color="grey", ls=":", lw=1)
            ax.set(xscale="log", yscale="log", xlabel="requests/s", ylabel="p99 TTFT (ms)", title=m)
            rates = sorted({r["rate"] for r in runs})
            ax.set_xticks(rates, [f"{x:g}" for x in rates])
            ax.minorticks_off()
            ax.legend(fontsize=8, title="x: requests unfinished", title_fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


def check_jobs(rng, vocab: int, requests: int, adapters: int) -> list[tuple[list[int], str | None, int]]:
    """Seeded greedy requests (prompt ids, adapter or None for every third, new tokens) of the exactness checks."""
    return [(rng.integers(10, vocab - 10, int(rng.integers(8, 96))).tolist(),
             None if k % 3 == 0 else f"a{int(rng.integers(0, adapters))}", int(rng.integers(4, 32)))
            for k in range(requests)]


def cmd_check(args) -> int:
    """Fixed buffers / CUDA graphs against the default decoding on :func:`check_jobs`, arriving at seeded steps in
    bursts and alone (gaps empty the batch, so rows also decode alone): rows with the same tokens, and the median
    decoding-step time of each. Run it on the GPU before trusting ``--decoding cuda_graphs`` numbers."""
    from softprompt.multi.generation import GenerationEngine, SamplingParams

    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, vocab = build_model(args.model, args.adapters, args.prefix_len, device, dtype, args.method)
    rng = np.random.default_rng(args.seed)
    jobs = check_jobs(rng, vocab, args.requests, args.adapters)
    # Arrival step of each request: half of them in one burst at step 0, the rest with gaps of 0-40 steps (a gap
    # longer than any request's 31 new tokens empties the batch).
    half = len(jobs) // 2
    arrive = [0] * half + np.cumsum(rng.choice([0, 1, 4, 40], size=len(jobs) - half)).tolist()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results, steps = {}, {}
    for decoding in ("dynamic", args.decoding):
        engine = GenerationEngine(model, max_rows=args.max_rows, decoding=decoding, max_context=args.max_context)
        ids, step = [], 0
        times = []
        while len(ids) < len(jobs) or engine.busy:
            if not engine.busy:
                step = max(step, arrive[len(ids)])
            while len(ids) < len(jobs) and arrive[len(ids)] <= step:
                p, a, n = jobs[len(ids)]
                ids.append(engine.submit(p, a, SamplingParams(max_new_tokens=n, stop_token_ids=[])))
            step += 1
            waiting = len(engine.waiting)
            start = time.perf_counter()
            engine.step()
            sync()
            if len(engine.waiting) == waiting:  # nobody joined: a decoding-only step
                times.append(time.perf_counter() - start)
        results[decoding] = [engine.result(i) for i in ids]
        steps[decoding] = float(np.median(times)) * 1000 if times else None
    same = sum(a == b for a, b in zip(results["dynamic"], results[args.decoding]))
    first = sum(a[:1] == b[:1] for a, b in zip(results["dynamic"], results[args.decoding]))
    print(json.dumps({"model": args.model, "dtype": args.dtype, "device": device, "decoding": args.decoding,
                      "requests": len(jobs), "identical_rows": same, "identical_first_tokens": first,
                      "decode_step_p50_ms": steps}), flush=True)
    return 0 if same == len(jobs) or args.dtype != "float32" else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="smollm2", help="comma-separated: smollm2, qwen0.5b-random, tiny")
    r.add_argument("--modes", default=",".join(MODES))
    r.add_argument("--rates", default="1,2,4,8,16,32,64")
    r.add_argument("--adapters", type=int, default=8)
    r.add_argument("--prefix-len", type=int, default=16, help="virtual tokens per adapter")
    r.add_argument("--method", default="prefix", choices=["prefix", "prompt"], help="the adapters' method")
    r.add_argument("--prompt-len", default="128", help="tokens per prompt: N, or LO:HI (uniform per request)")
    r.add_argument("--output-len", type=int, default=64)
    r.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per point")
    r.add_argument("--max-overrun", type=float, default=3.0, help="stop a point after this many x duration")
    r.add_argument("--max-rows", type=int, default=64)
    r.add_argument("--decoding", default="dynamic", choices=["dynamic", "static", "cuda_graphs"],
                   help="GenerationEngine decoding: a growing cache, or fixed buffers (eager / replayed CUDA graphs)")
    r.add_argument("--max-context", type=int, default=2048, help="columns of the fixed buffers (static decoding)")
    r.add_argument("--max-prefill-padding", type=float, default=0.5,
                   help="share of a prefill pass that may be padding (0: each prompt length prefills on its own)")
    r.add_argument("--slo-ms", type=float, default=500.0)
    r.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    r.add_argument("--device")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--time-budget", type=float, default=1e9, help="seconds; stop cleanly before starting a point")
    r.add_argument("--out", default="benchmarks/results/serve_generation.json")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("check", help="fixed buffers / CUDA graphs against the default decoding (tokens, step time)")
    c.add_argument("--model", default="smollm2")
    c.add_argument("--decoding", default="cuda_graphs", choices=["static", "cuda_graphs"])
    c.add_argument("--requests", type=int, default=48)
    for flag, default in (("--adapters", 8), ("--prefix-len", 16), ("--max-rows", 16), ("--max-context", 256)):
        c.add_argument(flag, type=int, default=default)
    c.add_argument("--method", default="prefix", choices=["prefix", "prompt"])
    c.add_argument("--dtype", default="float32", help="float32: rows must agree exactly (exit 1 otherwise)")
    c.add_argument("--device")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_check)
    s = sub.add_parser("report")
    s.add_argument("--results", default="benchmarks/results/serve_generation.json")
    s.add_argument("--markdown")
    s.add_argument("--plot")
    s.set_defaults(func=cmd_report)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
