"""Drag-and-Drop LLMs (prompt -> LoRA weights): evaluation harness, templates, checkpoint zoo.

Part A (this engineer): :mod:`.templates`, :mod:`.harness` (``evaluate``, ``eval_main``),
:mod:`.zoo` (``build_zoo``, ``zoo_main``). See ``docs/dnd.md``.
"""
from __future__ import annotations

from .harness import (
                      dnd_records,
                      dnd_split_info,
                      eval_main,
                      evaluate,
                      evaluate_items,
                      generate_answers,
                      load_model,
                      load_records,
                      option_logliks,
                      parse_answer,
)
from .templates import (
                      DATASETS,
                      Prompted,
                      canonical_name,
                      format_dataset,
                      format_example,
)
from .zoo import (
                      ALL_TARGETS,
                      build_zoo,
                      dataset_dirname,
                      load_manifest,
                      parse_targets,
                      zoo_main,
)

__all__ = [
                      "ALL_TARGETS",
                      "DATASETS",
                      "Prompted",
                      "build_zoo",
                      "canonical_name",
                      "dataset_dirname",
                      "dnd_records",
                      "dnd_split_info",
                      "eval_main",
                      "evaluate",
                      "evaluate_items",
                      "format_dataset",
                      "format_example",
                      "generate_answers",
                      "load_manifest",
                      "load_model",
                      "load_records",
                      "option_logliks",
                      "parse_answer",
                      "parse_targets",
                      "zoo_main",
]
