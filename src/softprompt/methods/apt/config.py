"""APT (adaptive prefix tuning): the options of its gates on top of prefix tuning's."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.injector import ModelInfo
from ..base import require
from ..prefix_tuning.config import PrefixConfig

GATE_POOLS = ("mean", "first", "last")

GATE_TARGETS = ("kv", "v")

GATE_INITS = ("normal", "zeros")

@dataclass
class APTConfig(PrefixConfig):
    """Adaptive prefix tuning: every :class:`PrefixConfig` option (prefix length, per-layer lengths, layers,
    projection, init, dropout, seed), plus the gate options below.

    gate_pool: how the hidden states h_{i-1} entering layer i are pooled into the d-vector the gate reads.
        "mean" (default): mean over the real tokens (padding excluded via the attention mask) -- unverified
        reconstruction (the spec's default); "first": the first real token ([CLS] for BERT-style encoders with
        right padding, the first non-pad token under left padding); "last": the last real token (the usual summary
        token of causal decoders). "first" is the only strictly causal choice for decoders: "mean" and "last" see
        the whole input, so in causal LM training the gate of early positions depends on later tokens.
    gate_target: "kv" (default, reconstruction: the same lambda*alpha scales prefix keys and values; on keys it acts
        as a per-token temperature of the prefix logits) or "v" (values only: scales each prefix token's
        contribution). The spec's third mode, an additive log-gate on the prefix logits, is not offered: it needs a
        materialised attention mask and would leave the fused attention path.
    lambda_init: initial value of every layer scalar lambda_i (default 1.0, unverified). With the default gate init
        alpha starts near 0.5, so lambda_init=2.0 makes lambda*alpha ~= 1 (plain prefix strength) at the start.
    gate_init: "normal" (default, our choice: W_i ~ N(0, gate_init_std), the UniPELT gate init of adapter-hub) or
        "zeros" (W_i = 0, so alpha = sigmoid(b_i) = 0.5 exactly at the start).
    gate_init_std: standard deviation of the "normal" gate init (0.02).
    gate_bias: give each W_i a bias b_i of P_i entries (default True; the reconstruction allows either). The bias is
        initialised to 0.
    Gate source (not an option): the residual stream entering layer i (the spec's "layer input", a reconstruction);
    the spec's alternative, the post-LayerNorm attention input of pre-LN models, is not offered.
    """

    method = "apt"
    default_lr = 1e-2
    gate_pool: str = "mean"
    gate_target: str = "kv"
    lambda_init: float = 1.0
    gate_init: str = "normal"
    gate_init_std: float = 0.02
    gate_bias: bool = True

    def validate(self, info: ModelInfo | None = None) -> None:
        super().validate(info)
        require(self.gate_pool in GATE_POOLS, f"gate_pool must be one of {GATE_POOLS}, got {self.gate_pool!r}")
        require(self.gate_target in GATE_TARGETS,
                f"gate_target must be one of {GATE_TARGETS}, got {self.gate_target!r}")
        require(self.gate_init in GATE_INITS, f"gate_init must be one of {GATE_INITS}, got {self.gate_init!r}")
        require(isinstance(self.lambda_init, (int, float)) and abs(float(self.lambda_init)) < float("inf"),
                f"lambda_init must be a finite number, got {self.lambda_init!r}")
        require(self.gate_init_std >= 0, f"gate_init_std must be >= 0, got {self.gate_init_std}")
        # The constant scale is prefix tuning's stand-in for a gate (the fixed-scale control); APT has the gate.
        require(float(self.scale) == 1.0, f"scale is prefix tuning's fixed-scale control; APT scales its prefix with "
                                          f"its gates: leave scale at 1.0 (got {self.scale!r}) or use method prefix")
