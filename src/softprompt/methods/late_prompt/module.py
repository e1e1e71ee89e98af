"""Late prompt tuning (Liu et al., arXiv 2210.11292): a prompt inserted before a middle layer m.

``generator="static"``: t learned vectors (the same for every input). ``generator="npg"``: LPT's neural prompt
generator, an instance-dependent prompt from the hidden states entering layer m (pooled: position 0 for encoders,
masked mean for decoders, where position 0 is not a summary token), Linear(d, r) -> ReLU -> Linear(r, t*d).
For encoders the prompt goes after the first token (so [CLS]-reading heads are untouched); for causal decoders it is
turned into the equivalent key/value prefix of layers m..L-1 (see ``Injector.insertion_to_prefix``).
"""

from __future__ import annotations

import torch
from torch import nn

from ...engine.injector import ModelInfo
from ...engine.state import Insertion
from ...pooling import masked_mean
from ..base import (
    Contribution,
    HookShape,
    MethodInputs,
    PromptMethod,
)
from .config import LatePromptConfig


class LatePrompt(PromptMethod):
    def __init__(self, config: LatePromptConfig, info: ModelInfo):
        super().__init__(config, info)
        t, d = config.num_virtual_tokens, info.hidden_size
        gen = torch.Generator().manual_seed(config.seed)
        self.layer = config.insert_layer(info.num_layers)
        if config.generator == "static":
            self.prompt = nn.Parameter(torch.randn(t, d, generator=gen) * config.init_std)
        else:
            # Seeded by config.seed (not the global RNG), so that the run's seed varies the generator's init too.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                self.down = nn.Linear(d, config.bottleneck)
                self.up = nn.Linear(config.bottleneck, t * d)
        self.drop = nn.Dropout(config.dropout)

    def insertion_length(self) -> int:
        return self.config.num_virtual_tokens

    def forward(self, inputs: MethodInputs) -> Contribution:
        if self.config.generator == "static":
            return Contribution(insertion=Insertion(self.layer, self.drop(self.prompt)[None], at=self._at()))
        return Contribution(layer_hook=self._npg_hook)

    def hook_shape(self) -> HookShape | None:
        if self.config.generator == "static":
            return None  # a plain insertion, no hook
        return HookShape(insertion=(self.layer, self.config.num_virtual_tokens, self._at()))

    def _at(self) -> int:
        return 0 if self.info.is_causal else 1

    def _npg_hook(self, index: int, hidden: torch.Tensor, state) -> None:
        """At layer m, generate the prompt from the hidden states entering it and insert it there."""
        if index != self.layer or not state.needs_insertion():
            return
        if self.info.is_causal:
            pooled = masked_mean(hidden, state.attention_mask[:, -hidden.shape[1]:])
        else:
            pooled = hidden[:, 0]
        t, d = self.config.num_virtual_tokens, self.info.hidden_size
        prompt = self.drop(self.up(torch.relu(self.down(pooled.to(self.down.weight.dtype)))).view(-1, t, d))
        state.insertion = Insertion(self.layer, prompt, at=self._at())
