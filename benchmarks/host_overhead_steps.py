"""Model builders, variants and the timing loop of ``host_overhead.py`` (issue 18): the tiny Qwen2 decoder and RoBERTa
encoder, each variant's model (bare, ours, the baseline's ``before:`` package, PEFT's) with its train and forward
steps, the list of variants to time, and ``measure``, which runs them interleaved round by round and returns the
step times. ``host_overhead.py`` (the command line) and ``apt_host_ops.py`` (through ``host_overhead``) use them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import time
from collections.abc import Callable

import torch
from torch import nn

PEFT = ("prompt", "ptuning", "prefix")  # the methods PEFT has

BASELINE = "softprompt_baseline"


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
