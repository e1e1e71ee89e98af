"""The adapters a :class:`~softprompt.multi.MultiAdapterModel` holds: reading a folder into modules, and the
record kept per adapter."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.compose import Contribution
from ..errors import AdapterMismatchError, SoftPromptError
from ..io import (
    check_base_model,
    read_adapter_config,
    read_adapter_tensors,
    split_adapter_tensors,
)
from ..methods import MethodInputs, PromptMethod, config_from_dict, method_classes
from ..readout import current_readout
from .heads import head_like
from .plan import AdapterShape


class UnknownAdapterError(SoftPromptError, KeyError):
    """A row names an adapter that is not loaded."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterModules(nn.Module):
    """The trainable parts of one adapter: its method module and its own copies of the task heads."""

    def __init__(self, method: PromptMethod, heads: dict[str, nn.Module]):
        super().__init__()
        self.method = method
        self.heads = nn.ModuleDict(heads)


@dataclass
class LoadedAdapter:
    """One adapter held by a :class:`MultiAdapterModel` (``modules`` holds its tensors)."""

    name: str
    path: str
    meta: dict
    modules: AdapterModules
    shape: AdapterShape
    key: str  # registration key of ``modules`` (adapter names may contain characters nn.Module names cannot)
    _fixed: tuple | None = field(default=None, repr=False, compare=False)  # (parameter storage, contribution)

    @property
    def method(self) -> PromptMethod:
        return self.modules.method

    def contribution(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, embed: nn.Module
                     ) -> Contribution:
        """The method's contribution to a pass, for the rows ``rows`` of ``ids``/``mask``. Adapters are frozen, so
        outside training a method that does not read its inputs (``reads_inputs``) gives the same contribution in
        every pass: it is computed once (building it costs ops in every layer, host time in every serving step)
        and again only if the parameters move to new storage (another device or dtype)."""
        method = self.method
        if method.reads_inputs or method.training or torch.is_grad_enabled():
            return method(MethodInputs(ids[rows], mask[rows], embed, len(rows)))
        first = next(method.parameters(), None)
        storage = None if first is None else (first.device, first.dtype, first.data_ptr())
        if self._fixed is None or self._fixed[0] != storage:
            self._fixed = (storage, method(MethodInputs(ids[rows], mask[rows], embed, len(rows))))
        return self._fixed[1]

    @property
    def method_name(self) -> str:
        return str(self.meta.get("method"))

    @property
    def task_kind(self) -> str:
        return str(self.meta.get("task_kind") or "classification")

    @property
    def label_names(self) -> list[str]:
        return [str(x) for x in (self.meta.get("label_names") or [])]

    @property
    def num_labels(self) -> int | None:
        n = self.meta.get("num_labels")
        return int(n) if n is not None else (len(self.label_names) or None)

    @property
    def max_length(self) -> int:
        return int(self.meta.get("max_length") or 128)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary (no filesystem path: it is served over HTTP)."""
        return {
            "name": self.name, "method": self.method_name, "task_kind": self.task_kind,
            "label_names": self.label_names, "num_labels": self.num_labels, "max_length": self.max_length,
            "task": self.meta.get("task"), "prompt_length": self.shape.prompt,
            "prefix_lengths": list(self.shape.prefix) if any(self.shape.prefix) else [],
            "insertion": list(self.shape.insertion) if self.shape.insertion else None,
        }


@dataclass
class MultiStats:
    """Counters of the model's work (read by tests and the server's ``/stats``)."""

    forward_calls: int = 0
    backbone_passes: int = 0
    rows: int = 0
    last_groups: list[list[int]] = field(default_factory=list)  # row indices of each pass of the last call

    def to_dict(self) -> dict[str, Any]:
        return {"forward_calls": self.forward_calls, "backbone_passes": self.backbone_passes, "rows": self.rows}


def load_adapter_modules(path: str | os.PathLike, name: str, info, base: nn.Module, default_heads: dict[str, nn.Module],
                         device: torch.device) -> tuple[dict, AdapterModules]:
    """Read and check an adapter folder and build its modules for this base model (frozen, in eval mode).

    ``default_heads``: the base model's own task-head modules by name (an adapter's heads are copies of them,
    resized to its label count)."""
    where = f"adapter {name!r} ({path})"
    meta = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    check_base_model(meta, info, path)
    saved_arch = (meta.get("base_model") or {}).get("architecture")
    heads = list(meta.get("head_modules") or [])
    arch = type(base).__name__
    if heads and saved_arch and saved_arch != arch:
        raise AdapterMismatchError(
            f"{where} was trained with a {saved_arch} head but this base model is a {arch}; serve it on a base "
            f"loaded as {saved_arch} (task_kind {meta.get('task_kind')!r})"
        )
    want, have = str(meta.get("readout") or "pooler"), current_readout(base)
    if heads and want != have:
        raise AdapterMismatchError(
            f"{where} was trained with readout {want!r} but this base model's head reads {have!r}: adapters that share "
            f"a base share its readout; serve it on a base loaded with readout={want!r}"
        )
    missing = [h for h in heads if h not in default_heads]
    if missing:
        raise AdapterMismatchError(f"{where} holds task head(s) {missing} but {arch} has none")
    config = config_from_dict(meta["method"], dict(meta["config"]))
    _, module_cls = method_classes(config.method)
    method = module_cls(config, info)
    method_part, head_parts = split_adapter_tensors(tensors, heads, path, method.export_state_dict())
    method.import_state_dict(method_part)
    head_modules = {h: head_like(default_heads[h], part, where) for h, part in head_parts.items()}
    modules = AdapterModules(method, head_modules).to(device).eval()
    for p in modules.parameters():
        p.requires_grad_(False)
    return meta, modules
