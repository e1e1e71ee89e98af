"""Builders of test_id_spam*.py: a ModelInfo of a given hidden size, no model needed."""

from __future__ import annotations

from softprompt.engine.injector import ModelInfo


def info(n: int, layers: int = 12, causal: bool = False) -> ModelInfo:
    """A ModelInfo of hidden size n (no model needed: the generator only reads the shapes)."""
    return ModelInfo(model_type="roberta", num_layers=layers, hidden_size=n, num_heads=max(1, n // 64),
                     num_kv_heads=max(1, n // 64), head_dim=64, is_causal=causal, max_positions=514,
                     has_rotary=False)
