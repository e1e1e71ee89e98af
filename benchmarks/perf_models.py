"""Models and methods of ``benchmarks/perf.py``: the method names, the exceptions a case raises when a method
refuses a setting or a case does not apply, the shapes of the benchmarked models (Qwen2.5-0.5B/1.5B and
RoBERTa-large, with tiny variants for CPU smoke runs) built randomly initialised on the device, the FLOP counts the
MFU columns use, the adapters (softprompt's methods, PEFT's baselines, full fine-tuning and the frozen floor), the
random batches, and the parsing of ``BATCHxSEQ`` shape lists.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

OURS = ("prompt", "prefix", "apt", "idspam", "lpt")
BASELINES = ("peft_prompt", "peft_prefix", "peft_lora", "full_ft", "frozen")
ALL_METHODS = OURS + BASELINES
INFER_METHODS = ("bare", "prefix", "peft_prefix")


class Refused(Exception):
    """A method refused a setting (PEFT prefix tuning with gradient checkpointing)."""


class Skipped(Exception):
    """A case that does not apply (e.g. a sequence beyond RoBERTa's 514 positions)."""


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A model shape: transformers family, the public config's shape fields, and a tiny variant for CPU smoke runs."""

    name: str
    family: str  # "qwen2" (Qwen2ForCausalLM) or "roberta" (RobertaForSequenceClassification)
    config: dict
    tiny_config: dict

    @property
    def causal(self) -> bool:
        return self.family == "qwen2"


# Shapes of the public configs (config.json of Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-1.5B, FacebookAI/roberta-large).
_QWEN = dict(rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
             use_sliding_window=False, attention_dropout=0.0)  # fields both Qwen2.5 sizes share
_QWEN_PUBLIC = dict(_QWEN, vocab_size=151936, bos_token_id=151643, eos_token_id=151643)
_QWEN_TINY = dict(_QWEN, vocab_size=512, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)


def _qwen(name: str, layers: int, hidden: int, intermediate: int, heads: int, positions: int,
          tiny: tuple[int, int, int, int]) -> ModelSpec:
    """A Qwen2.5 shape (2 key/value heads, as both sizes have) and its tiny variant (layers, hidden, intermediate,
    heads)."""
    t_layers, t_hidden, t_intermediate, t_heads = tiny
    return ModelSpec(
        name, "qwen2",
        dict(_QWEN_PUBLIC, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
             num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=positions),
        dict(_QWEN_TINY, hidden_size=t_hidden, intermediate_size=t_intermediate, num_hidden_layers=t_layers,
             num_attention_heads=t_heads, num_key_value_heads=2),
    )


MODELS: dict[str, ModelSpec] = {
    "qwen0.5b": _qwen("qwen0.5b", 24, 896, 4864, 14, 32768, tiny=(2, 64, 128, 4)),
    "qwen1.5b": _qwen("qwen1.5b", 28, 1536, 8960, 12, 131072, tiny=(3, 96, 192, 6)),
    "roberta-large": ModelSpec(
        "roberta-large", "roberta",
        dict(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
             hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=514,
             type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=130,
             type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    ),
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default floating dtype (models are then created directly in it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_config(spec: ModelSpec, tiny: bool):
    """The transformers config of ``spec`` (SDPA attention)."""
    import transformers as tf

    kw = dict(spec.tiny_config if tiny else spec.config)
    if spec.family == "qwen2":
        theta = kw.pop("rope_theta")
        try:
            cfg = tf.Qwen2Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta})
        except TypeError:  # older transformers spell it rope_theta
            cfg = tf.Qwen2Config(**kw, rope_theta=theta)
    elif spec.family == "roberta":
        cfg = tf.RobertaConfig(**kw, num_labels=2)
    else:  # pragma: no cover - MODELS is closed
        raise ValueError(spec.family)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_base(spec: ModelSpec, tiny: bool, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised model of ``spec`` created directly on ``device`` in ``dtype``, SDPA attention."""
    import transformers as tf

    cfg = build_config(spec, tiny)
    cls = tf.Qwen2ForCausalLM if spec.family == "qwen2" else tf.RobertaForSequenceClassification
    torch.manual_seed(0)
    with default_dtype(dtype), torch.device(device):
        model = cls(cfg)
    with contextlib.suppress(Exception):
        model.set_attn_implementation("sdpa")
    return model.to(device=device, dtype=dtype)


def matmul_weights(model: nn.Module) -> int:
    """N: weights of every nn.Linear applied to every token (the one-token classification head excluded)."""
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not name.startswith(("classifier", "score")):
            total += mod.weight.numel()
    return total


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs from a model."""

    n_matmul: int
    layers: int
    heads: int
    head_dim: int
    causal: bool
    vocab: int
    max_positions: int | None


def shape_of(spec: ModelSpec, tiny: bool, model: nn.Module) -> Shape:
    cfg = model.config
    return Shape(
        n_matmul=matmul_weights(model), layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads, causal=spec.causal,
        vocab=cfg.vocab_size, max_positions=None if spec.causal else cfg.max_position_embeddings,
    )


def attention_flops_fwd(shape: Shape, b: int, s: int) -> float:
    """QK^T and AV of every layer, forward: 4 b s^2 L H d, halved for causal attention."""
    return 4.0 * b * s * s * shape.layers * shape.heads * shape.head_dim * (0.5 if shape.causal else 1.0)


def model_flops(shape: Shape, b: int, s: int, kind: str) -> float:
    """Bare-model FLOPs on b*s real tokens. kind: "train" (6N), "needed" (4N, frozen backbone), "forward" (2N)."""
    tokens = b * s
    attn = attention_flops_fwd(shape, b, s)
    if kind == "forward":
        return 2.0 * shape.n_matmul * tokens + attn
    per_token = {"train": 6.0, "needed": 4.0}[kind]
    return per_token * shape.n_matmul * tokens + 3.0 * attn


# ---------------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------------
def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a transformers model."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def make_method(method: str, base: nn.Module, spec: ModelSpec, gc_on: bool, virtual_tokens: int
                ) -> tuple[nn.Module, list[nn.Parameter], dict]:
    """Adapt ``base`` with ``method``; return (model to call, trainable parameters, extra forward kwargs).

    Ours: prompt/prefix/APT with ``virtual_tokens`` tokens, LPT and ID-SPAM with ``virtual_tokens // 2`` (their
    defaults, 10, at the default 20). Baselines: PEFT prompt/prefix tuning with ``virtual_tokens``, PEFT LoRA r=8
    alpha=16 dropout 0 on all linear layers, full fine-tuning. The task head of RoBERTa trains with every method.
    Raises :class:`Refused` where a method refuses checkpointing.
    """
    extra: dict = {"use_cache": False} if spec.causal else {}
    if method in OURS:
        import softprompt as sp

        v2 = max(1, virtual_tokens // 2)
        cfg = {
            "prompt": lambda: sp.PromptTuningConfig(num_virtual_tokens=virtual_tokens),
            "prefix": lambda: sp.PrefixConfig(num_virtual_tokens=virtual_tokens, init="random"),
            "apt": lambda: sp.APTConfig(num_virtual_tokens=virtual_tokens, init="random"),
            "lpt": lambda: sp.LatePromptConfig(num_virtual_tokens=v2),
            "idspam": lambda: sp.IDSPAMConfig(num_virtual_tokens=v2),
        }[method]()
        model = sp.wrap(base, cfg)
        if gc_on:
            model.gradient_checkpointing_enable()
        return model, list(model.trainable_parameters().values()), extra
    if method == "frozen":
        # The floor of every frozen-backbone method: forward + backward through the unchanged model, no adapter.
        # A trainable scalar (zero) is added to the embedding output so that backward runs through every layer;
        # transformers' enable_input_require_grads() would do that with requires_grad_() in a hook, which
        # torch.compile cannot trace (4 graph breaks on RoBERTa), so a compiled floor would not be a floor. Only
        # RoBERTa's classification head trains besides it, as with every method.
        if gc_on:
            enable_checkpointing(base)
        base.requires_grad_(False)
        embed = base.get_input_embeddings()
        anchor = nn.Parameter(torch.zeros((), device=embed.weight.device, dtype=embed.weight.dtype))
        embed.register_forward_hook(lambda _module, _args, output: output + anchor)
        head = [p for n, p in base.named_parameters() if n.startswith("classifier.")]
        for p in head:
            p.requires_grad_(True)
        return base, head + [anchor], extra
    if method == "full_ft":
        if gc_on:
            enable_checkpointing(base)
        for p in base.parameters():
            p.requires_grad_(True)
        return base, list(base.parameters()), extra
    if method.startswith("peft_"):
        import peft

        task = "CAUSAL_LM" if spec.causal else "SEQ_CLS"
        cfg = {
            "peft_prompt": lambda: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=virtual_tokens),
            "peft_prefix": lambda: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=virtual_tokens),
            "peft_lora": lambda: peft.LoraConfig(task_type=task, r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules="all-linear"),
        }[method]()
        if gc_on:
            enable_checkpointing(base)
        try:
            model = peft.get_peft_model(base, cfg)
        except ValueError as exc:
            if gc_on and "checkpointing" in str(exc):
                raise Refused(str(exc)) from None
            raise
        if method == "peft_prefix":
            extra = {}  # PEFT hands the prefix to the model as a KV cache: leave use_cache alone
        return model, [p for p in model.parameters() if p.requires_grad], extra
    raise ValueError(f"unknown method {method!r}; known: {', '.join(ALL_METHODS)}")


def make_inference_model(method: str, base: nn.Module, spec: ModelSpec, virtual_tokens: int
                         ) -> tuple[nn.Module, dict]:
    """bare / our prefix / PEFT prefix, in eval mode, for forward and generate timings."""
    if method == "bare":
        model, extra = base, ({"use_cache": False} if spec.causal else {})
    else:
        model, _, extra = make_method(method, base, spec, False, virtual_tokens)
    model.eval()
    return model, extra


def make_batch(spec: ModelSpec, shape: Shape, b: int, s: int, device: torch.device, labels: bool = True) -> dict:
    """Random token ids (and labels: next-token for causal LMs, a class for RoBERTa)."""
    gen = torch.Generator().manual_seed(1234)
    low = 3 if spec.family == "roberta" else 0  # RoBERTa: never the pad id (1), which would shift positions
    ids = torch.randint(low, shape.vocab, (b, s), generator=gen).to(device)
    batch = {"input_ids": ids}
    if labels:
        batch["labels"] = ids.clone() if spec.causal else torch.randint(0, 2, (b,), generator=gen).to(device)
    return batch


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"8x512,4x2048" -> [(8, 512), (4, 2048)]."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)[xX*](\d+)", part)
        if not m:
            raise SystemExit(f"bad shape {part!r}: expected BATCHxSEQ, e.g. 8x512")
        out.append((int(m.group(1)), int(m.group(2))))
    return out
