"""Many adapters on one frozen model: batches in which every row names its own adapter.

    import softprompt as sp
    from softprompt.multi import MultiAdapterModel

    model = MultiAdapterModel("minilm", {"sentiment": "runs/sst2", "paraphrase": "runs/mrpc"})
    logits = model(input_ids, attention_mask, adapter_names=["sentiment", "paraphrase", None, ...])
    every = model.all_adapters(input_ids, attention_mask)        # {"sentiment": [B, 2], "paraphrase": [B, 2]}
    model.predict(["a fine film"], "sentiment")                  # [{"adapter": ..., "label": "pos", ...}]

Why it works: the engine takes per-example prefixes (every ``LayerInjection.key/value`` may carry one row per
example) and every method returns a :class:`~softprompt.methods.Contribution` of tensors with batch dimension 1 or B.
So each adapter's method runs on its own rows, the contributions are stacked row by row into one ``InjectionState``,
the frozen backbone runs once, and each row's own task head reads its output.

What shares a forward pass (one "group"):

* input-layer prompts (prompt tuning, P-tuning) of *any* lengths, and rows naming ``None`` (the bare model): shorter
  prompts are padded with masked "slot" positions (attention_mask 0) so all rows have the same length. Encoders get
  the slots at the end of the row (positions of real tokens unchanged, so absolute position embeddings stay exact);
  causal decoders get them at the front (they act as extra left padding, which keeps relative positions exact);
* deep prefixes (prefix tuning, APT) with the same per-layer lengths. Prefix columns cannot be hidden from a row
  without a mask in the engine, so adapters with different per-layer lengths run as separate groups, unless the
  engine offers ``LayerInjection.prefix_mask`` (detected at import: :data:`ENGINE_PREFIX_MASK`), in which case
  prompt, prefix and bare rows all share one pass;
* mid-network insertions (LPT, ID-SPAM) with the same insertion layer, length and position: the engine inserts the
  same number of vectors into every row, so rows with another insertion (or none) form another group.

Task heads: every adapter holds its own head tensors (``head.classifier.*``). The base model's head modules are
replaced by a router that applies each row's own head (or the base model's head for ``None`` rows) to that row's
pooled output, so the model's own pooling code (BERT pooler, RoBERTa's head, last-token pooling of decoders) runs
once for the whole batch. Heads with different numbers of labels are padded with ``-inf`` up to the widest one in
the batch (softmax gives them probability 0, argmax never picks them).
"""

from __future__ import annotations

import dataclasses
import copy
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .engine.injector import Injector, attach
from .engine.state import STATE_KWARG, InjectionState, Insertion, LayerInjection
from .errors import AdapterMismatchError, ConfigError, SequenceTooLongError, SoftPromptError, UnsupportedModelError
from .io import _check_shapes, check_base_model, read_adapter_config, read_adapter_tensors
from .methods import MethodInputs, PromptMethod, config_from_dict, method_classes
from .model import task_head_names

# True when the engine can hide prefix columns per row (``LayerInjection.prefix_mask``, [B or 1, P] bool, True =
# visible): then adapters with different prefix lengths, prompts and bare rows share one forward pass.
ENGINE_PREFIX_MASK = "prefix_mask" in {f.name for f in dataclasses.fields(LayerInjection)}

# Logit value of the label columns a row's head does not have (heads of different widths in one batch).
PAD_LOGIT = float("-inf")

# Heads whose outputs are not a single ``logits`` tensor (QA start/end, multiple choice reshapes rows).
_UNSUPPORTED_ARCH_SUFFIXES = ("ForQuestionAnswering", "ForMultipleChoice")


