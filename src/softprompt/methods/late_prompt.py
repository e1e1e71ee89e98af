"""Late prompt tuning (Liu et al., arXiv 2210.11292): a prompt inserted before a middle layer m.

``generator="static"``: t learned vectors (the same for every input). ``generator="npg"``: LPT's neural prompt
generator, an instance-dependent prompt from the hidden states entering layer m (pooled: position 0 for encoders,
masked mean for decoders, where position 0 is not a summary token), Linear(d, r) -> ReLU -> Linear(r, t*d).
For encoders the prompt goes after the first token (so [CLS]-reading heads are untouched); for causal decoders it is
turned into the equivalent key/value prefix of layers m..L-1 (see ``Injector.insertion_to_prefix``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine.injector import ModelInfo
from ..engine.state import Insertion
from .base import Contribution, MethodConfig, MethodInputs, PromptMethod, require

GENERATORS = ("static", "npg")


@dataclass
class LatePromptConfig(MethodConfig):
    """num_virtual_tokens t; layer m (default: the middle layer, L // 2); generator; bottleneck r for npg."""

    method = "lpt"
    num_virtual_tokens: int = 10
    layer: int | None = None
    generator: str = "static"
    bottleneck: int = 128
    dropout: float = 0.0
    init_std: float = 0.02
    seed: int = 0

    def validate(self, info: ModelInfo | None = None) -> None:
        require(self.num_virtual_tokens >= 1, f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        require(self.generator in GENERATORS, f"generator must be one of {GENERATORS}, got {self.generator!r}")
        require(self.bottleneck >= 1, f"bottleneck must be >= 1, got {self.bottleneck}")
        if info is not None and self.layer is not None:
            require(0 <= self.layer < info.num_layers,
                    f"layer must be in 0..{info.num_layers - 1} for this model, got {self.layer}")

    def insert_layer(self, num_layers: int) -> int:
        return num_layers // 2 if self.layer is None else self.layer


class LatePrompt(PromptMethod):
    def __init__(self, config: LatePromptConfig, info: ModelInfo):
        super().__init__(config, info)
        t, d = config.num_virtual_tokens, info.hidden_size
        gen = torch.Generator().manual_seed(config.seed)
        self.layer = config.insert_layer(info.num_layers)
        if config.generator == "static":
            self.prompt = nn.Parameter(torch.randn(t, d, generator=gen) * config.init_std)
        else:
            self.down = nn.Linear(d, config.bottleneck)
            self.up = nn.Linear(config.bottleneck, t * d)
        self.drop = nn.Dropout(config.dropout)

    def insertion_length(self) -> int:
        return self.config.num_virtual_tokens

    def forward(self, inputs: MethodInputs) -> Contribution:
        if self.config.generator == "static":
            return Contribution(insertion=Insertion(self.layer, self.drop(self.prompt)[None], at=self._at()))
        return Contribution(layer_hook=self._npg_hook)

    def _at(self) -> int:
        return 0 if self.info.is_causal else 1

    def _npg_hook(self, index: int, hidden: torch.Tensor, state) -> None:
        """At layer m, generate the prompt from the hidden states entering it and insert it there."""
        if index != self.layer or not state.needs_insertion():
            return
        if self.info.is_causal:
            mask = state.attention_mask[:, -hidden.shape[1]:].to(hidden.dtype)[..., None]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:
            pooled = hidden[:, 0]
        t, d = self.config.num_virtual_tokens, self.info.hidden_size
        prompt = self.drop(self.up(torch.relu(self.down(pooled.to(self.down.weight.dtype)))).view(-1, t, d))
        state.insertion = Insertion(self.layer, prompt, at=self._at())
