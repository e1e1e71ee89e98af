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

CUDAGRAPHS = "cudagraphs"  # CUDA graphs of the captured step without Inductor (softprompt train --compile cudagraphs)


@dataclass(frozen=True)
class CompileCost:
    """What compiling the training step in one mode costs and saves against eager, in seconds: ``once_s`` for the
    compilation that serves every bucket, ``per_bucket_s`` for each length bucket (its CUDA graph recording; for
    ``cudagraphs`` also its own static capture), ``saved_s_per_step`` of host time per compiled step."""

    once_s: float
    per_bucket_s: float
    saved_s_per_step: float

    def one_off_s(self, buckets: int) -> float:
        return self.once_s + buckets * self.per_bucket_s

    def steps_to_pay(self, buckets: int) -> int:
        return math.ceil(self.one_off_s(buckets) / self.saved_s_per_step)

    def net_s(self, steps: int, buckets: int) -> float:
        return steps * self.saved_s_per_step - self.one_off_s(buckets)


# Cost model of ``--compile auto``: small models and short sequences are host-bound (issue 18), and a CUDA graph removes
# a step's host time; compiling pays once the planned steps save more than it costs, and auto takes the mode that saves
# the most. Calibrated on one H100, cold compile caches (benchmarks/results/train_compiled.json, session 18: MiniLM,
# SST-2 and MRPC, prefix, APT and ID-SPAM, 3 buckets each, medians over the runs): cudagraphs cost 6.6 s more one-off
# time than eager (1.1-8.6 s over five pairs; the sixth, -1.5 s, paired it with the machine's first eager run, which
# spent 12 s warming up; each bucket is its own capture, so 2.2 s a bucket) and saved 7.5 ms a step (6.8-9.7);
# Inductor's reduce-overhead cost 16 s cold (7.3-17.5; 10 + 2 per bucket as calibrated in session 16; 0.6 s with
# Inductor's caches warm from an earlier run) and saved 8.2 ms (7.4-10.5). So cudagraphs pays from ~900 steps and
# reduce-overhead's faster steps overtake it from ~13,000. SmolLM2 (30 layers) scales both: cudagraphs cost 47 s and
# saved 47 ms (break-even 991 steps), reduce-overhead 99 s and 63 ms (1,576; it overtakes from ~3,300 there).
COSTS = {CUDAGRAPHS: CompileCost(0.0, 2.2, 0.0075), "reduce-overhead": CompileCost(10.0, 2.0, 0.0082)}


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
    """Planned steps from which compiling a run padded to ``buckets`` lengths pays off in some mode (``COSTS``)."""
    return min(cost.steps_to_pay(buckets) for cost in COSTS.values())


def decide_compile(mode: str | None, steps: int, buckets: int, cuda: bool) -> tuple[str | None, str]:
    """(torch.compile mode or None for eager, the one-line reason). ``mode`` "auto" compiles on CUDA when the
    planned ``steps`` save more than compiling and recording ``buckets`` shapes cost, in the mode of ``COSTS`` that
    saves the most at that many steps; other modes are kept."""
    if mode != "auto":
        return mode, f"compile {mode}" if mode else "eager"
    if not cuda:
        return None, "compile auto: eager (no CUDA device; compiled CPU steps do not pay off)"
    needed = steps_to_pay(buckets)
    if steps >= needed:  # some mode pays: take the one that saves the most seconds at these steps
        best = max(COSTS, key=lambda m: COSTS[m].net_s(steps, buckets))
        return best, (f"compile auto: {best} ({steps} planned steps >= {needed}, the steps that pay for compiling "
                      f"{buckets} length bucket(s); {best} saves the most at {steps} steps)")
    return None, (f"compile auto: eager ({steps} planned steps < {needed}, the steps that would pay for compiling "
                  f"{buckets} length bucket(s))")
