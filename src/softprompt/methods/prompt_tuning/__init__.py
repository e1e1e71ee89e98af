"""Prompt tuning (Lester et al., arXiv 2104.08691): t learned vectors in front of the token embeddings."""

from .config import PromptTuningConfig
from .module import PromptTuning, init_prompt_table

__all__ = ["PromptTuning", "PromptTuningConfig", "init_prompt_table"]
