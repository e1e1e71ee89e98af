"""What every method shares: a config dataclass and a module that turns a batch into engine contributions.

A method never touches the backbone. Its module returns a :class:`~softprompt.engine.compose.Contribution`
(input-layer prompt, per-layer key/value prefixes, an insertion before some layer, a layer hook for gates) and the
engine's composer turns it into the per-forward state. Everything the glue needs to know about a method is a hook
here (default learning rate, extra positions, position shift, what its layer hook does), never an ``isinstance``.
A new method is therefore a config plus a small module, registered in ``methods/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine.compose import Contribution, HookShape
from ..engine.injector import ModelInfo
from ..errors import ConfigError


@dataclass
class MethodConfig:
    """Base of every method config. Subclasses are dataclasses with documented, validated fields."""

    method: ClassVar[str] = ""
    # The learning rate that works for this method with AdamW on small encoders (prompt methods need large ones).
    default_lr: ClassVar[float] = 1e-3

    def validate(self, info: ModelInfo | None = None) -> None:
        """Raise :class:`ConfigError` naming the field, the value and the fix. ``info`` enables model checks."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for method {cls.method!r}; valid options are {sorted(fields)}"
            )
        for name, value in data.items():
            _check_type(cls.method, name, value, str(fields[name].type))
        return cls(**data)

    def __post_init__(self) -> None:
        self.validate()


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(method: str, name: str, value: Any, annotation: str) -> None:
    """Check a JSON/CLI value against a field annotation such as ``int``, ``str | None`` or ``list[int] | None``."""
    options = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in options:
        return
    for option in options:
        if option in _SCALARS:
            ok = isinstance(value, _SCALARS[option]) and not (option != "bool" and isinstance(value, bool))
        elif option.startswith("list[") and isinstance(value, list):
            inner = option[5:-1]
            ok = all(isinstance(v, _SCALARS.get(inner, (object,))) and not isinstance(v, bool) for v in value)
        else:
            ok = False
        if ok:
            return
    raise ConfigError(f"option {name}={value!r} of method {method!r} has the wrong type: expected {annotation}")


# Virtual tokens of a model without a position table (no absolute limit) are capped here: far beyond any real use,
# small enough that a typo cannot ask for terabytes.
MAX_VIRTUAL_TOKENS = 65536


def check_sizes(config: MethodConfig, info: ModelInfo) -> None:
    """Bound every length option by the model before any table is allocated: a prompt or prefix cannot have more
    virtual tokens than the model has positions (or :data:`MAX_VIRTUAL_TOKENS` without a position table)."""
    limit = info.max_positions or MAX_VIRTUAL_TOKENS
    lengths = {"num_virtual_tokens": getattr(config, "num_virtual_tokens", None)}
    for i, n in enumerate(getattr(config, "layer_lengths", None) or []):
        lengths[f"layer_lengths[{i}]"] = n
    for name, value in lengths.items():
        if isinstance(value, int) and value > limit:
            raise ConfigError(f"{name}={value} of method {config.method!r} is more than the {limit} positions of "
                              f"{info.model_type}; use at most {limit} (typical values are 5-100)")


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)




@dataclass
class MethodInputs:
    """What a method may look at to build its contribution."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor  # [B, N], 1 = real token
    embed: nn.Module  # the frozen input embedding table
    batch_size: int

    def token_embeddings(self) -> torch.Tensor:
        return self.embed(self.input_ids)


class PromptMethod(nn.Module):
    """Base class of method modules. ``forward(inputs) -> Contribution``."""

    config: MethodConfig
    # False when forward reads only the method's own parameters, never the inputs (prompt tables, static prefixes):
    # outside training, a frozen adapter's contribution is then the same in every pass (multi computes it once).
    reads_inputs: bool = True

    def __init__(self, config: MethodConfig, info: ModelInfo):
        super().__init__()
        config.validate(info)
        check_sizes(config, info)
        self.config = config
        self.info = info

    def forward(self, inputs: MethodInputs) -> Contribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save. Default: all parameters and buffers of the module."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def import_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export_state_dict` (strict)."""
        self.load_state_dict(tensors, strict=True)

    def insertion_length(self) -> int:
        """Positions this method adds to the sequence (input prompts and insertions)."""
        return 0

    def position_shift(self) -> int:
        """Positions the real tokens are numbered from (PEFT's prefix numbering); 0 for every method by default."""
        return 0

    def hook_shape(self) -> HookShape | None:
        """What this method's layer hook does, so that several adapters' rows can share one pass (``multi``).
        None: the method has no hook, or one the composer must not mix with other adapters' rows."""
        return None

    def init_from_model(self, embed: nn.Module, tokenizer=None, capture=None) -> None:
        """Optional initialisation that needs the frozen model (e.g. prompt from vocabulary or text).

        ``capture(input_ids) -> {layer: (key, value)}`` runs the frozen backbone and returns every layer's keys and
        values (prefix initialisation from real tokens)."""
