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

from .adapters import LoadedAdapter, MultiStats, UnknownAdapterError
from .heads import PAD_LOGIT
from .model import MultiAdapterModel
from .plan import ENGINE_PREFIX_MASK, AdapterShape, adapter_shape

__all__ = [
    "ENGINE_PREFIX_MASK",
    "PAD_LOGIT",
    "AdapterShape",
    "LoadedAdapter",
    "MultiAdapterModel",
    "MultiStats",
    "UnknownAdapterError",
    "adapter_shape",
]
