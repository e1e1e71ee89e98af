"""Attach the engine to a Hugging Face model: activate the attention function, find the self-attention layers with a
probe forward, and wrap the layers for the layer hooks (gates, mid-network insertion).

Nothing model-specific is hard-coded: layers are found by watching which modules call the attention function, and
shapes are read from the keys those modules actually produce (never sniffed from weights, which ZeRO-3 partitions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from . import attention
from .state import STATE_KWARG, InjectionState, Insertion

_INJECTOR_ATTR = "_softprompt_injector"


@dataclass(frozen=True)
class ModelInfo:
    """Shapes of the frozen model, as measured by the probe forward."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    is_causal: bool
    max_positions: int | None
    has_rotary: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def backbone_of(model: nn.Module) -> nn.Module:
    """The bare transformer inside a task model (``BertForSequenceClassification`` -> ``BertModel``)."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def _probe_inputs(config, device) -> dict:
    vocab = int(getattr(config, "vocab_size", 8) or 8)
    ids = torch.arange(1, 5, device=device).clamp(max=vocab - 1)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _block_of(model: nn.Module, module_name: str) -> tuple[str, nn.Module]:
    """The element of an ``nn.ModuleList`` that contains the named module (the transformer block)."""
    modules = dict(model.named_modules())
    parts = module_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = modules.get(".".join(parts[: cut - 1])) if cut > 1 else model
        if isinstance(parent, nn.ModuleList):
            name = ".".join(parts[:cut])
            return name, modules[name]
    raise UnsupportedModelError(f"could not find the transformer block that holds {module_name}")


class Injector:
    """The engine attached to one model. Build once per model with :func:`attach`."""

    def __init__(self, model: nn.Module):
        attention.register()
        self.model = model
        self.backbone = backbone_of(model)
        cls = type(model).__name__
        if getattr(model, "_supports_attention_backend", True) is False:
            raise UnsupportedModelError(
                f"{cls} ({model.config.model_type}) computes attention in its own code and bypasses transformers' "
                "AttentionInterface, so prefixes cannot be injected. Use a family that supports it "
                "(BERT, RoBERTa, XLM-R, ModernBERT, GPT-2, Llama, Qwen2/3, Mistral)."
            )
        try:
            model.set_attn_implementation(attention.ATTN_NAME)
        except Exception as exc:  # transformers raises for models without the attention interface
            raise UnsupportedModelError(f"{cls} cannot use a custom attention function: {exc}") from exc
        self.attention_modules: list[nn.Module] = []
        self.blocks: list[nn.Module] = []
        self._originals: list = []  # each block's own instance ``forward`` before wrapping (None: the class's)
        self.info = self._probe()
        self._install_hooks()
        object.__setattr__(model, _INJECTOR_ATTR, self)

    # ---- discovery -------------------------------------------------------------------------------------------
    def _probe(self) -> ModelInfo:
        config = self.model.config
        names = {m: n for n, m in self.backbone.named_modules()}
        seen: list[nn.Module] = []
        shapes: dict[nn.Module, tuple] = {}
        original = attention.softprompt_attention

        # Temporarily record every module that calls the attention function, in call order.
        def recorder(module, query, key, value, mask, **kw):
            if module not in shapes:
                seen.append(module)
                shapes[module] = (query.shape[1], key.shape[1], key.shape[3], kw.get("is_causal"))
            return original(module, query, key, value, mask, **kw)

        from transformers import AttentionInterface

        AttentionInterface.register(attention.ATTN_NAME, recorder)
        try:
            with torch.no_grad():
                device = next(self.backbone.parameters()).device
                self.backbone(**_probe_inputs(config, device), **{STATE_KWARG: InjectionState()})
        finally:
            AttentionInterface.register(attention.ATTN_NAME, original)
        cross = [m for m in seen if getattr(m, "is_cross_attention", False)]
        self_attn = [m for m in seen if m not in cross]
        expected = getattr(config, "num_hidden_layers", None)
        if not self_attn or (expected is not None and len(self_attn) != expected):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} (model_type={config.model_type!r}): {len(self_attn)} of "
                f"{expected} attention layers called transformers' AttentionInterface during the probe. This family "
                "bypasses the interface (e.g. DeBERTa, Falcon, Bloom) and cannot take prefixes; use a supported "
                "family (BERT, RoBERTa, XLM-R, ModernBERT, GPT-2, Llama, Qwen2/3, Mistral)."
            )
        for i, module in enumerate(self_attn):
            setattr(module, attention._LAYER_ATTR, i)
            self.attention_modules.append(module)
            self.blocks.append(_block_of(self.backbone, names[module])[1])
        hq, hkv, d, causal = shapes[self_attn[0]]
        causal = bool(getattr(self_attn[0], "is_causal", False) if causal is None else causal)
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or hq * d)
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        has_rotary = any(n.endswith("rotary_emb") for n, _ in self.backbone.named_modules())
        return ModelInfo(
            model_type=config.model_type, num_layers=len(self_attn), hidden_size=hidden, num_heads=int(hq),
            num_kv_heads=int(hkv), head_dim=int(d), is_causal=causal, max_positions=max_pos, has_rotary=has_rotary,
        )

    # ---- layer wrappers ------------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        """Wrap each block's ``forward`` (an instance attribute; :meth:`detach` restores the block) rather than
        register module hooks: a module with hooks takes nn.Module's slow call path, about 13 us of host time per layer
        call on CPU, paid on every forward by every method, also those that need no hook (prefix, prompt tuning).
        The wrapper is one Python frame that calls the block straight away when the forward's state has neither a
        layer hook nor an insertion. Where it runs is where module hooks ran: inside the activation checkpoint under
        transformers 5.17 (which checkpoints ``__call__``), outside it from 5.24 (which checkpoints ``forward``)."""
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            self._originals.append(block.__dict__.get("forward"))
            block.forward = _LayerCall(self, i, block.forward, i == last)

    def _before_layer(self, index: int, state: InjectionState, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Run the method's layer hook and insert vectors before layer ``index``: the block's (args, kwargs)."""
        in_args = len(args) > 0
        hidden = args[0] if in_args else kwargs["hidden_states"]
        if state.layer_hook is not None:
            state.layer_hook(index, hidden, state)
        ins = state.insertion
        if ins is not None and index > ins.layer and self.info.has_rotary and not self.info.is_causal:
            # Layers after the insertion in a rotary encoder: their cos/sin must cover the inserted rows too.
            return args, _grow_rotary(kwargs, ins, type(self.model).__name__)
        if ins is None or ins.layer != index or (ins.consumed and not state.replays):
            return args, kwargs
        if self.info.is_causal:
            # Causal decoders: the inserted tokens become key/value prefixes of layers index..L-1.
            for j, (k, v) in self.insertion_to_prefix(ins.vectors.to(hidden.dtype), index).items():
                inj = state.layer(j)
                inj.key, inj.value, inj.key_value = k, v, None  # a joint key_value would be the replaced prefix's
            ins.consumed = True
            return args, kwargs
        if self.info.has_rotary:
            kwargs = _grow_rotary(kwargs, ins, type(self.model).__name__)
        s = ins.vectors.to(hidden.dtype)
        s = s.expand(hidden.shape[0], *s.shape[1:]) if s.shape[0] == 1 else s
        hidden = torch.cat([hidden[:, : ins.at], s, hidden[:, ins.at :]], dim=1)
        for j in range(index, len(self.blocks)):
            state.layer(j).inserted, state.layer(j).insert_at = s.shape[1], ins.at
        if in_args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _after_last_layer(self, state: InjectionState, output):
        """Drop the inserted positions from the last block's output (encoders; decoders turned them into prefixes)."""
        if state.insertion is None or state.insertion.consumed:
            return output
        ins = state.insertion
        t = ins.vectors.shape[1]

        def strip(h):
            return torch.cat([h[:, : ins.at], h[:, ins.at + t :]], dim=1)

        if isinstance(output, torch.Tensor):
            return strip(output)
        if isinstance(output, tuple):
            return (strip(output[0]), *output[1:])
        first = next(iter(output.keys()))  # a ModelOutput (no int keys for writing): its first field
        output[first] = strip(output[first])
        return output

    def detach(self) -> None:
        """Unwrap the layers (the attention implementation stays registered; it is a no-op without a state)."""
        for block, original in zip(self.blocks, self._originals):
            if original is None:
                del block.forward
            else:
                block.forward = original
        self._originals.clear()

    # ---- decoder insertion ------------------------------------------------------------------------------------
    def insertion_to_prefix(self, vectors: torch.Tensor, layer: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Key/value prefixes equivalent to inserting ``vectors`` in front of the sequence before ``layer`` of a
        causal decoder.

        In a causal model, tokens in front attend only to themselves, so their states from ``layer`` on do not
        depend on the input that follows: running them alone through layers ``layer..L-1`` and handing their keys
        and values to the real tokens as prefixes is the same computation. The prompt takes positions 0..t-1 and
        the real tokens keep theirs; the KV cache of ``generate()`` holds real tokens only.
        """
        t = vectors.shape[1]
        pos = torch.arange(t, device=vectors.device)[None].expand(vectors.shape[0], t)
        kwargs: dict = {"attention_mask": None, "position_ids": pos, "use_cache": False}
        rotary = next((m for n, m in self.backbone.named_modules() if n.endswith("rotary_emb")), None)
        if rotary is not None:
            kwargs["position_embeddings"] = rotary(vectors, pos)
        capture: dict = {}
        state = InjectionState(capture=capture)
        hidden = vectors
        # The prompt is only t tokens, so checkpointing these calls saves nothing; and when the conversion itself
        # runs inside a checkpointed layer (transformers 5.17 checkpoints hooks too), a nested checkpoint inside
        # the replay keeps its frames, and with them the whole model, alive after backward. Run them plainly.
        blocks = self.blocks[layer:]
        flags = [getattr(b, "gradient_checkpointing", None) for b in blocks]
        try:
            for b, flag in zip(blocks, flags):
                if flag:
                    b.gradient_checkpointing = False
            for b in blocks:
                out = b(hidden, **kwargs, **{STATE_KWARG: state})
                hidden = out[0] if isinstance(out, (tuple, list)) else out
        finally:
            for b, flag in zip(blocks, flags):
                if flag:
                    b.gradient_checkpointing = flag
        return {i: capture[i] for i in range(layer, len(self.blocks))}


class _LayerCall:
    """A block's ``forward`` as the engine wraps it (see ``Injector._install_hooks``). An object rather than a closure,
    so that ``copy.deepcopy`` of a wrapped model gives the copy's blocks wrappers that call the copy's own forward."""

    def __init__(self, injector: Injector, index: int, forward, last: bool):
        self.injector, self.index, self.forward, self.last = injector, index, forward, last

    def __call__(self, *args, **kwargs):
        state: InjectionState | None = kwargs.get(STATE_KWARG)
        if state is None or (state.layer_hook is None and state.insertion is None):
            return self.forward(*args, **kwargs)
        args, kwargs = self.injector._before_layer(self.index, state, args, kwargs)
        out = self.forward(*args, **kwargs)
        return self.injector._after_last_layer(state, out) if self.last else out


def _grow_rotary(kwargs: dict, ins: Insertion, arch: str) -> dict:
    """Rotary encoders (ModernBERT) hand each layer the cos/sin of the N real positions: insert t rows at ``ins.at``
    so that they match the N + t hidden rows. The inserted tokens take the position of the token they are inserted
    before (the last token if they go at the end): the real tokens keep their positions, as in decoders. The
    attention masks grow in the attention function (inserted columns visible to every row)."""
    pe = kwargs.get("position_embeddings")
    if not (isinstance(pe, (tuple, list)) and len(pe) == 2 and all(isinstance(x, torch.Tensor) for x in pe)):
        raise UnsupportedModelError(
            f"inserting prompt tokens into the rotary encoder {arch} needs its layers to receive "
            "`position_embeddings=(cos, sin)` as a keyword argument; use prefix or prompt tuning on it, or a "
            "BERT/RoBERTa encoder")
    for cos, sin, grown in ins.rotary:
        if cos is pe[0] and sin is pe[1]:
            return {**kwargs, "position_embeddings": grown}
    t, at = ins.vectors.shape[1], ins.at

    def grow(x: torch.Tensor) -> torch.Tensor:  # [B or 1, N, D] -> [B or 1, N + t, D]
        src = min(at, x.shape[1] - 1)
        rows = x[:, src: src + 1].expand(x.shape[0], t, x.shape[-1])
        return torch.cat([x[:, :at], rows, x[:, at:]], dim=1)

    grown = (grow(pe[0]), grow(pe[1]))
    ins.rotary.append((pe[0], pe[1], grown))
    return {**kwargs, "position_embeddings": grown}


def attach(model: nn.Module) -> Injector:
    """Attach the engine to ``model`` (idempotent) and return its :class:`Injector`."""
    existing = getattr(model, _INJECTOR_ATTR, None)
    if existing is not None:
        return existing
    return Injector(model)
