"""Requests per second for many adapters on one model: mixed batches vs one adapter at a time.

A stream of single-text requests, each for one of N adapters chosen at random, is served two ways on the same
model and hardware:

* ``mixed``: every window of ``--batch-size`` queued requests runs as one batch (rows of all adapters together),
  which is what ``softprompt serve`` does;
* ``per_adapter``: every window is split by adapter and each adapter's rows run as their own batch, one after the
  other: the only way to serve prompt/prefix adapters when a batch cannot mix them (PEFT, huggingface/peft#759).

Two measurements:

* ``engine``: in-process, through ``MultiAdapterModel.predict`` (tokenise + forward + labels), no HTTP;
* ``http``: ``softprompt serve`` in a subprocess (``--no-mixed`` for the per-adapter server) driven by
  ``--concurrency`` asynchronous HTTP clients; requests/s and latency percentiles.

Adapters are randomly initialised (speed does not depend on their values).

    python benchmarks/serve_bench.py --model minilm --device cpu                  # CPU figure
    python benchmarks/serve_bench.py --model minilm --device cuda --dtype bfloat16 --requests 8192 \
        --batch-size 64 --concurrency 256 --out benchmarks/results/serve_gpu.json  # GPU figure
    python benchmarks/serve_bench.py --model tiny --requests 256                  # seconds, for a smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a film movie plot actors story was is very not quite rather good great bad awful dull brilliant "
         "funny slow moving performance direction script scenes ending music visual charming tedious surprising "
         "predictable original clever cast camera work humour pace long short memorable forgettable").split()


# ---- setup -----------------------------------------------------------------------------------------------------
def make_texts(n: int, seed: int, min_words: int, max_words: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def tiny_model_dir(root: Path) -> str:
    """A random 4-layer BERT (hidden 256) with MiniLM's tokenizer: a quick CPU smoke test of the whole pipeline."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from softprompt import resources

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=512, pad_token_id=0)
    BertModel(cfg).save_pretrained(root)
    AutoTokenizer.from_pretrained(resources.minilm_dir()).save_pretrained(root)
    return str(root)


