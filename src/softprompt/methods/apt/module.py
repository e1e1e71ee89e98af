"""APT: adaptive prefix tuning (Zhang et al., "Towards Adaptive Prefix Tuning for Parameter-Efficient Language Model
Fine-tuning", ACL 2023, arXiv 2305.15212).

Deep prefixes as in P-tuning v2 (this module reuses :class:`PrefixTuning` by composition), plus two gates per layer i
that carries a prefix:

* a token-level gate ``alpha_i = sigmoid(W_i . pool(h_{i-1}) + b_i)`` in R^{P_i}: one weight per prefix token, per
  layer and per example, computed from the hidden states ``h_{i-1}`` entering layer i;
* a layer-level learnable scalar ``lambda_i``.

The prefix keys and values (``gate_target="kv"``) or the values only (``"v"``) are scaled by ``lambda_i * alpha_i``
before they are concatenated in front of the real keys/values ("scale" gating, injection spec section 6). Nothing
else changes in attention, so every fused kernel stays usable: the only extra work per layer is one pooled [B, d] x
[d, P] product and the gate's multiply. That multiply is split where it costs least on the host (issue 18): lambda_i
scales the layer's table in the forward's one multiply of all layers' stacked tables (``key_value_pairs``), and the
engine receives ``alpha_i`` ([B, P_i]) as the layer's gate, so a layer call makes no ``lambda * alpha`` product (one
op, and three in its backward). The prefix attention sees is ``(lambda_i k) alpha_i`` instead of ``k (lambda_i
alpha_i)``: equal up to float rounding (a relative 2^-24 or so in float32).

Only the abstract of the paper could be read: the equations are a reconstruction (``shared/specs/apt.md``); each
option below says whether it is the paper's, a reconstruction, or our choice.

Gates are computed inside each transformer block by a layer hook, so activation checkpointing recomputes them with
the block. In ``generate()`` the gate is computed once, at prefill (when the hidden states cover the whole prompt),
and cached on the per-call injection state; decoding steps (one new token, no pooled prompt) reuse it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ...engine.injector import ModelInfo
from ...engine.state import InjectionState
from ...pooling import mean_weights, pool
from ..base import Contribution, HookShape, MethodInputs, PromptMethod
from ..prefix_tuning.module import PrefixTuning, key_value_pairs
from .config import APTConfig

# Attribute of the per-forward InjectionState that caches this forward's gates (reused by generate's decode steps).
_CACHE_ATTR = "_apt_gates"




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
    def position_shift(self) -> int:
        return self.prefix.position_shift()

    def hook_shape(self) -> HookShape:
        return HookShape(gate="v" if self.config.gate_target == "v" else "kv")

    def forward(self, inputs: MethodInputs) -> Contribution:
        tables = self.prefix.forward_tables()
        return Contribution(prefixes=key_value_pairs(tables, self._lambda_scale(tables)), layer_hook=self._gate_hook)

    def _lambda_scale(self, tables: dict[int, torch.Tensor]) -> torch.Tensor:
        """[L, 1, 1, 1, 1] (every lambda_i, in ``tables``' order), or [L, 2, 1, 1, 1] with 1 for the keys when only
        values are gated: the per-layer factor of ``key_value_pairs``, a few ops per forward whatever the depth."""
        lams = torch.stack([self.gate_lambda[str(i)] for i in tables])
        if self.config.gate_target == "v":
            lams = torch.stack([torch.ones_like(lams), lams], dim=1)  # keys x 1: exact
        return lams.view(len(tables), -1, 1, 1, 1)

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
            pooled = pool(hidden.to(dt), mask, self.config.gate_pool)
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
                    cache[key] = mean_weights(mask, hidden.dtype)
                weights = cache[key]
            alpha, lam = self.compute_gate(index, hidden, mask, pool_weights=weights)
            gate = alpha  # lambda_i already scales this layer's prefix (forward): the gate is alpha alone
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
