"""P-tuning (Liu et al., arXiv 2103.10385): an input-layer prompt produced by a reparameterising encoder."""

from .config import PTuningConfig
from .module import PTuning

__all__ = ["PTuning", "PTuningConfig"]
