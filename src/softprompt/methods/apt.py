"""APT: adaptive prefix tuning (Zhang et al., "Towards Adaptive Prefix Tuning for Parameter-Efficient Language Model
Fine-tuning", ACL 2023, arXiv 2305.15212).

Deep prefixes as in P-tuning v2 (this module reuses :class:`PrefixTuning` by composition), plus two gates per layer i
that carries a prefix:

* a token-level gate ``alpha_i = sigmoid(W_i . pool(h_{i-1}) + b_i)`` in R^{P_i}: one weight per prefix token, per
  layer and per example, computed from the hidden states ``h_{i-1}`` entering layer i;
* a layer-level learnable scalar ``lambda_i``.

The engine receives ``lambda_i * alpha_i`` ([B, P_i]) as the layer's gate and scales the prefix keys and values
(``gate_target="kv"``) or the values only (``"v"``) before they are concatenated in front of the real keys/values
("scale" gating, injection spec section 6). Nothing else changes in attention, so every fused kernel stays usable:
the only extra work per layer is one pooled [B, d] x [d, P] product.

Only the abstract of the paper could be read: the equations are a reconstruction (``shared/specs/apt.md``); each
option below says whether it is the paper's, a reconstruction, or our choice.

Gates are computed inside each transformer block by a layer hook, so activation checkpointing recomputes them with
the block. In ``generate()`` the gate is computed once, at prefill (when the hidden states cover the whole prompt),
and cached on the per-call injection state; decoding steps (one new token, no pooled prompt) reuse it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.injector import ModelInfo
from ..engine.state import InjectionState
from .base import Contribution, MethodInputs, PromptMethod, require
from .prefix_tuning import PrefixConfig, PrefixTuning

GATE_POOLS = ("mean", "first", "last")
GATE_TARGETS = ("kv", "v")
GATE_INITS = ("normal", "zeros")

# Attribute of the per-forward InjectionState that caches this forward's gates (reused by generate's decode steps).
_CACHE_ATTR = "_apt_gates"


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


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """Pool hidden states [B, N, d] with the padding mask [B, N] (1 = real token) into [B, d].

    "mean" averages the real tokens; "first"/"last" take the first/last real token (this works for left and right
    padding alike). Rows without any real token pool to position 0 / the mean of nothing (zeros).
    """
    if mask is None:
        mask = hidden.new_ones(hidden.shape[:2])
    mask = mask.to(hidden.dtype)
    if how == "mean":
        return torch.einsum("bn,bnd->bd", mask, hidden) / mask.sum(1, keepdim=True).clamp(min=1)
    n = hidden.shape[1]
    real = mask > 0
    if how == "first":
        idx = real.to(torch.int64).argmax(1)
    elif how == "last":
        idx = (n - 1) - real.flip(1).to(torch.int64).argmax(1)
    else:  # pragma: no cover - validated by the config
        raise ValueError(how)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def mean_pool_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, N] weights that average the real tokens (1 / count on them, 0 on padding; all zero for an empty row),
    so that ``bmm(weights, hidden)`` is the masked mean of ``pool_hidden(..., "mean")``."""
    m = mask.to(torch.promote_types(dtype, torch.float32))
    return (m / m.sum(1, keepdim=True).clamp(min=1)).to(dtype)[:, None, :]


