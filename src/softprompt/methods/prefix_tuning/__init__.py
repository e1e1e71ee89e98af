"""Prefix tuning / P-tuning v2 (Li & Liang, arXiv 2101.00190; Liu et al., arXiv 2110.07602): deep key/value
prefixes at every (or chosen) layer."""

from .config import PrefixConfig
from .module import PrefixTuning

__all__ = ["PrefixConfig", "PrefixTuning"]
