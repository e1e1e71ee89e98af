"""Per-forward injection state.

The state is built fresh for every forward pass (by the wrapper model from the method's outputs) and travels to the
attention function as a keyword argument of the backbone's forward (``softprompt_state=...``). Transformers passes
unknown keyword arguments down to every decoder/encoder layer and into the attention function, and gradient
checkpointing captures them with the layer call, so a recomputed layer sees exactly the same prefixes. Nothing is ever
written into a ``Cache``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

STATE_KWARG = "softprompt_state"


@dataclass
class LayerInjection:
    """What one self-attention layer receives.

    key/value: prefix of shape [B or 1, H_kv, P, D] (post-RoPE convention: prefix keys carry no position).
    gate: optional multiplicative gate broadcastable to [B, H_kv or 1, P]; applied to keys and values
        (``gate_values_only=False``) or to values only, before they enter attention ("scale" gating).
    inserted: number of prompt tokens inserted into the hidden states before this layer (encoder insertion);
        the attention mask built for the original N tokens is grown to N + inserted.
    insert_at: sequence position of the inserted tokens.
    prefix_mask: optional [B or 1, P] bool, True = the row sees that prefix column. Lets rows of one batch carry
        prefixes of different lengths (shorter ones padded, padding hidden), e.g. several adapters in one batch.
        None = every column visible to every row (the fused attention paths stay usable).
    key_value: optional [2, B or 1, H_kv, P, D], the key and the value as one tensor (``key, value =
        key_value.unbind(0)`` in numbers), set by ``compose`` where the layout allows it: a gate on both is then
        one multiply (one kernel, and in the backward one product and one reduction for the gate instead of two each
        plus a sum). Whoever replaces ``key`` or ``value`` afterwards clears it.
    """

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    gate_values_only: bool = False
    inserted: int = 0
    insert_at: int = 0
    prefix_mask: torch.Tensor | None = None
    key_value: torch.Tensor | None = field(default=None, repr=False)
    # The prefix as attention uses it (cast, gated, expanded), kept for no-grad calls (see attention.py).
    cache: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def prefix_length(self) -> int:
        return 0 if self.key is None else int(self.key.shape[-2])


@dataclass
class Insertion:
    """Prompt vectors inserted into the hidden states before layer ``layer`` at position ``at`` (encoders)."""

    layer: int
    vectors: torch.Tensor  # [B or 1, t, hidden]
    at: int = 0
    consumed: bool = False  # set once a causal decoder has turned it into prefixes (reused by generate steps)
    # Rotary encoders: [(cos, sin, grown (cos, sin))], so that the layers after the insertion that share one cos/sin
    # (ModernBERT: one pair per attention type) grow it once per forward.
    rotary: list = field(default_factory=list, repr=False)


# A layer hook sees (layer index, hidden states entering that layer, the state) and may edit state.layers[index],
# e.g. to set an input-dependent gate. It runs inside the layer call, so checkpointing recomputes it.
LayerHook = Callable[[int, torch.Tensor, "InjectionState"], None]


@dataclass
class InjectionState:
    """Everything injected into one forward pass, keyed by the engine's own layer index (0..L-1)."""

    layers: dict[int, LayerInjection] = field(default_factory=dict)
    insertion: Insertion | None = None
    layer_hook: LayerHook | None = None
    attention_mask: torch.Tensor | None = None  # 2D [B, N] padding mask of the real tokens (1 = token)
    # Filled by the engine when capturing keys/values (probe forward, insertion-to-prefix conversion).
    capture: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    calls: dict[int, int] | None = None
    # True when a layer may run twice in one forward pass: activation checkpointing replays it during backward, and
    # transformers versions differ in whether module hooks sit inside the checkpointed call (5.17) or outside (5.24).
    # One-shot steps inside a layer call (turning an insertion into prefixes, generating a prompt at layer m) must
    # then run again on the replay, identically, instead of reusing their first result: the replay has to save the
    # same tensors as the first run.
    replays: bool = False
    # Tensors that every layer of this forward would otherwise rebuild identically (the dummy query rows of the fused
    # causal path, a padding mask grown by the prefix columns): built by the first layer that needs them, one slot
    # per kind, replaced when what they derive from changes (attention.py: _reuse).
    scratch: dict = field(default_factory=dict, repr=False, compare=False)

    def needs_insertion(self) -> bool:
        """Whether a hook that generates the inserted prompt must (re)generate it now: not yet made in this forward,
        or a checkpointing replay (see ``replays``). Later ``generate()`` steps reuse the first one."""
        return self.insertion is None or self.replays

    def layer(self, index: int) -> LayerInjection:
        """Return (creating if needed) the injection of one layer."""
        if index not in self.layers:
            self.layers[index] = LayerInjection()
        return self.layers[index]
