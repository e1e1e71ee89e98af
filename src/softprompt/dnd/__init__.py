"""Drag-and-Drop LLMs (prompt -> LoRA weights).

:mod:`.templates` and :mod:`.cloze` (prompt formats), :mod:`.harness` (letter-format scoring, data splits),
:mod:`.zoo` (``build_zoo``), :mod:`.tokenizer`, :mod:`.condition`, :mod:`.generator`, :mod:`.export`; the CLI
handlers live in :mod:`.cli`. See ``docs/dnd.md``.
"""
from __future__ import annotations

from .harness import (
                      dnd_records,
                      dnd_split_info,
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
]
