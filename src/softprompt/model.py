"""The wrapper model: a frozen Hugging Face model plus one method module, driven through the injection engine."""

from __future__ import annotations

import os

import torch
from torch import nn

from .engine.compose import Part, compose, insert_prompt
from .engine.injector import Injector, attach
from .engine.state import STATE_KWARG, InjectionState
from .errors import AdapterFormatError, AdapterMismatchError, SequenceTooLongError, SoftPromptError
from .io import (
    CONFIG_NAME,
    check_base_model,
    check_shapes,
    read_adapter_config,
    read_adapter_tensors,
    save_adapter,
    split_adapter_tensors,
)
from .methods import MethodConfig, MethodInputs, PromptMethod, config_from_dict, method_classes
from .readout import ensure_readout

# Randomly initialised task heads of transformers task models: they train with the method and are saved with it.
HEAD_NAMES = ("classifier", "score", "qa_outputs")


def task_head_names(model: nn.Module) -> list[str]:
    """Names of the top-level task-head modules of a transformers task model (none for causal LMs)."""
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]


class SoftPromptModel(nn.Module):
    """A frozen base model adapted by one method. Use :func:`softprompt.wrap` or :func:`softprompt.load`.

    ``forward`` takes the base model's usual inputs (``input_ids``, ``attention_mask``, ``labels``, ...) and returns
    its usual outputs; only the method module and the task head (if any) have ``requires_grad``.
    """

    def __init__(self, base: nn.Module, config: MethodConfig, *, tokenizer=None, train_head: bool | None = None):
        super().__init__()
        self.base_model = base
        self.injector: Injector = attach(base)
        self.info = self.injector.info
        config_cls, module_cls = method_classes(config.method)
        if not isinstance(config, config_cls):
            config = config_cls.from_dict(config.to_dict())
        self.method_config = config
        for p in base.parameters():
            p.requires_grad_(False)
        self.head_names = task_head_names(base) if train_head is not False else []
        for name in self.head_names:
            for p in getattr(base, name).parameters():
                p.requires_grad_(True)
        method = module_cls(config, self.info)
        embed = base.get_input_embeddings()
        method.init_from_model(embed, tokenizer, capture=self.capture_kv)
        param = next(base.parameters())
        self.method: PromptMethod = method.to(param.device)
        # Found here, not at the first forward: a compiled forward would see the attribute change under it and
        # compile a second time.
        self._checkpoint_flags = tuple(m for m in base.modules() if hasattr(m, "gradient_checkpointing"))

    def _checkpointing(self) -> bool:
        """Whether activation checkpointing is on in the base model: transformers' own test
        (``is_activation_checkpointing``), but over the modules that carry the flag, found once. The property walks
        every module of the model on every call, which cost about 1 ms of CPU per step on a 24-layer encoder, and
        the module tree does not change after wrapping; the flags themselves are read fresh each call, so toggling
        checkpointing later is seen."""
        return any(m.gradient_checkpointing for m in self._checkpoint_flags)

    # ---- engine plumbing ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def capture_kv(self, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Run the frozen backbone on ``input_ids`` and return every layer's (key, value) [B, H_kv, N, D]."""
        capture: dict = {}
        self.injector.backbone(input_ids=input_ids, **{STATE_KWARG: InjectionState(capture=capture)})
        return capture

    def build_state(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> tuple[dict, InjectionState, tuple[int, int] | None]:
        """Run the method and turn its contribution into model inputs, the engine state of this forward and the
        (position, length) of an input-layer prompt (None without one)."""
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, length = ref.shape[0], ref.shape[1]
        given = attention_mask is not None
        if not given:
            # The method and its hooks see every token as real. The model itself gets no mask: a mask of this call's
            # length would be wrong under a KV cache (it must cover the cached positions too), and without one
            # transformers builds the right causal mask, cache or not.
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=ref.device)
        self._check_length(length)
        embed = self.base_model.get_input_embeddings()
        contrib = self.method(MethodInputs(input_ids, attention_mask, embed, batch))
        replays = self.base_model.training and torch.is_grad_enabled() and self._checkpointing()
        state = compose([Part(contrib)], batch, attention_mask, replays=replays)
        inputs: dict = {"attention_mask": attention_mask} if given else {}
        if contrib.input_prompt is not None:
            if inputs_embeds is None:
                inputs_embeds = embed(input_ids)
            at = contrib.prompt_at
            embeds, mask = insert_prompt(inputs_embeds, attention_mask, contrib.input_prompt, at)
            inputs.update(inputs_embeds=embeds, attention_mask=mask)
            return inputs, state, (at, contrib.input_prompt.shape[1])
        if inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids
        return inputs, state, None

    def _check_length(self, length: int) -> None:
        limit = self.info.max_positions
        extra = self.method.insertion_length() + self.method.position_shift()
        if limit is not None and length + extra > limit:
            raise SequenceTooLongError(
                f"sequence of {length} tokens + {extra} prompt tokens = {length + extra} exceeds the position limit "
                f"{limit} of {self.info.model_type}; truncate inputs to at most {limit - extra} tokens (max_length)"
            )

    @staticmethod
    def _pad_span(tensor: torch.Tensor, span: tuple[int, int], value) -> torch.Tensor:
        at, t = span
        pad = tensor.new_full((tensor.shape[0], t, *tensor.shape[2:]), value)
        return torch.cat([tensor[:, :at], pad, tensor[:, at:]], dim=1)

    # ---- public API ----------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        """Same inputs and outputs as the base model."""
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        inputs, state, span = self.build_state(input_ids, attention_mask, inputs_embeds)
        if span is not None:
            # Prompt positions carry no labels, no token types and no explicit positions (PEFT does the same).
            kwargs.pop("position_ids", None)
            if kwargs.get("token_type_ids") is not None:
                kwargs["token_type_ids"] = self._pad_span(kwargs["token_type_ids"], span, 0)
            if labels is not None and labels.dim() == 2 and labels.shape[1] == length:
                labels = self._pad_span(labels, span, -100)
        shift = self.method.position_shift()
        if shift and kwargs.get("position_ids") is None:
            ref = inputs.get("input_ids", inputs.get("inputs_embeds"))
            kwargs["position_ids"] = torch.arange(shift, shift + ref.shape[1], device=ref.device)[None].expand(
                ref.shape[0], -1)
        out = self.base_model(**inputs, labels=labels, **kwargs, **{STATE_KWARG: state})
        logits = getattr(out, "logits", None)
        if span is not None and logits is not None and logits.dim() == 3 and logits.shape[1] > length:
            at, t = span
            out["logits"] = torch.cat([logits[:, :at], logits[:, at + t :]], dim=1)
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """``generate()`` of the base model with the adaptation applied; returns prompt ids + new tokens."""
        if self.method.position_shift():
            raise ValueError("shift_positions=True (PEFT's position numbering) is for training/forward only; "
                             "generate() numbers positions itself. Re-create the config without it to generate.")
        inputs, state, _ = self.build_state(input_ids, attention_mask, None)
        base = self.base_model
        validate = base._validate_model_kwargs

        def validate_without_state(model_kwargs):
            # transformers rejects kwargs that prepare_inputs_for_generation does not name; ours travels via **kwargs.
            model_kwargs = {k: v for k, v in model_kwargs.items() if k != STATE_KWARG}
            return validate(model_kwargs)

        base._validate_model_kwargs = validate_without_state
        try:
            out = base.generate(**inputs, **kwargs, **{STATE_KWARG: state})
        finally:
            del base._validate_model_kwargs
        if "inputs_embeds" in inputs:  # transformers returns only the new tokens when given embeddings
            tokens = out if isinstance(out, torch.Tensor) else out.sequences  # return_dict_in_generate=True
            # Beams / num_return_sequences give each example several rows, in example order.
            prompt = input_ids.to(tokens.device).repeat_interleave(tokens.shape[0] // input_ids.shape[0], dim=0)
            tokens = torch.cat([prompt, tokens], dim=1)
            if isinstance(out, torch.Tensor):
                return tokens
            out.sequences = tokens
        return out

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter that trains: the method's and the task head's."""
        out = {f"method.{n}": p for n, p in self.method.named_parameters() if p.requires_grad}
        for name in self.head_names:
            out.update({f"head.{name}.{n}": p for n, p in getattr(self.base_model, name).named_parameters()})
        return out

    def num_parameters_summary(self) -> tuple[int, int, int]:
        """(method parameters, head parameters, all parameters of base + method)."""
        method = sum(p.numel() for p in self.method.parameters() if p.requires_grad)
        head = sum(p.numel() for n in self.head_names for p in getattr(self.base_model, n).parameters())
        total = sum(p.numel() for p in self.base_model.parameters()) + method
        return method, head, total

    def print_trainable_parameters(self) -> None:
        method, head, total = self.num_parameters_summary()
        print(
            f"trainable params: {method + head:,} (method {method:,} + head {head:,}) || all params: {total:,} "
            f"|| trainable%: {100 * (method + head) / total:.4f}"
        )

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Checkpoint the frozen layers (non-reentrant, so gradients reach prefixes that are not layer inputs)."""
        kwargs.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
        self.base_model.gradient_checkpointing_enable(**kwargs)
        # Frozen embeddings: make sure something that requires grad enters the checkpointed layers.
        if hasattr(self.base_model, "enable_input_require_grads"):
            self.base_model.enable_input_require_grads()

    def save_pretrained(self, path: str, **metadata) -> None:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and a model card ``README.md``."""
        save_adapter(self, path, **metadata)

    @classmethod
    def from_pretrained(cls, base: nn.Module, path: str | os.PathLike, *, tokenizer=None,
                        is_trainable: bool = False) -> SoftPromptModel:
        """Load the adapter folder ``path`` onto ``base`` (exact round trip; raises if it was saved for a different
        base model). ``softprompt.load`` is this function."""
        config = read_adapter_config(path)
        tensors = read_adapter_tensors(path)
        try:
            method_cfg = config_from_dict(config["method"], dict(config["config"]))
        except SoftPromptError:
            raise
        except (TypeError, ValueError) as exc:  # an option of the wrong type that validation compared or used
            raise AdapterFormatError(
                f"{os.path.join(path, CONFIG_NAME)}: invalid {config['method']!r} options {config['config']!r} "
                f"({exc}); re-save the adapter"
            ) from exc
        heads = config.get("head_modules") or []
        if heads:
            ensure_readout(base, str(config.get("readout") or "pooler"), f"adapter {path}")
        model = cls(base, method_cfg, tokenizer=tokenizer, train_head=bool(heads))
        check_base_model(config, model.info, path)
        missing = [h for h in heads if h not in model.head_names]
        if missing:
            raise AdapterMismatchError(
                f"adapter {path} holds task head(s) {missing} but {type(base).__name__} has none; load the base "
                f"model as {config['base_model'].get('architecture')} with num_labels={config.get('num_labels')}"
            )
        model.head_names = list(heads)
        model.load_adapter_tensors(tensors, path)
        model.to(model.device)
        if not is_trainable:
            model.eval()
            for p in model.method.parameters():
                p.requires_grad_(False)
        return model

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor], path: str | os.PathLike = "adapter") -> None:
        """Copy an adapter file's tensors into the method and the task heads (names and shapes checked)."""
        method, heads = split_adapter_tensors(tensors, self.head_names, path, self.method.export_state_dict())
        self.method.import_state_dict(method)
        for name, part in heads.items():
            module = getattr(self.base_model, name)
            check_shapes(module.state_dict(), part, path, f"head {name}")
            module.load_state_dict(part, strict=True)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Tell the Trainer whether the loss honours ``num_items_in_batch``.

        Only causal-LM losses do. For the others (classification heads take a per-batch mean), the Trainer's
        default guess from our ``**kwargs`` signature would scale the loss by the number of processes under DDP and
        make a 2-process run differ from a 1-process run with the same global batch.
        """
        return type(self.base_model).__name__.endswith("ForCausalLM")

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def config(self):
        return self.base_model.config

