"""Task registry: offline benchmark readers, user files, derived splits and metrics.

Pure data + metrics (no model code). ``datasets`` is imported only for a Hub fallback.

>>> from softprompt import tasks
>>> recs = tasks.load_split("glue/sst2", "dev")    # [{"idx", "text", "text_pair", "label"}, ...]
>>> spec = tasks.get_task("glue/sst2")
>>> tasks.compute_metrics(spec, [r["label"] for r in recs], [r["label"] for r in recs])["main"]
1.0
"""
from __future__ import annotations

from ._io import clear_cache
from .datadir import ENV_VAR, resolve_data_dir
from .errors import (
    DataNotFoundError,
    HubUnavailableError,
    LabelError,
    MalformedRowError,
    MalformedRowWarning,
    MissingColumnError,
    NoDataError,
    TaskError,
    UnknownSplitError,
    UnknownTaskError,
)
from .metrics import (
    accuracy,
    compute_metrics,
    entity_f1,
    entity_scores,
    f1_binary,
    macro_f1,
    matthews_corrcoef,
    pearson,
    spearman,
)
from .registry import (
    derived_split_indices,
    describe_tasks,
    get_task,
    list_tasks,
    load_split,
    save_split_indices,
)
from .spec import SplitDerivation, TaskSpec
from .user_files import load_file

__all__ = [
    "ENV_VAR",
    "DataNotFoundError",
    "HubUnavailableError",
    "LabelError",
    "MalformedRowError",
    "MalformedRowWarning",
    "MissingColumnError",
    "NoDataError",
    "SplitDerivation",
    "TaskError",
    "TaskSpec",
    "UnknownSplitError",
    "UnknownTaskError",
    "accuracy",
    "clear_cache",
    "compute_metrics",
    "derived_split_indices",
    "describe_tasks",
    "entity_f1",
    "entity_scores",
    "f1_binary",
    "get_task",
    "list_tasks",
    "load_file",
    "load_split",
    "macro_f1",
    "matthews_corrcoef",
    "pearson",
    "resolve_data_dir",
    "save_split_indices",
    "spearman",
]
