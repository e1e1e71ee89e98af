"""Per-step overhead of greedy generate() with a prefix, ours vs PEFT, on a small random Qwen2 (CPU by default).

Decoding at small batch is bound by per-step host work (Python, kernel launches), which this isolates: a 24-layer
model with hidden size 32 in bf16, batch 8, 32 prompt tokens, 48 new tokens, best of 3 calls after a warm-up.

    python benchmarks/generate_overhead.py [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import time

import peft
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import softprompt as sp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=48)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=2)
    base = Qwen2ForCausalLM(cfg).to(device=args.device, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 128, (8, 32), device=args.device)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    ours = sp.wrap(copy.deepcopy(base), sp.PrefixConfig(num_virtual_tokens=20, init="random")).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=20)).eval()
    cases = {"bare": lambda: base.generate(ids, **kw), "softprompt prefix": lambda: ours.generate(ids, **kw),
             "PEFT prefix": lambda: theirs.generate(input_ids=ids, **kw)}
    for name, fn in cases.items():
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        print(f"{name:18s} {8 * args.new_tokens / min(times):8.0f} new tokens/s")


if __name__ == "__main__":
    main()
