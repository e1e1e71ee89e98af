"""What a sequence-classification head reads: the model's own pooler, or a masked mean of the last hidden states.

Chosen at training time (``TrainConfig.readout``), saved in the adapter (``readout``), and applied again wherever
the adapter is loaded: ``softprompt.load``, evaluation, serving.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

# What a sequence-classification head reads. "pooler": the model's own pooler (BERT: tanh(W h_[CLS]), frozen);
# "mean": the masked mean of the last hidden states over every attended position (input prompts included, insertions
# removed by the engine before the end). Sentence-embedding models such as all-MiniLM-L6-v2 were trained for mean
# pooling, and a frozen pooler is a readout that LoRA can adapt but prompt methods cannot.
READOUTS = ("pooler", "mean")


class MeanPoolReadout(torch.nn.Module):
    """Stands in for a BERT-style pooler: masked mean of the last hidden states. No parameters, so adapters keep
    only the classifier as their head; the padding mask is the one the backbone was last called with."""

    def __init__(self):
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from .pooling import masked_mean

        mask = self.mask if self.mask is not None and self.mask.shape == hidden.shape[:2] else None
        return masked_mean(hidden, mask)


def apply_readout(model: torch.nn.Module, readout: str) -> None:
    """Make ``model``'s classification head read ``readout`` (in place). "mean" needs a backbone with a ``pooler``
    (the BERT family); "pooler" leaves the model as it is."""
    if readout not in READOUTS:
        raise ConfigError(f"readout must be one of {READOUTS}, got {readout!r}")
    if readout == "pooler":
        return
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if backbone is None or not isinstance(getattr(backbone, "pooler", None), torch.nn.Module):
        raise ConfigError(f"readout='mean' needs a model whose backbone has a pooler (BERT family); "
                          f"{type(model).__name__} has none: use readout='pooler'")
    pool = MeanPoolReadout()
    backbone.pooler = pool

    def keep_mask(module, args, kwargs):
        # The classification model calls its backbone with attention_mask as a keyword (or second positional).
        pool.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    backbone.register_forward_pre_hook(keep_mask, with_kwargs=True)


def current_readout(model: torch.nn.Module) -> str:
    """The readout ``model``'s classification head reads now."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return "mean" if isinstance(getattr(backbone, "pooler", None), MeanPoolReadout) else "pooler"


def ensure_readout(model: torch.nn.Module, readout: str, where: str) -> None:
    """Give ``model`` the readout an adapter was trained with: a pooler base becomes a mean base when needed; a base
    already switched to another readout cannot be switched back, so that is an error naming both."""
    have = current_readout(model)
    if have == readout:
        return
    if have == "pooler":
        apply_readout(model, readout)
        return
    raise ConfigError(f"{where} was trained with readout {readout!r} but this base model already reads {have!r}; "
                      "load it on a fresh base model")
