"""Prompt tuning (Lester et al., arXiv 2104.08691): t learned vectors in front of the token embeddings."""

from __future__ import annotations

import torch
from torch import nn

from ...engine.injector import ModelInfo
from ..base import Contribution, MethodInputs, PromptMethod
from .config import PromptTuningConfig


def init_prompt_table(table: torch.Tensor, config, embed: nn.Module, tokenizer=None) -> None:
    """Fill ``table`` [t, d] according to ``config.init`` (shared by prompt tuning and P-tuning)."""
    t = table.shape[0]
    weight = embed.weight.detach()
    gen = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        if config.init == "random":
            table.copy_(torch.empty(table.shape).uniform_(-config.init_range, config.init_range, generator=gen))
        elif config.init == "vocab":
            # Skip the first ids (special tokens in most vocabularies) when the vocabulary is big enough.
            low = 1000 if weight.shape[0] > 5000 else 0
            ids = torch.randint(low, weight.shape[0], (t,), generator=gen)
            table.copy_(weight[ids].float())
        else:
            if tokenizer is None:
                raise ValueError("init='text' needs a tokenizer: pass tokenizer=... to softprompt.wrap")
            ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"init_text {config.init_text!r} tokenises to nothing")
            ids = (ids * (t // len(ids) + 1))[:t]
            table.copy_(weight[torch.tensor(ids, device=weight.device)].float().cpu())


class PromptTuning(PromptMethod):
    """Holds the prompt table [t, hidden]."""

    reads_inputs = False

    def __init__(self, config: PromptTuningConfig, info: ModelInfo):
        super().__init__(config, info)
        self.prompt = nn.Parameter(torch.zeros(config.num_virtual_tokens, info.hidden_size))

    def init_from_model(self, embed: nn.Module, tokenizer=None, capture=None) -> None:
        init_prompt_table(self.prompt.data, self.config, embed, tokenizer)

    def insertion_length(self) -> int:
        return self.config.num_virtual_tokens

    def forward(self, inputs: MethodInputs) -> Contribution:
        at = 1 if self.config.position == "after_cls" else 0
        return Contribution(input_prompt=self.prompt[None], prompt_at=at)
