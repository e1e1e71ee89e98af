"""Method registry: name -> (config class, module class). Adding a method = one file + one line here."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Contribution, MethodConfig, MethodInputs, PromptMethod
from .late_prompt import LatePrompt, LatePromptConfig
from .p_tuning import PTuning, PTuningConfig
from .prefix_tuning import PrefixConfig, PrefixTuning
from .prompt_tuning import PromptTuning, PromptTuningConfig

METHODS: dict[str, tuple[type[MethodConfig], type[PromptMethod]]] = {
    "prompt": (PromptTuningConfig, PromptTuning),
    "ptuning": (PTuningConfig, PTuning),
    "prefix": (PrefixConfig, PrefixTuning),
    "lpt": (LatePromptConfig, LatePrompt),
}


def register_method(name: str, config_cls: type[MethodConfig], module_cls: type[PromptMethod]) -> None:
    """Register a method under ``name`` (used by optional method files)."""
    METHODS[name] = (config_cls, module_cls)


def method_classes(name: str) -> tuple[type[MethodConfig], type[PromptMethod]]:
    """Look up a method by name, with a clear error listing the known ones."""
    _load_optional()
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]


def config_from_dict(name: str, options: dict) -> MethodConfig:
    """Build a validated config of method ``name`` from a plain dict."""
    return method_classes(name)[0].from_dict(options)


def _load_optional() -> None:
    # Methods living in their own files register themselves on import (APT, ID-SPAM).
    import importlib

    for mod in ("apt", "id_spam"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


__all__ = [
    "METHODS",
    "Contribution",
    "LatePromptConfig",
    "MethodConfig",
    "MethodInputs",
    "PTuningConfig",
    "PrefixConfig",
    "PromptMethod",
    "PromptTuningConfig",
    "config_from_dict",
    "method_classes",
    "register_method",
]
