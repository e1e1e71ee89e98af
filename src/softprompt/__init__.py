"""softprompt: adapt a frozen transformer with soft prompts, deep prefixes, gated prefixes and generated prompts.

    import softprompt as sp
    model = sp.wrap(base_model, sp.PrefixConfig(num_virtual_tokens=20))   # base frozen
    model.print_trainable_parameters(); model.save_pretrained(path)
    model = sp.load(base_model, path)                                     # exact round trip
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import resources
from .errors import (
    AdapterFormatError,
    AdapterMismatchError,
    ConfigError,
    NonFiniteLossError,
    SequenceTooLongError,
    SoftPromptError,
    UnsupportedModelError,
)
from .methods import (
    APTConfig,
    IDSPAMConfig,
    LatePromptConfig,
    MethodConfig,
    PrefixConfig,
    PromptTuningConfig,
    PTuningConfig,
    config_from_dict,
)
from .model import SoftPromptModel


def wrap(base_model, config: MethodConfig, *, tokenizer=None, train_head: bool | None = None) -> SoftPromptModel:
    """Freeze ``base_model`` and adapt it with the method of ``config``.

    The task head of a transformers task model (``classifier``/``score``) trains with the method unless
    ``train_head=False``. ``tokenizer`` is needed only for text initialisation.
    """
    return SoftPromptModel(base_model, config, tokenizer=tokenizer, train_head=train_head)


def load(base_model, path, *, tokenizer=None, is_trainable: bool = False) -> SoftPromptModel:
    """Load an adapter folder onto ``base_model``; raises if it was saved for a different base model.
    (An alias of :meth:`SoftPromptModel.from_pretrained`.)"""
    return SoftPromptModel.from_pretrained(base_model, path, tokenizer=tokenizer, is_trainable=is_trainable)


__all__ = [
    "APTConfig",
    "AdapterFormatError",
    "AdapterMismatchError",
    "ConfigError",
    "IDSPAMConfig",
    "LatePromptConfig",
    "MethodConfig",
    "NonFiniteLossError",
    "PTuningConfig",
    "PrefixConfig",
    "PromptTuningConfig",
    "SequenceTooLongError",
    "SoftPromptError",
    "SoftPromptModel",
    "UnsupportedModelError",
    "config_from_dict",
    "load",
    "resources",
    "wrap",
]
