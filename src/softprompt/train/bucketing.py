"""Length bucketing and the ``--compile auto`` decision: what makes compiled training steps (CUDA graphs) pay off.

A compiled step is specialised to its input shape. Padding every batch to its own longest row gives dozens of
lengths, so graphs are re-recorded or dropped; padding to one of a few lengths (``length_buckets``) lets each graph be
reused for thousands of steps. A bucketed batch gives the loss of the unbucketed one: the extra columns are padding
tokens with attention mask 0 and label -100, added after the last column (see ``BucketCollator``).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Cost model of ``--compile auto``: compiling the training step takes about COMPILE_S seconds once (the length is
# traced symbolically, so one compilation serves every bucket: ``mark_length_dynamic``), each length bucket then
# costs about RECORD_S_PER_BUCKET to record its CUDA graphs, and a compiled step saves about SAVED_S_PER_STEP of host
# time against eager (small models and short sequences are host-bound: issue 18). Compiling pays off once the planned
# steps save more than it costs. Calibrated on an H100 (benchmarks/results/train_compiled.json, session 16: MiniLM,
# SST-2 and MRPC, prefix, APT and ID-SPAM, 3 buckets): compiling cost 7-23 s more one-off time than eager (median
# 15.8 s, recording included: 10 + 3 x 2 here; how it splits between compiling and recording was not measured) and a
# compiled step saved 7.2-12.6 ms (median 9.5). SmolLM2 (30 layers) cost far more (146 s) but saved 57 ms a step:
# its break-even, 2,552 steps, is of the same order as these constants' 1,685-1,895.
COMPILE_S = 10.0
RECORD_S_PER_BUCKET = 2.0
SAVED_S_PER_STEP = 0.0095
AUTO_MODE = "reduce-overhead"  # CUDA graphs: what removes the per-step host cost
CUDAGRAPHS = "cudagraphs"  # CUDA graphs of the captured step without Inductor (softprompt train --compile cudagraphs)


def length_buckets(lengths: Sequence[int], batch_size: int, count: int = 4, multiple: int = 8,
                   cap: int | None = None, seed: int = 0) -> tuple[int, ...]:
    """``count`` (or fewer) padded lengths for batches of ``batch_size`` rows drawn from examples of ``lengths``.

    The buckets are quantiles (1/count, 2/count, ...) of the longest row of a random batch, estimated from 256 seeded
    draws, rounded up to a ``multiple`` (tensor-core friendly); the largest is the longest example, so that every
    batch fits. ``cap`` (the model's position limit left after the method's own positions) bounds every bucket,
    never below the longest example."""
    if not lengths:
        raise ValueError("length_buckets needs the lengths of at least one example")
    longest = max(lengths)
    cap = max(longest, cap if cap is not None else longest + multiple)
    rng = random.Random(seed)
    k = min(batch_size, len(lengths))
    draws = sorted(max(rng.sample(list(lengths), k)) for _ in range(256))
    picks = [draws[math.ceil(q * len(draws) / count) - 1] for q in range(1, count)] + [longest]
    return tuple(sorted({min(cap, -(-x // multiple) * multiple) for x in picks}))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` (``length`` itself when none does)."""
    i = bisect.bisect_left(buckets, length)
    return buckets[i] if i < len(buckets) else length


@dataclass
class BucketCollator:
    """Wraps a collator: each batch is padded further, to the smallest bucket that holds it.

    Columns are added at the end, whatever side the collator pads: real tokens keep their positions (more left
    padding would shift a decoder's absolute positions, and prefix keys, which carry no position, would notice),
    under causal attention no real token sees a later column, and a decoder's last-token head skips pad ids. The
    exception is ``left=True``, for decoders that run on embeddings (an input prompt): their head reads the last
    column as it is. ``input_ids`` get the pad id, ``labels`` of token-level tasks -100, every other per-token
    tensor (attention mask, token types) 0."""

    collator: Any
    buckets: tuple[int, ...]
    left: bool = False

    def __call__(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(feats)
        ids = batch["input_ids"]
        length = ids.shape[-1]
        extra = bucket_for(length, self.buckets) - length
        if extra <= 0:
            return batch
        fills = {"input_ids": self.collator.tokenizer.pad_token_id or 0, "labels": -100}
        for key, t in batch.items():
            if t.dim() == ids.dim() and t.shape[-1] == length:
                batch[key] = torch.nn.functional.pad(t, (extra, 0) if self.left else (0, extra),
                                                     value=fills.get(key, 0))
        return batch


def mark_length_dynamic(batch: dict[str, Any]) -> dict[str, Any]:
    """Marks the length dimension of every per-token tensor of ``batch`` dynamic for torch.compile, so that one
    compilation serves every length bucket: traced with a symbolic length from the first batch on, instead of
    one compilation for the first length and a second, dynamic one at the next. It marks the tensors the model
    receives (after the move to the device, which makes new tensors) and changes nothing else."""
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return batch
    for t in batch.values():
        if isinstance(t, torch.Tensor) and t.dim() == ids.dim() and t.shape[-1] == ids.shape[-1]:
            torch._dynamo.maybe_mark_dynamic(t, t.dim() - 1)
    return batch


def length_is_dynamic(mode: str | None, buckets: int) -> bool:
    """Whether a step compiled in ``mode`` takes its length as dynamic (:func:`mark_length_dynamic`: one compilation
    for every bucket). Inductor's modes record CUDA graphs once per length of such a compilation; the plain
    cudagraphs backend keeps one recording per graph and replayed it at another length (a size mismatch on the
    H100), so there each bucket gets a static graph of its own (compiled in seconds)."""
    return mode is not None and mode != CUDAGRAPHS and buckets > 1


def planned_steps(examples: int, batch_size: int, epochs: float, max_steps: int, world_size: int = 1) -> int:
    """Optimizer steps the Trainer will take (``max_steps`` when given, else whole epochs of global batches)."""
    if max_steps > 0:
        return max_steps
    return math.ceil(epochs * math.ceil(examples / (batch_size * world_size)))  # the Trainer's own count


def steps_to_pay(buckets: int) -> int:
    """Planned steps from which compiling a run padded to ``buckets`` lengths pays off (the module's cost model)."""
    return math.ceil((COMPILE_S + buckets * RECORD_S_PER_BUCKET) / SAVED_S_PER_STEP)


def decide_compile(mode: str | None, steps: int, buckets: int, cuda: bool) -> tuple[str | None, str]:
    """(torch.compile mode or None for eager, the one-line reason). ``mode`` "auto" compiles on CUDA when the
    planned ``steps`` save more than compiling once and recording ``buckets`` shapes cost (module constants); other
    modes are kept."""
    if mode != "auto":
        return mode, f"compile {mode}" if mode else "eager"
    if not cuda:
        return None, "compile auto: eager (no CUDA device; compiled CPU steps do not pay off)"
    needed = steps_to_pay(buckets)
    if steps >= needed:
        return AUTO_MODE, (f"compile auto: {AUTO_MODE} ({steps} planned steps >= {needed}, the steps that pay for "
                           f"compiling {buckets} length bucket(s))")
    return None, (f"compile auto: eager ({steps} planned steps < {needed}, the steps that would pay for compiling "
                  f"{buckets} length bucket(s))")
