"""Late prompt tuning (Liu et al., arXiv 2210.11292): a prompt inserted before a middle layer m, static or from
LPT's instance-dependent generator."""

from .config import LatePromptConfig
from .module import LatePrompt

__all__ = ["LatePrompt", "LatePromptConfig"]
