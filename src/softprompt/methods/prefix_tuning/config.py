"""Prefix tuning's options: per-layer lengths, layers, projection, initialisation."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.injector import ModelInfo
from ..base import MethodConfig, require

PREFIX_INITS = ("vocab", "random", "text")

@dataclass
class PrefixConfig(MethodConfig):
    """Deep prefixes.

    num_virtual_tokens: prefix length P at every layer (unless ``layer_lengths`` is given).
    layer_lengths: one length per layer (0 = no prefix there); overrides num_virtual_tokens.
    layers: restrict prefixes to these layer indices (others get 0).
    projection: reparameterise through Embedding(P, d) -> Linear(d, h) -> Tanh -> Linear(h, L*2*H_kv*D).
    init: "vocab" (keys/values that the frozen model itself produces for randomly sampled vocabulary tokens: prefixes
        start on the scale of real keys), "random" (normal with std ``init_std``, PEFT's choice with std 1),
        or "text" (keys/values of ``init_text``). Ignored with projection (the MLP is initialised randomly).
    shift_positions: number the real tokens from P instead of 0, as PEFT's cache-based prefix tuning does (the
        prefix takes positions 0..P-1). Off by default: prefix keys carry no position, and a shift can push
        absolute-position models past their table (GPT-2's 1024). Applies to ``forward``; ``generate`` refuses it.
    scale: a constant that multiplies the prefix keys and values in every forward (default 1.0: unchanged). With
        0.5 this is APT's fixed-scale control: the prefix at the strength APT's gate gives it at the start
        (lambda * alpha = 1 * sigmoid(~0) = 0.5), with no gate, so damping and gating can be told apart.
        The saved tables are the unscaled parameters.
    seed: the initialisation (random tables, vocabulary sampling, the projection MLP).
    """

    method = "prefix"
    default_lr = 1e-2
    num_virtual_tokens: int = 20
    layer_lengths: list[int] | None = None
    layers: list[int] | None = None
    projection: bool = False
    projection_hidden_size: int = 512
    init: str = "vocab"
    init_text: str | None = None
    init_std: float = 1.0
    dropout: float = 0.0
    shift_positions: bool = False
    scale: float = 1.0
    seed: int = 0

    def validate(self, info: ModelInfo | None = None) -> None:
        require(self.num_virtual_tokens >= 0, f"num_virtual_tokens must be >= 0, got {self.num_virtual_tokens}")
        require(self.layer_lengths is not None or self.num_virtual_tokens >= 1,
                "num_virtual_tokens=0 leaves no prefix to train; give at least 1 (or per-layer layer_lengths)")
        require(self.init in PREFIX_INITS, f"init must be one of {PREFIX_INITS}, got {self.init!r}")
        require(self.init != "text" or bool(self.init_text), "init='text' needs init_text='...'")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        require(0.0 < float(self.scale) < float("inf"), f"scale must be a positive number, got {self.scale!r}")
        if self.layer_lengths is not None:
            require(all(int(n) >= 0 for n in self.layer_lengths), f"layer_lengths must be >= 0: {self.layer_lengths}")
            require(sum(self.layer_lengths) > 0, "layer_lengths are all 0: nothing to train")
        if info is not None:
            if self.layer_lengths is not None:
                require(
                    len(self.layer_lengths) == info.num_layers,
                    f"layer_lengths has {len(self.layer_lengths)} entries but the model has {info.num_layers} layers",
                )
            if self.layers is not None:
                bad = [i for i in self.layers if not 0 <= i < info.num_layers]
                require(not bad, f"layers {bad} out of range 0..{info.num_layers - 1}")

    def lengths(self, num_layers: int) -> list[int]:
        """The prefix length of every layer."""
        if self.layer_lengths is not None:
            return [int(n) for n in self.layer_lengths]
        chosen = set(range(num_layers)) if self.layers is None else set(self.layers)
        return [self.num_virtual_tokens if i in chosen else 0 for i in range(num_layers)]
