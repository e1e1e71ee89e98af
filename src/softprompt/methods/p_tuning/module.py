"""P-tuning (Liu et al., arXiv 2103.10385): input-layer prompt produced by a reparameterising encoder.

We prepend only (no interleaving with a discrete template). The encoder is an MLP (PEFT's default form:
Linear(d,h)-ReLU-Linear(h,h)-ReLU-Linear(h,d)) or a bidirectional LSTM followed by an MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from ...engine.injector import ModelInfo
from ..base import Contribution, MethodInputs, PromptMethod
from ..prompt_tuning.module import init_prompt_table
from .config import PTuningConfig


class PTuning(PromptMethod):
    """Free embeddings -> encoder -> prompt [t, hidden]."""

    reads_inputs = False

    def __init__(self, config: PTuningConfig, info: ModelInfo):
        super().__init__(config, info)
        d = info.hidden_size
        h = config.encoder_hidden_size or d
        self.embedding = nn.Parameter(torch.zeros(config.num_virtual_tokens, d))
        # Seeded by config.seed (not the global RNG), as every other method's init: an explicit method seed then fixes
        # the encoder too, and wrapping leaves the caller's RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if config.encoder == "lstm":
                self.lstm = nn.LSTM(d, h, num_layers=config.encoder_num_layers, bidirectional=True, batch_first=True)
                self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
            else:
                self.lstm = None
                self.mlp = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def init_from_model(self, embed: nn.Module, tokenizer=None, capture=None) -> None:
        init_prompt_table(self.embedding.data, self.config, embed, tokenizer)

    def insertion_length(self) -> int:
        return self.config.num_virtual_tokens

    def prompt(self) -> torch.Tensor:
        x = self.embedding[None]
        if self.lstm is not None:
            x = self.lstm(x)[0]
        return self.mlp(x)

    def forward(self, inputs: MethodInputs) -> Contribution:
        at = 1 if self.config.position == "after_cls" else 0
        return Contribution(input_prompt=self.prompt(), prompt_at=at)