class APT(PromptMethod):
    """Prefix tables (``self.prefix``, a :class:`PrefixTuning`) plus per-layer gates.

    Parameters per prefixed layer i: ``gate_proj[i]`` = Linear(d, P_i) (W_i, b_i) and ``gate_lambda[i]`` (scalar).
    Set ``record = True`` (or use :meth:`recording`) to keep the last computed gates in :attr:`last_gates`.
    """

    config: APTConfig

    def __init__(self, config: APTConfig, info: ModelInfo):
        super().__init__(config, info)
        self.prefix = PrefixTuning(config, info)
        self.lengths: list[int] = list(self.prefix.lengths)
        gen = torch.Generator().manual_seed(config.seed + 1)  # independent of the prefix tables' draw
        d = info.hidden_size
        self.gate_proj = nn.ModuleDict()
        self.gate_lambda = nn.ParameterDict()
        for i, p in enumerate(self.lengths):
            if p <= 0:
                continue
            lin = nn.Linear(d, p, bias=config.gate_bias)
            with torch.no_grad():
                if config.gate_init == "normal":
                    lin.weight.copy_(torch.randn(p, d, generator=gen) * config.gate_init_std)
                else:
                    lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
            self.gate_proj[str(i)] = lin
            self.gate_lambda[str(i)] = nn.Parameter(torch.tensor(float(config.lambda_init)))
        self.record = False
        # layer -> {"alpha": [B, P_i] detached float32, "lambda": float}; filled while ``record`` is on.
        self.last_gates: dict[int, dict] = {}

    # ---- prefix delegation (so APT adapters look like prefix adapters where that helps) -------------------------
    @property
    def tables(self) -> nn.ParameterDict:
        return self.prefix.tables

    def layer_tables(self) -> dict[int, torch.Tensor]:
        return self.prefix.layer_tables()

    def fold(self) -> None:
        self.prefix.fold()

    def init_from_model(self, embed: nn.Module, tokenizer=None, capture=None) -> None:
        self.prefix.init_from_model(embed, tokenizer, capture=capture)

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, inputs: MethodInputs) -> Contribution:
        contrib = self.prefix(inputs)
        contrib.layer_hook = self._gate_hook
        return contrib

    def compute_gate(
        self, index: int, hidden: torch.Tensor, mask: torch.Tensor | None, pool_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha [B, P_i], lambda_i) of layer ``index`` from the hidden states entering it.

        ``pool_weights`` ([B, 1, N], from :func:`mean_pool_weights`) lets the layers of one forward share the mean
        pooling's normalisation: the pooling is then a single batched matmul in the hidden states' dtype (fp32
        accumulation), with no full-size copy of the hidden states (this runs once per layer on the hot path).
        """
        lin = self.gate_proj[str(index)]
        dt = lin.weight.dtype
        if pool_weights is not None:
            pooled = torch.bmm(pool_weights, hidden).squeeze(1).to(dt)
        else:
            if mask is not None and mask.shape[0] != hidden.shape[0]:
                # generate() with beams/num_return_sequences repeats each example; the mask was built before that.
                mask = mask.repeat_interleave(hidden.shape[0] // mask.shape[0], dim=0)
            pooled = pool_hidden(hidden.to(dt), mask, self.config.gate_pool)
        alpha = torch.sigmoid(lin(pooled))
        return alpha, self.gate_lambda[str(index)]

    def _gate_hook(self, index: int, hidden: torch.Tensor, state: InjectionState) -> None:
        key = str(index)
        if key not in self.gate_proj:
            return
        cache: dict = getattr(state, _CACHE_ATTR, None)
        if cache is None:
            cache = {}
            setattr(state, _CACHE_ATTR, cache)
        mask = state.attention_mask
        full = mask is None or hidden.shape[1] == mask.shape[1]
        # Reuse: decoding steps of generate() (no_grad, or a hidden length that is not the prompt's). Recompute
        # otherwise, in particular when checkpointing re-runs the block during backward (grad enabled, full length):
        # the recomputation must rebuild the gate's graph.
        if index in cache and (not torch.is_grad_enabled() or not full):
            gate = cache[index]
        else:
            if not full:
                # No prefill seen (e.g. the caller supplied its own cache): pool the tokens present.
                mask = mask[:, -hidden.shape[1]:] if hidden.shape[1] <= mask.shape[1] else None
            weights = None
            if self.config.gate_pool == "mean" and full and mask is not None and mask.shape[0] == hidden.shape[0]:
                key = ("pool", hidden.dtype)
                if key not in cache:  # once per forward, shared by every layer
                    cache[key] = mean_pool_weights(mask, hidden.dtype)
                weights = cache[key]
            alpha, lam = self.compute_gate(index, hidden, mask, pool_weights=weights)
            gate = lam * alpha
            cache[index] = gate
            if self.record:
                self.last_gates[index] = {"alpha": alpha.detach().float().cpu(), "lambda": float(lam.detach())}
        inj = state.layer(index)
        inj.gate = gate
        inj.gate_values_only = self.config.gate_target == "v"

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[int, dict]]:
        """``with method.recording() as gates: model(**batch)`` -> gates[layer] = {"alpha": [B, P], "lambda": x}."""
        previous = self.record
        self.record = True
        self.last_gates = {}
        try:
            yield self.last_gates
        finally:
            self.record = previous

    # ---- saving: the prefix part exactly as prefix tuning saves it, plus the gate tensors -----------------------
    def _gate_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(("gate_proj.", "gate_lambda."))}

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        out = dict(self.prefix.export_state_dict())
        out.update({k: v.detach() for k, v in self._gate_state().items()})
        return out

    def import_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        gates = {k: v for k, v in tensors.items() if k.startswith(("gate_proj.", "gate_lambda."))}
        expected = set(self._gate_state())
        missing, extra = sorted(expected - set(gates)), sorted(set(gates) - expected)
        if missing or extra:
            raise KeyError(f"APT gate tensors do not match this config: missing {missing[:5]}, unexpected {extra[:5]}")
        self.prefix.import_state_dict({k: v for k, v in tensors.items() if k not in gates})
        with torch.no_grad():
            own = dict(self.named_parameters())
            for k, v in gates.items():
                own[k].copy_(v)

    def num_gate_parameters(self) -> int:
        """L'*(d*P + P*[bias] + 1) for L' prefixed layers of length P (spec section 1)."""
        return sum(v.numel() for v in self._gate_state().values())


def _register() -> None:
    from . import register_method

    register_method("apt", APTConfig, APT)


_register()

__all__ = ["APT", "GATE_INITS", "GATE_POOLS", "GATE_TARGETS", "APTConfig", "pool_hidden"]
