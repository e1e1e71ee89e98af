"""Inductor settings that every ``torch.compile`` training path of softprompt applies first.

Inductor's *mix-order reduction* (a fused kernel that computes a norm's or a bias's backward reductions in two orders
at once; on by default since torch 2.10, Triton only) is wrong on shapes we train:

* pytorch/pytorch#178080: the compiled backward returns a flattened gradient for a norm weight. Our Drag-and-Drop
  generator hit it on an H100 (torch 2.11, 2026-12-05): "CompiledFunctionBackward returned an invalid gradient at
  index 40 - got [5060] but expected shape compatible with [22, 230]", the (22, 230) LayerNorm of its last layer.
* pytorch/pytorch#193061 and #190796: silently wrong gradients (chained LayerNorms sharing a parameter; a conv bias
  under bf16 autocast), reported on 2.10 through 2.13.

A wrong gradient that raises nothing is the worst outcome for a training library, so compiled training here turns the
fusion off. It only changes which reduction kernels Inductor emits, not what they compute.
"""

from __future__ import annotations


def disable_mix_order_reduction() -> bool:
    """Turn Inductor's mix-order reduction off for this process (it is read when a graph compiles, so call this before
    the first compiled step). Returns True if this torch has the setting (2.10 and later), False otherwise."""
    try:
        from torch._inductor import config
    except ImportError:  # a torch built without Inductor: nothing compiles through it
        return False
    triton = getattr(config, "triton", None)
    if triton is None or not hasattr(triton, "mix_order_reduction"):
        return False
    triton.mix_order_reduction = False
    return True


__all__ = ["disable_mix_order_reduction"]
