"""Prompt tuning's options: length, initialisation and position."""

from __future__ import annotations

from dataclasses import dataclass

from ...engine.injector import ModelInfo
from ..base import MethodConfig, require

INITS = ("vocab", "random", "text")

POSITIONS = ("front", "after_cls")

@dataclass
class PromptTuningConfig(MethodConfig):
    """Input-layer soft prompt.

    num_virtual_tokens: prompt length t.
    init: "vocab" (embeddings of randomly sampled vocabulary tokens: the scale of real inputs, the robust default),
        "random" (uniform in [-init_range, init_range], the prompt-tuning paper's default with 0.5), or
        "text" (embeddings of ``init_text``, repeated/cropped to t; needs a tokenizer at wrap time).
    position: "front" puts the prompt before [CLS]/<s> (PEFT's behaviour, the pooler then reads a virtual token);
        "after_cls" keeps the first real token in front so encoder heads still read [CLS].
    """

    method = "prompt"
    default_lr = 3e-2
    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_text: str | None = None
    init_range: float = 0.5
    position: str = "front"
    seed: int = 0

    def validate(self, info: ModelInfo | None = None) -> None:
        require(self.num_virtual_tokens >= 1, f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        require(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        require(self.init != "text" or bool(self.init_text), "init='text' needs init_text='...' (the words to use)")
        require(self.position in POSITIONS, f"position must be one of {POSITIONS}, got {self.position!r}")