def make_adapters(model: str, root: Path, n: int, methods: list[str], tokens: int, max_length: int) -> dict[str, str]:
    """N randomly initialised adapters (methods cycled), saved with serving metadata."""
    import torch

    import softprompt as sp
    from softprompt.loading import HeadSpec, load_base

    base, _ = load_base(model, HeadSpec("classification", ["neg", "pos"]))
    out = {}
    for i in range(n):
        method = methods[i % len(methods)]
        opts = {"num_virtual_tokens": tokens}
        if method in ("lpt", "idspam"):
            opts["num_virtual_tokens"] = max(1, tokens // 2)
        wrapped = sp.wrap(_fresh(base), sp.config_from_dict(method, opts))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in wrapped.trainable_parameters().values():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        name = f"{method}{i}"
        wrapped.save_pretrained(root / name, label_names=["neg", "pos"], task_kind="classification",
                                max_length=max_length, model_name=model)
        out[name] = str(root / name)
    return out


def _fresh(base):
    import copy

    return copy.deepcopy(base)


# ---- engine measurement ----------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def engine_run(model, texts: list[str], names: list[str], batch: int, mode: str, device: str) -> dict:
    """Serve the request stream; returns requests/s and model calls. ``mode``:

    * ``mixed``: window by window, each window one call;
    * ``per_adapter``: window by window, each window split by adapter (one call per adapter present);
    * ``per_adapter_queued``: rows grouped by adapter over the whole stream and cut into full batches: the
      throughput ceiling of a one-adapter-at-a-time server that queues each adapter until its batch fills (a row
      then waits for ``batch`` rows of its own adapter to arrive, so its latency grows with the number of adapters).
    """
    if mode == "per_adapter_queued":
        by: dict[str, list[int]] = {}
        for j, a in enumerate(names):
            by.setdefault(a, []).append(j)
        calls_rows = [(a, rows[i:i + batch]) for a, rows in by.items() for i in range(0, len(rows), batch)]
    else:
        calls_rows = []
        for i in range(0, len(texts), batch):
            window = list(range(i, min(i + batch, len(texts))))
            if mode == "mixed":
                calls_rows.append((None, window))
                continue
            by = {}
            for j in window:
                by.setdefault(names[j], []).append(j)
            calls_rows += list(by.items())
    sync(device)
    start = time.perf_counter()
    for adapter, rows in calls_rows:
        model.predict([texts[j] for j in rows], [names[j] for j in rows] if adapter is None else adapter)
    sync(device)
    seconds = time.perf_counter() - start
    return {"requests_per_s": len(texts) / seconds, "seconds": seconds, "model_calls": len(calls_rows)}


def engine_bench(model, texts, names, batch, device, repeats) -> dict:
    modes = ("mixed", "per_adapter", "per_adapter_queued")
    for mode in modes:  # warm-up (kernels, allocator)
        engine_run(model, texts[: batch * 4], names[: batch * 4], batch, mode, device)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(repeats):  # alternate, so that a load change on a shared machine hits every mode alike
        for mode in modes:
            runs[mode].append(engine_run(model, texts, names, batch, mode, device))
    out = {}
    for mode, rs in runs.items():
        best = max(rs, key=lambda r: r["requests_per_s"])
        out[mode] = {**best, "runs_requests_per_s": [round(r["requests_per_s"], 2) for r in rs]}
    out["speedup"] = out["mixed"]["requests_per_s"] / out["per_adapter"]["requests_per_s"]
    out["speedup_vs_queued"] = out["mixed"]["requests_per_s"] / out["per_adapter_queued"]["requests_per_s"]
    # Paired ratios (mixed run i / the per-adapter run right after it): robust to load drifting on shared machines.
    ratios = sorted(m["requests_per_s"] / p["requests_per_s"] for m, p in zip(runs["mixed"], runs["per_adapter"]))
    out["speedup_paired_median"] = statistics.median(ratios)
    out["speedup_paired"] = [round(r, 3) for r in ratios]
    return out


# ---- HTTP measurement ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, adapters: dict, args, mixed: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "softprompt", "serve", "--model", model, "--port", str(port),
           "--max-batch-size", str(args.batch_size), "--max-wait-ms", str(args.max_wait_ms), "--device", args.device,
           "--dtype", args.dtype, "--max-inputs", str(max(64, args.inputs_per_request)), "--log-level", "warning"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    if not mixed:
        cmd.append("--no-mixed")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start in 300 s")


async def _drive(url: str, requests: list[tuple[list[str], str]], concurrency: int) -> list[float]:
    """Send ``requests`` (inputs, adapter) with ``concurrency`` requests in flight; returns each one's latency."""
    import httpx

    latencies: list[float] = []
    queue: asyncio.Queue = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker():
            while not queue.empty():
                inputs, name = queue.get_nowait()
                t0 = time.perf_counter()
                r = await client.post("/predict", json={"adapter": name, "inputs": inputs})
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _drive_shard(url: str, requests: list, concurrency: int, start_at: float) -> tuple[list[float], float]:
    """One client process: wait for the common start time, send, return (latencies, wall-clock end time)."""
    time.sleep(max(0.0, start_at - time.time()))  # process start-up is not part of the measurement
    latencies = asyncio.run(_drive(url, requests, concurrency))
    return latencies, time.time()


def drive(url: str, texts: list[str], names: list[str], args) -> dict:
    """The request stream through ``--client-procs`` client processes (one Python client caps near a few thousand
    requests/s, which a GPU server can exceed); requests/s = all requests / wall time of the whole run."""
    import httpx

    k = args.inputs_per_request
    requests = [(texts[i:i + k], names[i]) for i in range(0, len(texts), k)]
    procs = max(1, args.client_procs)
    before = httpx.get(f"{url}/stats", timeout=30).json()
    if procs == 1:
        start = time.time()
        latencies, end = _drive_shard(url, requests, args.concurrency, start)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        shards = [requests[i::procs] for i in range(procs)]
        start = time.time() + 10.0  # leaves the client processes time to start (spawn imports this module)
        # spawn, not fork: this process may hold a CUDA context and torch thread pools
        with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_drive_shard, [url] * procs, shards, [max(1, args.concurrency // procs)] * procs,
                                  [start] * procs))
        latencies = [x for part, _ in parts for x in part]
        end = max(e for _, e in parts)
    seconds = end - start
    after = httpx.get(f"{url}/stats", timeout=30).json()
    latencies.sort()
    q = lambda f: latencies[min(len(latencies) - 1, int(f * len(latencies)))] * 1000
    batches = after["batcher"]["batches"] - before["batcher"]["batches"]
    rows = after["batcher"]["rows"] - before["batcher"]["rows"]
    return {"requests_per_s": len(requests) / seconds, "texts_per_s": len(texts) / seconds, "seconds": seconds,
            "latency_ms_p50": q(0.5), "latency_ms_p95": q(0.95), "latency_ms_p99": q(0.99),
            "mean_batch_rows": rows / max(batches, 1),
            "model_calls": after["batcher"]["model_calls"] - before["batcher"]["model_calls"],
            "backbone_passes": after["model"]["backbone_passes"] - before["model"]["backbone_passes"]}


def http_bench(model: str, adapters: dict, texts, names, args) -> dict:
    out = {}
    for mode, mixed in (("mixed", True), ("per_adapter", False)):
        proc, url = start_server(model, adapters, args, mixed)
        try:
            warm = min(len(texts), args.batch_size * 4)
            drive(url, texts[:warm], names[:warm], args)
            out[mode] = drive(url, texts, names, args)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    out["speedup"] = out["mixed"]["requests_per_s"] / out["per_adapter"]["requests_per_s"]
    return out


# ---- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import torch  # here, not at the top: the spawned client processes import this module and need no torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="alias/path, or 'tiny' (random 4-layer BERT, quick)")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--methods", default="prefix", help="comma list, cycled over the adapters (prefix, prompt, ...)")
    p.add_argument("--num-virtual-tokens", type=int, default=20)
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32, help="window = server max batch size")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=64, help="HTTP clients in flight")
    p.add_argument("--inputs-per-request", type=int, default=1, help="texts per HTTP request (same adapter)")
    p.add_argument("--client-procs", type=int, default=1, help="client processes sharing --concurrency")
    p.add_argument("--min-words", type=int, default=8)
    p.add_argument("--max-words", type=int, default=40)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--mode", default="engine,http", help="engine, http or both (comma list)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch intra-op threads (engine and server); default torch's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/serve_bench.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    modes = {m.strip() for m in args.mode.split(",") if m.strip()}
    if args.threads:
        torch.set_num_threads(args.threads)

    from softprompt.multi import MultiAdapterModel

    work = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    try:
        model_name = tiny_model_dir(work / "tiny") if args.model == "tiny" else args.model
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        adapters = make_adapters(model_name, work / "adapters", args.adapters, methods, args.num_virtual_tokens,
                                 args.max_length)
        texts = make_texts(args.requests, args.seed, args.min_words, args.max_words)
        rng = random.Random(args.seed + 1)
        names = [rng.choice(list(adapters)) for _ in texts]
        result: dict = {
            "model": args.model, "adapters": args.adapters, "methods": methods,
            "num_virtual_tokens": args.num_virtual_tokens, "requests": args.requests, "batch_size": args.batch_size,
            "device": args.device, "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": _machine(args.device), "words_per_text": [args.min_words, args.max_words],
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }
        if "engine" in modes:
            model = MultiAdapterModel(model_name, adapters, dtype=getattr(torch, args.dtype), device=args.device)
            result["backbone_passes_per_mixed_batch"] = len(model.plan(names[: args.batch_size]))
            result["engine"] = engine_bench(model, texts, names, args.batch_size, args.device, args.repeats)
            del model
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the HTTP servers load their own copy
            # Keep the engine figures even if the HTTP part fails or is cut off.
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        if "http" in modes:
            result["http"] = http_bench(model_name, adapters, texts, names, args)
            result["http"]["concurrency"] = args.concurrency
            result["http"]["inputs_per_request"] = args.inputs_per_request
            result["http"]["client_procs"] = args.client_procs
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def table(r: dict) -> str:
    lines = [f"{r['adapters']} adapters ({'/'.join(r['methods'])}, {r['num_virtual_tokens']} tokens) on {r['model']}, "
             f"{r['device']} {r['dtype']} [{r['machine']}], {r['requests']} requests, batch {r['batch_size']}", "",
             "| measurement | mixed req/s | one adapter at a time req/s | speed-up | notes |",
             "|---|---:|---:|---:|---|"]
    if "engine" in r:
        e = r["engine"]
        mixed = e["mixed"]

        def engine_row(label: str, other: dict, speedup: str) -> str:
            return (f"| {label} | {mixed['requests_per_s']:.1f} | {other['requests_per_s']:.1f} | {speedup} | "
                    f"model calls {mixed['model_calls']} vs {other['model_calls']} |")

        lines.append(engine_row("engine (predict, no HTTP)", e["per_adapter"],
                                f"{e['speedup']:.2f}x (paired median {e['speedup_paired_median']:.2f}x)"))
        if "per_adapter_queued" in e:  # absent from files written before session 4
            lines.append(engine_row("engine, one adapter at a time with full per-adapter batches (queued; latency "
                                    "not bounded)", e["per_adapter_queued"], f"{e['speedup_vs_queued']:.2f}x"))
    if "http" in r:
        h = r["http"]
        lines.append(f"| HTTP ({h['concurrency']} clients, {h['inputs_per_request']} text/request) | "
                     f"{h['mixed']['requests_per_s']:.1f} | "
                     f"{h['per_adapter']['requests_per_s']:.1f} | {h['speedup']:.2f}x | p50 latency "
                     f"{h['mixed']['latency_ms_p50']:.0f} vs {h['per_adapter']['latency_ms_p50']:.0f} ms, mean batch "
                     f"{h['mixed']['mean_batch_rows']:.1f} rows |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
