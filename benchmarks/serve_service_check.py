"""The HTTP server's generation path without HTTP: `serve.generation.GenerationService` (the engine stepped in a
worker thread, requests handed over from an asyncio loop) with fixed buffers or CUDA graphs, against the same
requests decoded offline by the default engine (a growing cache, stepped in the calling thread).

`serve_generation.py check` compares the two decodings inside one thread. A server differs in two ways: the engine
steps in a thread of its own, whose current CUDA device is cuda:0 whatever the model's device, and requests join
at the moments they arrive, not at chosen steps. This script submits seeded greedy requests (8 prefix adapters and
bare rows, varied prompt lengths, arrivals spread over time so that rows join and leave) through the service and
prints how many return exactly the offline tokens. The device machine has no fastapi, so this is how the service
path is checked there; the HTTP layer on top of it is tested on the CPU (`tests/test_openai_server.py`).

    python benchmarks/serve_service_check.py --model smollm2 --decoding cuda_graphs          # on the GPU
    python benchmarks/serve_service_check.py --model tiny --decoding static --device cpu     # smoke test

Exit status 1 when a float32 row differs (bf16 kernels of the two layouts round differently).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import torch

_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "softprompt").is_dir() and str(_SRC) not in sys.path:  # the checkout's package wins
    sys.path.insert(0, str(_SRC))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_generation import build_model, check_jobs  # noqa: E402 (after the path set-up)


class TokenIds:
    """A stand-in tokenizer for models without one: the text of a token list is its ids, so equal text means equal
    tokens."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f"{int(i)} " for i in ids)


def offline(model, jobs, max_rows: int) -> list[list[int]]:
    """Every job decoded with the growing cache (the reference layout, whatever ``auto`` would pick), all submitted
    at once, in the calling thread."""
    from softprompt.multi.generation import GenerationEngine, SamplingParams

    engine = GenerationEngine(model, max_rows=max_rows, decoding="dynamic")
    ids = [engine.submit(p, a, SamplingParams(max_new_tokens=n, stop_token_ids=[])) for p, a, n in jobs]
    while engine.busy:
        engine.step()
    return [engine.result(i) for i in ids]


async def through_service(service, jobs, delays) -> list[str]:
    """Every job through the service, each submitted after its delay (seconds from the start)."""
    from softprompt.multi.generation import SamplingParams

    async def one(job, delay):
        await asyncio.sleep(delay)
        prompt, adapter, n = job
        return (await service.complete(prompt, adapter, SamplingParams(max_new_tokens=n, stop_token_ids=[]))).text

    return list(await asyncio.gather(*(one(j, d) for j, d in zip(jobs, delays))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, qwen0.5b-random or tiny")
    p.add_argument("--decoding", default="cuda_graphs", choices=["dynamic", "static", "cuda_graphs"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=16)
    p.add_argument("--max-rows", type=int, default=16)
    p.add_argument("--max-context", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from softprompt.serve.generation import GenerationService

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, vocab = build_model(args.model, args.adapters, args.prefix_len, device, getattr(torch, args.dtype))
    if getattr(model, "tokenizer", None) is None:
        model.tokenizer = TokenIds()
    rng = np.random.default_rng(args.seed)
    jobs = check_jobs(rng, vocab, args.requests, args.adapters)
    # Half arrive together, the rest spread over about a second, with pauses long enough to empty the batch.
    half = len(jobs) // 2
    delays = [0.0] * half + np.cumsum(rng.choice([0.0, 0.01, 0.05, 0.3], size=len(jobs) - half)).tolist()
    want = [model.tokenizer.decode(t, skip_special_tokens=True) for t in offline(model, jobs, args.max_rows)]
    service = GenerationService(model, max_rows=args.max_rows, decoding=args.decoding, max_context=args.max_context)
    service.start()
    try:
        got = asyncio.run(through_service(service, jobs, delays))
    finally:
        service.stop()
    same = sum(a == b for a, b in zip(want, got))
    print(json.dumps({"model": args.model, "device": device, "dtype": args.dtype, "decoding": args.decoding,
                      "requests": len(jobs), "identical_rows": same}), flush=True)
    return 0 if same == len(jobs) or args.dtype != "float32" else 1


if __name__ == "__main__":
    sys.exit(main())
