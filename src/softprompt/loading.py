"""Base models and tokenizers, loaded the same way by training, evaluation, serving and the labs.

``load_base(name, HeadSpec(kind, label_names))`` gives the frozen model with the head of a task kind;
``load_tokenizer(name)`` its tokenizer, padded on the side the model reads (decoders: left);
``load_for_inference(adapter_dir)`` rebuilds base model, tokenizer and adapter from an adapter folder.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from . import resources
from .errors import ConfigError
from .io import read_adapter_config
from .model import SoftPromptModel
from .readout import apply_readout

# Model types that are causal decoders even when their config does not say ``is_decoder``.
DECODER_TYPES = {"llama", "gpt2", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "opt", "gpt_neox"}


@dataclass
class HeadSpec:
    """The task head a base model is loaded with: the task kind and its label names (classification)."""

    kind: str = "classification"
    label_names: list = field(default_factory=list)


def is_decoder_config(config: Any) -> bool:
    """Whether a transformers config describes a causal decoder."""
    return bool(getattr(config, "is_decoder", False)) or config.model_type in DECODER_TYPES


def padding_side(is_decoder: bool) -> str:
    """Decoders are padded on the left: their last-token heads and ``generate()`` read the right end."""
    return "left" if is_decoder else "right"


def model_class_for(kind: str, is_decoder: bool):
    """The transformers Auto class that carries the head of a task kind."""
    import transformers as tf

    if kind in ("classification", "regression"):
        return tf.AutoModelForSequenceClassification
    if kind == "causal_lm":
        if not is_decoder:
            raise ValueError("text generation (task kind causal_lm) needs a decoder model, e.g. smollm2")
        return tf.AutoModelForCausalLM
    if kind == "token_classification":
        return tf.AutoModelForTokenClassification
    if kind == "multiple_choice":
        if is_decoder:
            raise ValueError("multiple-choice heads exist for encoders only; use an encoder model (e.g. minilm)")
        return tf.AutoModelForMultipleChoice
    raise ValueError(f"unknown task kind {kind!r}")


def load_tokenizer(model_name: str, *, is_decoder: bool | None = None):
    """The tokenizer of ``model_name`` with a pad token (EOS when it has none) and, when ``is_decoder`` is given,
    the padding side the model reads."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resources.resolve(model_name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if is_decoder is not None:
        tok.padding_side = padding_side(is_decoder)
    return tok


@contextlib.contextmanager
def quiet_loading():
    """Load without transformers' report of the task head it had to create ("classifier MISSING ... Consider
    training"): the head is ours to train, or it is loaded from the adapter right after. Real warnings of other
    libraries stay visible."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_base(model_name: str, spec: HeadSpec, *, dtype=torch.float32, head_seed: int = 0, readout: str = "pooler"):
    """``(model, is_decoder)``: the base model with the head for ``spec.kind`` (num_labels from the task).

    The head's random initialisation is drawn right after ``torch.manual_seed(head_seed)``: it is part of the
    experiment (training passes the run's seed). ``readout`` (``softprompt.readout.READOUTS``): what the
    classification head reads; "mean" swaps the model's pooler for a masked mean of the last hidden states.
    """
    from transformers import AutoConfig

    path = resources.resolve(model_name)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot load model {model_name!r}: it is not an alias ({', '.join(resources.ALIASES)}), not a folder "
            "with a config.json, and the Hugging Face Hub is offline here; give --model an alias or a model folder"
        ) from exc
    is_decoder = is_decoder_config(config)
    cls = model_class_for(spec.kind, is_decoder)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.kind in ("classification", "token_classification"):
        kwargs["num_labels"] = len(spec.label_names)
        kwargs["id2label"] = dict(enumerate(spec.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(spec.label_names)}
        if spec.kind == "classification" and len(spec.label_names) > 1:
            # What transformers' sequence-classification heads would write into their config at the first forward
            # (our labels are class ids): set now, a compiled forward does not see the config change under it and
            # compile a second time.
            kwargs["problem_type"] = "single_label_classification"
    elif spec.kind == "regression":
        kwargs.update(num_labels=1, problem_type="regression")
    torch.manual_seed(head_seed)
    with quiet_loading():
        model = cls.from_pretrained(path, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = load_tokenizer(model_name).pad_token_id
    apply_readout(model, readout)
    return model, is_decoder


def load_for_inference(adapter: str | os.PathLike, base_model: str | None = None):
    """``(model, tokenizer, meta)``: base model, tokenizer and adapter rebuilt from an adapter folder.

    ``base_model`` (alias, folder or Hub name) replaces the base recorded in the adapter, e.g. when the adapter was
    trained on another machine where the model lived elsewhere; the adapter is still checked against it.
    """
    meta = read_adapter_config(adapter)
    model_name = base_model or meta.get("model_name") or meta["base_model"]["name_or_path"]
    if base_model is None and os.path.isabs(model_name) and not os.path.exists(model_name):
        raise FileNotFoundError(
            f"the base model recorded in {adapter} ({model_name}) does not exist on this machine; pass "
            f"--base-model PATH_OR_ALIAS (Python: base_model=...) with the same model"
        )
    spec = HeadSpec(meta.get("task_kind", "classification"), meta.get("label_names") or [])
    base, is_decoder = load_base(model_name, spec, readout=meta.get("readout", "pooler"))
    tokenizer = load_tokenizer(model_name, is_decoder=is_decoder)
    return SoftPromptModel.from_pretrained(base, adapter, tokenizer=tokenizer), tokenizer, meta
