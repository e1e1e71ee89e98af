"""APT (Zhang et al., arXiv 2305.15212): prefixes scaled by token-level gates and a layer scalar.

``config`` (options), ``module`` (the gated prefixes), ``tools`` (gate probing, heat maps, PT-2* lengths) and
``cli`` (``softprompt gates`` / ``softprompt prune``).
"""

from .config import GATE_INITS, GATE_POOLS, GATE_TARGETS, APTConfig
from .module import APT

__all__ = ["APT", "GATE_INITS", "GATE_POOLS", "GATE_TARGETS", "APTConfig"]
