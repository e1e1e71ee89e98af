"""The multi-adapter model: one frozen base, many adapters, every row of a batch under its own adapter."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data import Collator
from ..engine.injector import Injector, attach
from ..errors import AdapterMismatchError, ConfigError, UnsupportedModelError
from ..io import read_adapter_config
from ..loading import HeadSpec, load_base, load_tokenizer, padding_side
from ..model import task_head_names
from ..postprocess import row_prediction
from .adapters import (
    AdapterModules,
    LoadedAdapter,
    MultiStats,
    UnknownAdapterError,
    load_adapter_modules,
)
from .batch import row_indices, run_rows
from .heads import RoutedHead, scatter_rows
from .plan import adapter_shape, group_key, plan_rows

# Heads whose outputs are not a single ``logits`` tensor (QA start/end, multiple choice reshapes rows).
_UNSUPPORTED_ARCH_SUFFIXES = ("ForQuestionAnswering", "ForMultipleChoice")


class MultiAdapterModel(nn.Module):
    """One frozen base model serving many adapters; every row of a batch names its own adapter (or ``None``).

    ``base``: a transformers model (it is frozen and its task heads are taken over: do not use it elsewhere) or a
    model name/alias/folder, loaded with the head class the adapters were trained with (``task_kind``).
    ``adapters``: name -> adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    ``tokenizer``: needed by :meth:`predict` / :meth:`encode` (loaded automatically when ``base`` is a name).
    """

    def __init__(
        self,
        base: nn.Module | str,
        adapters: Mapping[str, str | os.PathLike] | None = None,
        *,
        tokenizer=None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        task_kind: str | None = None,
    ):
        super().__init__()
        adapters = dict(adapters or {})
        self.model_name: str | None = None
        if isinstance(base, (str, os.PathLike)):
            self.model_name = str(base)
            base, tokenizer = self._load_base(self.model_name, adapters, dtype, task_kind, tokenizer)
        if device is not None:
            base = base.to(device)
        arch = type(base).__name__
        if arch.endswith(_UNSUPPORTED_ARCH_SUFFIXES):
            raise UnsupportedModelError(
                f"{arch}: MultiAdapterModel serves models whose output is one logits tensor per row (sequence and "
                "token classification, regression, language models); question answering and multiple choice are not "
                "supported"
            )
        base.eval()
        for p in base.parameters():
            p.requires_grad_(False)
        self.base_model = base
        self.injector: Injector = attach(base)
        self.info = self.injector.info
        self.tokenizer = tokenizer
        if tokenizer is not None:
            tokenizer.padding_side = padding_side(self.info.is_causal)  # as in training
        self.head_names = task_head_names(base)
        self.routers: dict[str, RoutedHead] = {}
        for name in self.head_names:
            router = RoutedHead(getattr(base, name))
            setattr(base, name, router)  # nn.Module.__setattr__ registers it in place of the head
            self.routers[name] = router
        self.adapter_modules = nn.ModuleDict()
        self._adapters: dict[str, LoadedAdapter] = {}
        self._counter = 0
        # One forward at a time: head routes live on the shared base model. Re-entrant for add/remove in callbacks.
        self._lock = threading.RLock()
        self.stats = MultiStats()
        for name, path in adapters.items():
            self.add_adapter(name, path)

    # ---- construction ------------------------------------------------------------------------------------------
    @staticmethod
    def _load_base(model_name: str, adapters: dict, dtype, task_kind, tokenizer):
        kind, labels, readouts = task_kind, [], set()
        for path in adapters.values():  # the head class follows the adapters' task (all must agree)
            meta = read_adapter_config(path)
            if meta.get("head_modules"):
                readouts.add(str(meta.get("readout") or "pooler"))
            arch = str((meta.get("base_model") or {}).get("architecture") or "")
            # Adapters saved from a wrapped language model record no task, only the LM architecture.
            kind = kind or meta.get("task_kind") or ("causal_lm" if arch.endswith("ForCausalLM") else None)
            labels = labels or list(meta.get("label_names") or [])
        if len(readouts) > 1:
            raise AdapterMismatchError(f"the adapters read their base model differently ({sorted(readouts)}): adapters "
                                       "that share a base share its readout; serve each readout from its own server")
        spec = HeadSpec(kind or "classification", labels or ["0", "1"])
        base, _ = load_base(model_name, spec, dtype=dtype, readout=readouts.pop() if readouts else "pooler")
        return base, tokenizer if tokenizer is not None else load_tokenizer(model_name)

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def lock(self):
        """Held by every forward: anything else that runs the shared base model (generation) takes it too."""
        return self._lock

    @property
    def adapter_names(self) -> list[str]:
        """Names of the loaded adapters, in loading order."""
        return list(self._adapters)

    def adapter(self, name: str) -> LoadedAdapter:
        """The loaded adapter ``name`` (raises :class:`UnknownAdapterError`)."""
        try:
            return self._adapters[name]
        except KeyError:
            raise UnknownAdapterError(f"unknown adapter {name!r}; loaded adapters: {self.adapter_names}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def load_adapter_modules(self, path: str | os.PathLike, name: str = "adapter") -> tuple[dict, AdapterModules]:
        """Read and check an adapter folder and build its modules on this base (does not register it)."""
        defaults = {h: r.default for h, r in self.routers.items()}
        return load_adapter_modules(path, name, self.info, self.base_model, defaults, self.device)

    def add_adapter(self, name: str, path: str | os.PathLike) -> LoadedAdapter:
        """Load the adapter folder ``path`` under ``name`` (checked against the base model). Thread-safe."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"adapter names are non-empty strings, got {name!r}")
        if name in self._adapters:
            raise ConfigError(f"adapter {name!r} is already loaded; remove it first")
        # Loading (file reads, module construction) happens outside the lock: forwards keep running meanwhile.
        meta, modules = self.load_adapter_modules(path, name)
        shape = adapter_shape(modules.method, self.info, self.base_model.get_input_embeddings())
        with self._lock:
            if name in self._adapters:
                raise ConfigError(f"adapter {name!r} is already loaded; remove it first")
            key = f"a{self._counter}"
            self._counter += 1
            self.adapter_modules[key] = modules
            entry = LoadedAdapter(name=name, path=str(path), meta=meta, modules=modules, shape=shape, key=key)
            self._adapters[name] = entry
        return entry

    def remove_adapter(self, name: str) -> None:
        """Unload adapter ``name``; a forward already running finishes with it. Thread-safe."""
        with self._lock:
            entry = self.adapter(name)
            del self._adapters[name]
            del self.adapter_modules[entry.key]

    # ---- planning --------------------------------------------------------------------------------------------
    def plan(self, adapter_names: Sequence[str | None]) -> list[list[int]]:
        """Row indices of each forward pass needed for a batch with these per-row adapters (see module doc)."""
        keys = []
        for name in adapter_names:
            entry = None if name is None else self.adapter(name)
            keys.append(group_key(name, None if entry is None else entry.shape, self.info.num_layers))
        return plan_rows(keys)

    # ---- forward ---------------------------------------------------------------------------------------------
    def _names_for(self, adapter_names, batch: int) -> list[str | None]:
        if adapter_names is None or isinstance(adapter_names, str):
            return [adapter_names] * batch
        names = list(adapter_names)
        if len(names) != batch:
            raise ConfigError(f"adapter_names has {len(names)} entries for a batch of {batch} rows")
        return names

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str | None] | str | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of every row under its own adapter: [B, C] (or [B, N, C] for token-level heads and LMs).

        ``adapter_names``: one entry per row (an adapter name, or None for the bare base model), or one name for
        all rows. Heads of different widths are padded with -inf up to the widest head of the batch.
        """
        batch = input_ids.shape[0]
        names = self._names_for(adapter_names, batch)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = self.device
        # Padding is trimmed from a copy on the host when the caller's mask is there (tokenised text): no device sync.
        host_mask = attention_mask if attention_mask.device.type == "cpu" else None
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if token_type_ids is not None:
            token_type_ids = token_type_ids.to(device)
        with self._lock:
            groups = self.plan(names)
            in_order = len(groups) == 1 and groups[0] == list(range(batch))
            outs, tensors = [], (input_ids, attention_mask, token_type_ids)
            for rows, idx in zip(groups, row_indices(groups, device)):
                ids, mask, tt = tensors if in_order else [None if t is None else t[idx] for t in tensors]
                trim = None if host_mask is None else host_mask[rows]
                outs.extend(run_rows(self, idx, [names[i] for i in rows], ids, mask, tt, trim))
            self.stats.forward_calls += 1
            self.stats.rows += batch
            self.stats.last_groups = groups
        return scatter_rows(outs, batch, in_order)

    def all_adapters(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        names: Sequence[str] | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every adapter's logits for the same rows (the multi-judgement case), in one call, no re-tokenising.

        The B rows are replicated once per adapter inside; each adapter's logits are cut to its own label count.
        """
        names = list(self.adapter_names if names is None else names)
        for n in names:
            self.adapter(n)
        if not names:
            return {}
        k = len(names)
        batch = input_ids.shape[0]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        rep = lambda t: None if t is None else t.repeat(k, *([1] * (t.dim() - 1)))
        logits = self(rep(input_ids), rep(mask), [n for n in names for _ in range(batch)], rep(token_type_ids))
        out = {}
        for j, n in enumerate(names):
            rows = logits[j * batch : (j + 1) * batch]
            width = self._adapters[n].num_labels if n in self._adapters else None
            out[n] = rows[..., :width] if width else rows
        return out

    # ---- text in, labels out --------------------------------------------------------------------------------
    def token_limit(self, name: str | None) -> int:
        """Tokens a row of adapter ``name`` may have: its ``max_length``, within the model's position limit."""
        entry = None if name is None else self.adapter(name)
        length = entry.max_length if entry is not None else 128
        limit = self.info.max_positions
        if limit is not None:
            length = min(length, limit - (entry.shape.extra_positions if entry is not None else 0))
        return max(length, 1)

    def encode(
        self, texts: Sequence[str], adapter_names: Sequence[str | None] | str | None,
        text_pairs: Sequence[str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenise rows, each truncated to its own adapter's ``max_length``, padded into one batch."""
        if self.tokenizer is None:
            raise ConfigError("this MultiAdapterModel has no tokenizer: pass tokenizer=... to use text inputs")
        names = self._names_for(adapter_names, len(texts))
        pairs = list(text_pairs) if text_pairs is not None else [None] * len(texts)
        rows: list[dict | None] = [None] * len(texts)
        by_limit: dict[tuple[int, bool], list[int]] = {}
        for i, name in enumerate(names):
            by_limit.setdefault((self.token_limit(name), pairs[i] is not None), []).append(i)
        for (limit, has_pair), members in by_limit.items():
            enc = self.tokenizer([texts[i] for i in members], [pairs[i] for i in members] if has_pair else None,
                                 truncation=True, max_length=limit)
            for j, i in enumerate(members):
                rows[i] = {k: enc[k][j] for k in enc}
        return Collator(self.tokenizer, "classification")(rows)

    def predict(
        self, texts: Sequence[str], adapter_names: Sequence[str | None] | str | None,
        text_pairs: Sequence[str | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Labels (classification) or scores (regression) for raw texts, each under its own adapter."""
        names = self._names_for(adapter_names, len(texts))
        for n in names:
            if n is not None and self.adapter(n).task_kind not in ("classification", "regression"):
                raise ConfigError(f"predict() handles classification/regression adapters; {n!r} is "
                                  f"{self.adapter(n).task_kind}: call the model on token ids instead")
        if not texts:
            return []
        batch = self.encode(texts, names, text_pairs)
        logits = self(batch["input_ids"], batch["attention_mask"], names, batch.get("token_type_ids"))
        return self.postprocess(logits, names)

    def postprocess(self, logits: torch.Tensor, names: Sequence[str | None]) -> list[dict[str, Any]]:
        """Turn per-row logits into {"adapter", "label", "score", "scores"} (or {"adapter", "score"})."""
        out = []
        for row, name in zip(logits.float().cpu(), names):
            entry = None if name is None else self._adapters.get(name)
            kind = entry.task_kind if entry is not None else "classification"
            width = (entry.num_labels if entry is not None else None) or int(torch.isfinite(row).sum())
            labels = entry.label_names if entry is not None else []
            if len(labels) != width:
                # The base model's names describe its own head only (rows naming None); otherwise label indices.
                id2label = (getattr(self.base_model.config, "id2label", None) or {}) if entry is None else {}
                labels = [str(id2label.get(i, i)) for i in range(width)]
            out.append({"adapter": name, **row_prediction(row[:width], kind, labels)})
        return out
