"""Prompt-learning adapters saved by Hugging Face PEFT, read as softprompt adapters.

PEFT writes ``adapter_config.json`` (with ``peft_type``) and ``adapter_model.safetensors``. We read three types:

* ``PROMPT_TUNING`` and ``P_TUNING``: ``prompt_embeddings`` [t, d] is the prompt itself (PEFT saves P-tuning's
  encoder output), so both become prompt tuning with that table, placed in front as PEFT places it;
* ``PREFIX_TUNING``: ``prompt_embeddings`` [P, L * 2 * H_kv * D] (projected, if PEFT trained with a projection) is
  PEFT's key/value cache layout [P, 2L, H_kv, D], layer i's key at 2i and value at 2i + 1; it becomes prefix tuning
  with PEFT's position numbering (``shift_positions``: PEFT's real tokens follow the P cached positions).

Task heads PEFT saved through ``modules_to_save`` (``base_model.classifier.*``, ``score.*``) become the adapter's
head. Only the tensors above are read, with safetensors: loading never unpickles.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterFormatError

SUPPORTED = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
_HEAD_NAMES = ("classifier", "score")
_TASKS = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "classification", "TOKEN_CLS": "token_classification"}


def is_peft_config(config: dict) -> bool:
    """Whether an ``adapter_config.json`` was written by PEFT."""
    return isinstance(config, dict) and "peft_type" in config


def _int_field(config: dict, name: str, file: Path) -> int:
    value = config.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterFormatError(f"{file}: PEFT field {name!r} is {value!r}, expected a positive integer")
    return value


def convert_config(config: dict, file: Path) -> dict:
    """A softprompt adapter config (as ``io.read_adapter_config`` returns it) for a PEFT config."""
    kind = config.get("peft_type")
    if kind not in SUPPORTED:
        raise AdapterFormatError(
            f"{file}: PEFT adapter type {kind!r} is not a prompt-learning type softprompt reads; supported: "
            f"{', '.join(SUPPORTED)} (LoRA folders load with PEFT itself)"
        )
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterFormatError(f"{file}: PEFT adapters of encoder-decoder models (2 transformer submodules) are "
                                 "not supported; softprompt adapts encoder-only and decoder-only models")
    t = _int_field(config, "num_virtual_tokens", file)
    layers = _int_field(config, "num_layers", file)
    token_dim = _int_field(config, "token_dim", file)
    task = config.get("task_type")
    shape: dict[str, Any] = {"num_layers": layers}
    if kind == "PREFIX_TUNING":
        heads = _int_field(config, "num_attention_heads", file)  # PEFT stores the key/value heads here
        if token_dim % heads:
            raise AdapterFormatError(f"{file}: token_dim {token_dim} is not a multiple of num_attention_heads {heads}")
        method, options = "prefix", {"num_virtual_tokens": t, "init": "random", "shift_positions": True}
        shape.update(num_kv_heads=heads, head_dim=token_dim // heads)
    else:
        method, options = "prompt", {"num_virtual_tokens": t, "init": "random", "position": "front"}
        shape["hidden_size"] = token_dim
    name = config.get("base_model_name_or_path") or ""
    architecture = "ForCausalLM" if task == "CAUSAL_LM" else ""
    return {
        "library": "peft", "peft_type": kind, "method": method, "config": options,
        "base_model": {"name_or_path": name, "architecture": architecture, **shape},
        "head_modules": None, "task_kind": _TASKS.get(task), "model_name": name or None,
    }


def convert_tensors(config: dict, tensors: dict[str, torch.Tensor], file: Path) -> tuple[dict, list[str]]:
    """(softprompt tensors ``method.*`` / ``head.<name>.*``, head names) from a PEFT adapter file's tensors."""
    table = tensors.get("prompt_embeddings")
    if table is None or table.dim() != 2:
        raise AdapterFormatError(f"{file}: no 2-D 'prompt_embeddings' tensor; not a PEFT prompt-learning adapter")
    t, layers, token_dim = config["num_virtual_tokens"], config["num_layers"], config["token_dim"]
    out: dict[str, torch.Tensor] = {}
    if config["peft_type"] == "PREFIX_TUNING":
        heads = config["num_attention_heads"]
        if tuple(table.shape) != (t, layers * 2 * token_dim):
            raise AdapterFormatError(f"{file}: prompt_embeddings has shape {tuple(table.shape)}, expected "
                                     f"({t}, {layers * 2 * token_dim}) for this PEFT prefix config")
        kv = table.reshape(t, 2 * layers, heads, token_dim // heads).permute(1, 2, 0, 3)  # [2L, H, P, D]
        for i in range(layers):
            out[f"method.tables.{i}"] = torch.stack([kv[2 * i], kv[2 * i + 1]]).contiguous()
    else:
        if tuple(table.shape) != (t, token_dim):
            raise AdapterFormatError(f"{file}: prompt_embeddings has shape {tuple(table.shape)}, expected "
                                     f"({t}, {token_dim})")
        out["method.prompt"] = table
    heads_found = []
    for key, value in tensors.items():
        name = key
        for prefix in ("base_model.model.", "base_model."):
            name = name.removeprefix(prefix)
        head, _, rest = name.partition(".")
        if head in _HEAD_NAMES and rest:
            rest = rest.replace("modules_to_save.default.", "")
            out[f"head.{head}.{rest}"] = value
            if head not in heads_found:
                heads_found.append(head)
    return out, heads_found


def read_peft_adapter(path: str | os.PathLike, config: dict, load_tensors: Callable[[], dict[str, torch.Tensor]]
                      ) -> tuple[dict, dict]:
    """(softprompt config, softprompt tensors) of a PEFT prompt-learning folder. The config is checked before
    ``load_tensors()`` reads the weights."""
    file = Path(path) / "adapter_config.json"
    converted = convert_config(config, file)
    out, heads = convert_tensors(config, load_tensors(), file)
    converted["head_modules"] = heads
    if heads:
        weight = out.get(f"head.{heads[0]}.weight")
        if weight is None:  # RoBERTa-style heads: dense + out_proj
            weight = out.get(f"head.{heads[0]}.out_proj.weight")
        converted["num_labels"] = int(weight.shape[0]) if weight is not None else None
        converted["task_kind"] = converted["task_kind"] or "classification"
    return converted, out