class UnknownAdapterError(SoftPromptError, KeyError):
    """A row names an adapter that is not loaded."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# ---- adapter shapes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterShape:
    """How an adapter enters the forward pass; it decides which rows can share a pass.

    prompt: input-layer prompt length t (0 = none), placed at position ``prompt_at``.
    prefix: prefix length of every layer (all 0 = none).
    insertion: (layer, length, position) of vectors inserted into the hidden states, or None.
    gate: "kv" / "v" when the method gates its prefixes (APT), else None.
    solo: the method uses a layer hook this module does not know; its rows never share a pass with another adapter.
    """

    prompt: int = 0
    prompt_at: int = 0
    prefix: tuple[int, ...] = ()
    insertion: tuple[int, int, int] | None = None
    gate: str | None = None
    solo: bool = False

    @property
    def extra_positions(self) -> int:
        """Positions the adapter adds to the sequence (counts against the model's position limit)."""
        return self.prompt + (self.insertion[1] if self.insertion else 0)


def adapter_shape(method: PromptMethod, info, embed: nn.Module) -> AdapterShape:
    """Probe a method with a dummy one-row batch and read the shape of its contribution."""
    from .methods.apt import APT
    from .methods.id_spam import IDSPAM
    from .methods.late_prompt import LatePrompt

    device = embed.weight.device
    ids = torch.ones(1, 2, dtype=torch.long, device=device)
    with torch.inference_mode():
        c = method(MethodInputs(ids, torch.ones_like(ids), embed, 1))
    prompt = int(c.input_prompt.shape[1]) if c.input_prompt is not None else 0
    prefix = [0] * info.num_layers
    for i, (k, _) in c.prefixes.items():
        prefix[i] = int(k.shape[-2])
    insertion = None
    if c.insertion is not None:
        insertion = (c.insertion.layer, int(c.insertion.vectors.shape[1]), c.insertion.at)
    gate, solo = None, False
    if c.layer_hook is not None:
        if isinstance(method, APT):
            gate = "v" if method.config.gate_target == "v" else "kv"
        elif isinstance(method, (LatePrompt, IDSPAM)):
            # Input-dependent prompts produced inside the forward (LPT's generator, ID-SPAM on full embeddings).
            insertion = (method.layer, method.config.num_virtual_tokens, method._at())
        else:
            solo = True
    return AdapterShape(prompt=prompt, prompt_at=c.prompt_at if prompt else 0, prefix=tuple(prefix),
                        insertion=insertion, gate=gate, solo=solo)


# ---- loaded adapters -------------------------------------------------------------------------------------------
class _AdapterModules(nn.Module):
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
    modules: _AdapterModules
    shape: AdapterShape
    key: str  # registration key of ``modules`` (adapter names may contain characters nn.Module names cannot)

    @property
    def method(self) -> PromptMethod:
        return self.modules.method

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


class _RoutedHead(nn.Module):
    """Stands in for a task-head module of the base model and applies each row's own head.

    ``routes`` is set for one forward pass: (head module, row indices) pairs that cover every row. The model's own
    forward calls this module exactly where it called its head (after its pooling), so pooling stays the model's.
    """

    def __init__(self, default: nn.Module):
        super().__init__()
        self.default = default  # the base model's own head: rows naming None, adapters saved without a head
        self.routes: list[tuple[nn.Module, torch.Tensor]] = []

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routes = self.routes or [(self.default, None)]
        if len(routes) == 1:
            return routes[0][0](hidden, *args, **kwargs)
        outs = [(idx, head(hidden[idx], *args, **kwargs)) for head, idx in routes]
        width = max(o.shape[-1] for _, o in outs)
        first = outs[0][1]
        out = first.new_full((hidden.shape[0], *first.shape[1:-1], width), PAD_LOGIT)
        for idx, o in outs:
            out[idx, ..., : o.shape[-1]] = o
        return out


def _head_like(template: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """A copy of ``template`` with its Linear layers resized to ``tensors`` (heads differ in their label count)."""
    head = copy.deepcopy(template)
    for mod_name, mod in list(head.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        w = tensors.get(f"{mod_name}.weight" if mod_name else "weight")
        if w is None or tuple(w.shape) == tuple(mod.weight.shape):
            continue
        if w.dim() != 2:
            raise AdapterMismatchError(f"{where}: head tensor {mod_name}.weight has shape {tuple(w.shape)}")
        new = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device=mod.weight.device,
                        dtype=mod.weight.dtype)
        if mod_name:
            parent_name, _, attr = mod_name.rpartition(".")
            setattr(head.get_submodule(parent_name) if parent_name else head, attr, new)
        else:
            head = new
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise AdapterMismatchError(f"{where}: head tensors do not fit the base model's head ({exc})") from exc
    return head


# ---- the model -------------------------------------------------------------------------------------------------
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
        if tokenizer is not None and self.info.is_causal:
            tokenizer.padding_side = "left"  # last-token heads read the right end (as in training)
        self.head_names = task_head_names(base)
        self._routers: dict[str, _RoutedHead] = {}
        for name in self.head_names:
            router = _RoutedHead(getattr(base, name))
            setattr(base, name, router)  # nn.Module.__setattr__ registers it in place of the head
            self._routers[name] = router
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
        from .train.runner import _SpecStub, load_base, load_tokenizer

        kind, labels = task_kind, []
        for path in adapters.values():  # the head class follows the adapters' task (all must agree)
            meta = read_adapter_config(path)
            kind = kind or meta.get("task_kind")
            labels = labels or list(meta.get("label_names") or [])
        spec = _SpecStub(kind or "classification", labels or ["0", "1"])
        base, _ = load_base(model_name, spec, dtype=dtype)
        return base, tokenizer if tokenizer is not None else load_tokenizer(model_name)

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

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

    def load_adapter_modules(self, path: str | os.PathLike, name: str = "adapter") -> tuple[dict, _AdapterModules]:
        """Read and check an adapter folder and build its modules on this base (does not register it)."""
        where = f"adapter {name!r} ({path})"
        meta = read_adapter_config(path)
        tensors = read_adapter_tensors(path)
        check_base_model(meta, self.info, path)
        saved_arch = (meta.get("base_model") or {}).get("architecture")
        heads = list(meta.get("head_modules") or [])
        arch = type(self.base_model).__name__
        if heads and saved_arch and saved_arch != arch:
            raise AdapterMismatchError(
                f"{where} was trained with a {saved_arch} head but this base model is a {arch}; serve it on a base "
                f"loaded as {saved_arch} (task_kind {meta.get('task_kind')!r})"
            )
        missing = [h for h in heads if h not in self._routers]
        if missing:
            raise AdapterMismatchError(f"{where} holds task head(s) {missing} but {arch} has none")
        config = config_from_dict(meta["method"], dict(meta["config"]))
        _, module_cls = method_classes(config.method)
        method = module_cls(config, self.info)
        part = {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")}
        _check_shapes(method.export_state_dict(), part, path, "method")
        method.import_state_dict(part)
        head_modules = {}
        for h in heads:
            prefix = f"head.{h}."
            head_tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            head_modules[h] = _head_like(self._routers[h].default, head_tensors, where)
        modules = _AdapterModules(method, head_modules).to(self.device).eval()
        for p in modules.parameters():
            p.requires_grad_(False)
        return meta, modules

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
    def _group_key(self, entry: LoadedAdapter | None) -> tuple:
        if entry is None:
            return ("flat", None if ENGINE_PREFIX_MASK else (0,) * self.info.num_layers, None)
        s = entry.shape
        if s.solo:
            return ("solo", entry.name)
        if s.insertion is not None:
            return ("insertion", *s.insertion)
        return ("flat", None if ENGINE_PREFIX_MASK else s.prefix, s.gate)

    def plan(self, adapter_names: Sequence[str | None]) -> list[list[int]]:
        """Row indices of each forward pass needed for a batch with these per-row adapters (see module doc)."""
        groups: dict[tuple, list[int]] = {}
        for i, name in enumerate(adapter_names):
            entry = None if name is None else self.adapter(name)
            groups.setdefault(self._group_key(entry), []).append(i)
        # Ungated rows join a gated group with the same prefix lengths (their gate is 1): one pass instead of two.
        for key in [k for k in groups if k[0] == "flat" and k[2] is None]:
            target = next((k for k in groups if k[0] == "flat" and k[1] == key[1] and k[2] is not None), None)
            if target is not None:
                groups[target] = sorted(groups[target] + groups.pop(key))
        return sorted(groups.values(), key=lambda rows: rows[0])

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
        batch, length = input_ids.shape
        names = self._names_for(adapter_names, batch)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if token_type_ids is not None:
            token_type_ids = token_type_ids.to(device)
        with self._lock:
            groups = self.plan(names)
            outs = []
            for rows in groups:
                idx = torch.tensor(rows, device=device)
                tt = token_type_ids[idx] if token_type_ids is not None else None
                outs.extend(self._run_rows(idx, [names[i] for i in rows], input_ids[idx], attention_mask[idx], tt))
            self.stats.forward_calls += 1
            self.stats.rows += batch
            self.stats.last_groups = groups
        return _scatter_rows(outs, batch)

    def _run_rows(self, idx, names, ids, mask, token_types) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One group: split it further only if it would exceed the model's position limit."""
        limit = self.info.max_positions
        entries = [None if n is None else self._adapters[n] for n in names]
        extra = [0 if e is None else e.shape.extra_positions for e in entries]
        lo, hi = _trim_bounds(mask)
        needed = (hi - lo) + max(extra)
        if limit is None or needed <= limit or len(set(extra)) == 1:
            # A single extra length that does not fit is the caller's fault: raise with the numbers.
            if limit is not None and needed > limit:
                raise SequenceTooLongError(
                    f"sequence of {hi - lo} tokens + {max(extra)} prompt tokens = {needed} exceeds the position limit "
                    f"{limit} of {self.info.model_type}; truncate inputs to at most {limit - max(extra)} tokens"
                )
            out = self._run_group(entries, ids[:, lo:hi], mask[:, lo:hi],
                                  token_types[:, lo:hi] if token_types is not None else None)
            return [(idx, _untrim(out, lo, hi, ids.shape[1]))]
        # Rows padded by slots would pass the limit: run each prompt length on its own (each fits alone).
        result = []
        for e in sorted(set(extra)):
            sel = [i for i, x in enumerate(extra) if x == e]
            s = torch.tensor(sel, device=idx.device)
            result.extend(self._run_rows(idx[s], [names[i] for i in sel], ids[s], mask[s],
                                         token_types[s] if token_types is not None else None))
        return result

    def _run_group(self, entries: list[LoadedAdapter | None], ids, mask, token_types) -> torch.Tensor:
        """One backbone pass for rows that can share it (see :meth:`plan`)."""
        g, n = ids.shape
        device = ids.device
        embed = self.base_model.get_input_embeddings()
        # Rows of each adapter, in first-appearance order (None = the bare model).
        order: dict[str | None, list[int]] = {}
        for i, e in enumerate(entries):
            order.setdefault(None if e is None else e.name, []).append(i)
        subs = {name: torch.tensor(r, device=device) for name, r in order.items()}
        contribs = {}
        for name, sub in subs.items():
            if name is not None:
                method = self._adapters[name].method
                contribs[name] = method(MethodInputs(ids[sub], mask[sub], embed, len(sub)))
        state = InjectionState(attention_mask=mask)
        inputs = self._input_layer(ids, mask, token_types, contribs, subs, embed, state)
        if self.info.is_causal:
            # Positions count real tokens only (as generate() does for left padding): prefix keys carry no position,
            # so a row must see the same query positions as when it runs alone, unpadded.
            inputs["position_ids"] = (inputs["attention_mask"].long().cumsum(1) - 1).clamp(min=0)
        self._prefixes(g, contribs, subs, state)
        if len(subs) == 1 and len(contribs) == 1:
            # A single adapter: its hook and insertion act on the whole pass, exactly as in SoftPromptModel.
            only = next(iter(contribs.values()))
            state.layer_hook, state.insertion = only.layer_hook, only.insertion
        else:
            self._insertions_and_hooks(g, entries, contribs, subs, state, inputs["attention_mask"])
        self._route_heads(subs)
        try:
            out = self.base_model(**inputs, **{STATE_KWARG: state})
        finally:
            for router in self._routers.values():
                router.routes = []
        self.stats.backbone_passes += 1
        logits = out.logits
        keep = inputs.pop("_keep", None)
        if keep is not None and logits.dim() == 3 and logits.shape[1] == inputs["attention_mask"].shape[1]:
            # Token-level outputs: drop prompt and slot positions, row by row.
            logits = logits.gather(1, keep[..., None].expand(-1, -1, logits.shape[-1]))
        return logits

    def _input_layer(self, ids, mask, token_types, contribs, subs, embed, state) -> dict[str, Any]:
        """Model inputs: the input ids as they are, or embeddings with each row's prompt and masked slots.

        Row layout (k = leading padding, T = longest prompt of the pass, t = the row's prompt, at = its position):
        encoders ``tokens[:k+at] prompt tokens[k+at:] slots(T-t)``: slots go last, so the absolute positions of
        real tokens are those of the row alone; decoders ``slots(T-t) tokens[:k+at] prompt tokens[k+at:]``: slots
        join the left padding and the prompt stays next to the real tokens, so relative (rotary) positions are
        those of the row alone. Everything is built with one gather per tensor (no per-row Python loop).
        """
        prompts = {name: c.input_prompt for name, c in contribs.items() if c.input_prompt is not None}
        inputs: dict[str, Any] = {"attention_mask": mask}
        if token_types is not None:
            inputs["token_type_ids"] = token_types
        if not prompts:
            inputs["input_ids"] = ids
            return inputs
        g, n = ids.shape
        device = ids.device
        total = max(p.shape[1] for p in prompts.values())
        emb = embed(ids)
        # Per row: prompt length t, position at, and every row's prompt padded to T in one [G, T, d] tensor.
        t = torch.zeros(g, dtype=torch.long, device=device)
        at = torch.zeros(g, dtype=torch.long, device=device)
        table = emb.new_zeros(g, total, emb.shape[-1])
        for name, prompt in prompts.items():
            sub = subs[name]
            t[sub] = prompt.shape[1]
            at[sub] = contribs[name].prompt_at
            table[sub, : prompt.shape[1]] = prompt.to(emb.dtype).expand(len(sub), *prompt.shape[1:])
        k = (mask != 0).to(torch.long).argmax(1)  # first real token (0 for right padding)
        length = n + total
        j = torch.arange(length, device=device)[None, :].expand(g, length)
        if self.info.is_causal:
            j = j - (total - t)[:, None]  # slots in front
        split = (k + at)[:, None]
        in_prompt = (j >= split) & (j < split + t[:, None])
        zero = n + total  # index of an all-zero source column: slots
        src = torch.where(j < split, j, torch.where(in_prompt, n + j - split, j - t[:, None]))
        src = torch.where((j < 0) | (j >= n + t[:, None]), zero, src)
        src_emb = torch.cat([emb, table, emb.new_zeros(g, 1, emb.shape[-1])], dim=1)
        rows_emb = src_emb.gather(1, src[..., None].expand(g, length, emb.shape[-1]))
        prompt_mask = (torch.arange(total, device=device)[None] < t[:, None]).to(mask.dtype)
        rows_mask = torch.cat([mask, prompt_mask, mask.new_zeros(g, 1)], dim=1).gather(1, src)
        inputs.update(inputs_embeds=rows_emb, attention_mask=rows_mask)
        if token_types is not None:
            src_tt = torch.cat([token_types, token_types.new_zeros(g, total + 1)], dim=1)
            inputs["token_type_ids"] = src_tt.gather(1, src)  # prompt and slots: type 0, as SoftPromptModel
        # Where each real token landed, to strip prompt and slot positions from token-level outputs.
        i = torch.arange(n, device=device)[None, :]
        keep = i + torch.where(i >= split, t[:, None], 0)
        if self.info.is_causal:
            keep = keep + (total - t)[:, None]
        inputs["_keep"] = keep
        state.attention_mask = rows_mask
        return inputs

    def _prefixes(self, g: int, contribs, subs, state: InjectionState) -> None:
        """Per-layer key/value prefixes, one row per example (padded and masked when lengths differ)."""
        layers = sorted({i for c in contribs.values() for i in c.prefixes})
        pick, pick_names = None, None  # row -> adapter index, shared by the layers
        for layer in layers:
            parts = {name: c.prefixes[layer] for name, c in contribs.items() if layer in c.prefixes}
            lengths = {name: k.shape[-2] for name, (k, _) in parts.items()}
            width = max(lengths.values())
            uniform = len(parts) == len(subs) and len(set(lengths.values())) == 1
            if uniform and len(parts) == 1:
                k, v = next(iter(parts.values()))  # one adapter: keep its [1, H, P, D] broadcast, no copy
                state.layers[layer] = LayerInjection(key=k, value=v)
                continue
            if not uniform and not ENGINE_PREFIX_MASK:  # plan() never lets this happen
                raise RuntimeError("rows with different prefix lengths in one pass need LayerInjection.prefix_mask")
            if uniform and all(k.shape[0] == 1 and v.shape[0] == 1 for k, v in parts.values()):
                # The common case (static tables of one length): stack the adapters' tables and pick one per row,
                # two kernels per layer whatever the number of adapters.
                names = list(parts)
                if pick is None or pick_names != names:
                    pick, pick_names = torch.empty(g, dtype=torch.long, device=subs[names[0]].device), names
                    for j, name in enumerate(names):
                        pick[subs[name]] = j
                keys = torch.cat([parts[n][0] for n in names])
                values = torch.cat([parts[n][1] for n in names])
                state.layers[layer] = LayerInjection(key=keys[pick], value=values[pick])
                continue
            k0 = next(iter(parts.values()))[0]
            key = k0.new_zeros(g, k0.shape[1], width, k0.shape[3])
            value = key.clone()
            visible = torch.zeros(g, width, dtype=torch.bool, device=key.device)
            for name, (k, v) in parts.items():
                sub, p = subs[name], lengths[name]
                key[sub, :, :p] = k.expand(len(sub), *k.shape[1:])
                value[sub, :, :p] = v.expand(len(sub), *v.shape[1:])
                visible[sub, :p] = True
            inj = LayerInjection(key=key, value=value)
            if not uniform:
                inj.prefix_mask = visible
            state.layers[layer] = inj

    def _insertions_and_hooks(self, g: int, entries, contribs, subs, state: InjectionState, mask) -> None:
        """Static insertions are stacked now; layer hooks (gates, generated prompts) run on their own rows."""
        inserting = {name: c for name, c in contribs.items() if c.insertion is not None}
        hooked = {name: c.layer_hook for name, c in contribs.items() if c.layer_hook is not None}
        shape = next((e.shape for e in entries if e is not None and e.shape.insertion), None)
        if not hooked:
            if inserting:
                state.insertion = _stack_insertion(g, shape.insertion, {n: c.insertion.vectors for n, c in
                                                                        inserting.items()}, subs)
            return
        # Each hooked adapter sees its own rows and a state of its own (its caches live there, e.g. APT's gates).
        own = {name: InjectionState(attention_mask=mask[subs[name]]) for name in hooked}
        static = {n: c.insertion.vectors for n, c in inserting.items()}
        gate_modes = {n: self._adapters[n].shape.gate for n in hooked}

        def hook(index: int, hidden: torch.Tensor, combined: InjectionState) -> None:
            for name, fn in hooked.items():
                sub = subs[name]
                fn(index, hidden[sub], own[name])
                inj = own[name].layers.get(index)
                if inj is not None and inj.gate is not None and index in combined.layers:
                    _merge_gate(combined.layers[index], inj, sub, g, gate_modes[name])
            if shape is not None and index == shape.insertion[0] and combined.insertion is None:
                vectors = dict(static)
                for name in hooked:
                    if own[name].insertion is not None:
                        vectors[name] = own[name].insertion.vectors
                combined.insertion = _stack_insertion(g, shape.insertion, vectors, subs)

        state.layer_hook = hook

    def _route_heads(self, subs: dict[str | None, torch.Tensor]) -> None:
        for head_name, router in self._routers.items():
            by_head: dict[int, tuple[nn.Module, list[torch.Tensor]]] = {}
            for name, sub in subs.items():
                modules = None if name is None else self._adapters[name].modules
                head = modules.heads[head_name] if modules is not None and head_name in modules.heads \
                    else router.default
                by_head.setdefault(id(head), (head, []))[1].append(sub)
            router.routes = [(head, torch.cat(parts) if len(parts) > 1 else parts[0])
                             for head, parts in by_head.values()]

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
        rep = lambda t: None if t is None else t.repeat(k, *([1] * (t.dim() - 1)))  # noqa: E731
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
                rows[i] = {k: enc[k][j] for k in enc.keys()}
        from .train.data import Collator

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
        logits = logits.float().cpu()
        for row, name in zip(logits, names):
            entry = None if name is None else self._adapters.get(name)
            kind = entry.task_kind if entry is not None else "classification"
            width = (entry.num_labels if entry is not None else None) or int(torch.isfinite(row).sum())
            row = row[:width]
            if kind == "regression":
                out.append({"adapter": name, "score": float(row.reshape(-1)[0])})
                continue
            labels = entry.label_names if entry is not None else []
            if len(labels) != width:
                # The base model's names describe its own head only (rows naming None); otherwise label indices.
                id2label = (getattr(self.base_model.config, "id2label", None) or {}) if entry is None else {}
                labels = [str(id2label.get(i, i)) for i in range(width)]
            probs = torch.softmax(row, -1)
            best = int(probs.argmax())
            out.append({"adapter": name, "label": labels[best], "score": float(probs[best]),
                        "scores": {labels[i]: float(probs[i]) for i in range(width)}})
        return out


# ---- helpers -------------------------------------------------------------------------------------------------------
def _trim_bounds(mask: torch.Tensor) -> tuple[int, int]:
    """Column range [lo, hi) outside which every row is padding (at least one column)."""
    cols = mask.any(0).nonzero()
    if len(cols) == 0:
        return 0, mask.shape[1]
    return int(cols[0]), int(cols[-1]) + 1


def _untrim(logits: torch.Tensor, lo: int, hi: int, length: int) -> torch.Tensor:
    """Give token-level outputs of a trimmed batch their padding columns back (logits 0 there)."""
    if logits.dim() != 3 or (lo == 0 and hi == length) or logits.shape[1] != hi - lo:
        return logits
    out = logits.new_zeros(logits.shape[0], length, logits.shape[2])
    out[:, lo:hi] = logits
    return out


def _scatter_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> torch.Tensor:
    """Put the outputs of each pass back in batch order, padding label columns with -inf."""
    if len(parts) == 1 and torch.equal(parts[0][0], torch.arange(batch, device=parts[0][0].device)):
        return parts[0][1]
    first = parts[0][1]
    width = max(p.shape[-1] for _, p in parts)
    inner = max(p.shape[1] for _, p in parts) if first.dim() == 3 else None
    shape = (batch, inner, width) if inner is not None else (batch, width)
    out = first.new_full(shape, PAD_LOGIT)
    for idx, p in parts:
        if inner is not None:
            out[idx, : p.shape[1], : p.shape[-1]] = p
        else:
            out[idx, : p.shape[-1]] = p
    return out


def _stack_insertion(g: int, spec: tuple[int, int, int], vectors: dict, subs: dict) -> Insertion:
    """One Insertion for the group: row r gets its own adapter's vectors."""
    layer, t, at = spec
    if len(vectors) == 1 and len(subs) == 1:
        return Insertion(layer, next(iter(vectors.values())), at=at)
    v0 = next(iter(vectors.values()))
    out = v0.new_zeros(g, t, v0.shape[-1])
    for name, v in vectors.items():
        sub = subs[name]
        out[sub] = v.to(out.dtype).expand(len(sub), *v.shape[1:])
    return Insertion(layer, out, at=at)


def _merge_gate(combined: LayerInjection, own: LayerInjection, sub: torch.Tensor, g: int, mode: str | None) -> None:
    """Write one adapter's gate [b|1, (H,) P] into the group's gate [G, H|1, P_max] (1 for the other rows)."""
    gate = own.gate
    gate = gate.reshape(gate.shape[0], -1 if gate.dim() > 2 else 1, gate.shape[-1])
    p = gate.shape[-1]
    width = combined.prefix_length
    current = combined.gate
    heads = gate.shape[1]
    if current is None:
        current = gate.new_ones(g, heads, width)
    elif current.shape[1] < heads:
        current = current.expand(g, heads, width).clone()
    current[sub, :, :p] = gate.expand(len(sub), current.shape[1], p).to(current.dtype)
    combined.gate = current
    combined.gate_values_only = mode == "v"
