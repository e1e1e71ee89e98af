"""P-tuning's options: prompt-tuning's plus the reparameterising encoder."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.injector import ModelInfo
from ..base import require
from ..prompt_tuning.config import PromptTuningConfig

ENCODERS = ("mlp", "lstm")

@dataclass
class PTuningConfig(PromptTuningConfig):
    """Prompt-tuning options (length, init, position) plus the reparameterising encoder:
    encoder "mlp" or "lstm"; encoder_hidden_size h (default: the model's hidden size); encoder_num_layers (LSTM).
    """

    method = "ptuning"
    default_lr = 1e-3
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2

    def validate(self, info: ModelInfo | None = None) -> None:
        super().validate(info)
        require(self.encoder in ENCODERS, f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        require(self.encoder_hidden_size is None or self.encoder_hidden_size > 0, "encoder_hidden_size must be > 0")
