"""The method registry: one folder per method (``config.py`` + ``module.py``, optional ``tools``/``cli``), one line
each in :data:`METHODS`. Everything the rest of the package needs to know about a method is a hook on its config or
module (see ``base.py``), so adding a method touches this file and the method's own folder only."""

from __future__ import annotations

from ..errors import ConfigError
from .apt import APT, APTConfig
from .base import MethodConfig, MethodInputs, PromptMethod
from .id_spam import IDSPAM, IDSPAMConfig
from .late_prompt import LatePrompt, LatePromptConfig
from .p_tuning import PTuning, PTuningConfig
from .prefix_tuning import PrefixConfig, PrefixTuning
from .prompt_tuning import PromptTuning, PromptTuningConfig

# name -> (config class, module class). The name is what ``--method`` and adapter files use.
METHODS: dict[str, tuple[type[MethodConfig], type[PromptMethod]]] = {
    "prompt": (PromptTuningConfig, PromptTuning),
    "ptuning": (PTuningConfig, PTuning),
    "prefix": (PrefixConfig, PrefixTuning),
    "lpt": (LatePromptConfig, LatePrompt),
    "apt": (APTConfig, APT),
    "idspam": (IDSPAMConfig, IDSPAM),
}


def method_classes(name: str) -> tuple[type[MethodConfig], type[PromptMethod]]:
    """Look up a method by name, with a clear error listing the known ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {' | '.join(METHODS)}")
    return METHODS[name]


def config_from_dict(name: str, options: dict) -> MethodConfig:
    """Build a validated config of method ``name`` from a plain dict."""
    return method_classes(name)[0].from_dict(options)


def default_lr(name: str) -> float:
    """The learning rate a method trains with when none is given."""
    return method_classes(name)[0].default_lr


__all__ = [
    "METHODS",
    "APTConfig",
    "IDSPAMConfig",
    "LatePromptConfig",
    "MethodConfig",
    "MethodInputs",
    "PTuningConfig",
    "PrefixConfig",
    "PromptMethod",
    "PromptTuningConfig",
    "config_from_dict",
    "default_lr",
    "method_classes",
]
