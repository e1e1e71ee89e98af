"""Late prompt tuning's options: prompt length, insertion layer and generator."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.injector import ModelInfo
from ..base import MethodConfig, require

GENERATORS = ("static", "npg")

@dataclass
class LatePromptConfig(MethodConfig):
    """num_virtual_tokens t; layer m (default: the middle layer, L // 2); generator; bottleneck r for npg.

    The official xyltt/LPT code's NPG defaults to ``proj_down_size`` r = 256 (its RoBERTa script passes 128) and
    ``num_prompt_tokens`` 20 (its script: 5); the ID-SPAM paper's LPT baseline (2.16M / 2.88M parameters) is that
    generator at t = 10, i.e. ``LatePromptConfig(generator="npg", bottleneck=256)``. seed: the initialisation of
    the static prompt or of the generator.
    """

    method = "lpt"
    default_lr = 5e-3
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
