"""The prefix bank: a folder of independently trained source-task prefix adapters plus ``manifest.json``.

Layout::

    BANK/
      manifest.json            {"format_version", "base_model", "max_length", "entries": [...]}
      .manifest.lock           fcntl lock file: serialises manifest updates between processes
      prefixes/<entry id>/     a normal softprompt adapter (adapter_config.json, adapter_model.safetensors,
                               metrics.json)
      cache/                   the feature cache (see :mod:`softprompt.represent.cache`)

Training a prefix takes minutes to hours and touches nothing shared, so it runs *outside* the lock, into a private
temporary folder; only the final rename into ``prefixes/`` and the manifest rewrite happen under the lock. Several
processes can therefore train different tasks at the same time and register them without losing each other's entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, SoftPromptError
from ..io import CONFIG_NAME, WEIGHTS_NAME, atomic_write_json, read_adapter_config

if TYPE_CHECKING:
    import torch

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".manifest.lock"
PREFIX_DIR = "prefixes"
CACHE_DIR = "cache"
BANK_FORMAT = 1


class BankError(SoftPromptError):
    """A prefix-bank problem: unknown or duplicate task, wrong base model, unreadable manifest."""


def entry_id(task: str) -> str:
    """Folder-safe id of a task name (``glue/sst2`` -> ``glue__sst2``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task.replace("/", "__")).strip("._") or "task"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (the identity of a prefix in the feature cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class BankEntry:
    """One registered source-task prefix.

    id: folder name under ``prefixes/`` (derived from the task name).
    task: registry task name or a user label (with ``source`` naming the file it was trained on).
    adapter: adapter folder relative to the bank root.
    sha256: hash of ``adapter_model.safetensors``; feature-cache blocks are keyed by it, so retraining a task under
        the same name can never serve stale features.
    prefix_length / layer_lengths: prefix length per layer (entries with equal ``layer_lengths`` share a batched pass).
    steps / train_seconds: training cost, for the update experiment.
    metrics: the source task's evaluation metrics (``eval_*``) as written by ``train()``.
    """

    id: str
    task: str
    adapter: str
    sha256: str
    base_model: str
    prefix_length: int
    layer_lengths: list[int]
    steps: int = 0
    train_seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    seed: int | None = None
    added_at: float = 0.0

    @classmethod
    def from_dict(cls, data: dict) -> BankEntry:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


class PrefixBank:
    """Read and update a bank folder. Reads are lock-free (the manifest is replaced atomically)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ---- reading ---------------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def cache_dir(self) -> Path:
        return self.path / CACHE_DIR

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict:
        """The manifest (an empty one for a new bank)."""
        if not self.manifest_path.is_file():
            return {"format_version": BANK_FORMAT, "base_model": None, "max_length": None, "entries": []}
        try:
            data = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BankError(f"{self.manifest_path} is not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise BankError(f"{self.manifest_path} has no 'entries' list: not a prefix-bank manifest")
        if int(data.get("format_version", 1)) > BANK_FORMAT:
            raise BankError(f"{self.manifest_path} has format_version {data['format_version']}; upgrade softprompt")
        return data

    def entries(self) -> list[BankEntry]:
        return [BankEntry.from_dict(e) for e in self.read_manifest()["entries"]]

    @property
    def base_model(self) -> str:
        model = self.read_manifest().get("base_model")
        if not model:
            raise BankError(f"bank {self.path} is empty: add a task first (softprompt bank add --bank {self.path} ...)")
        return model

    @property
    def max_length(self) -> int:
        return int(self.read_manifest().get("max_length") or 128)

    def get(self, task_or_id: str) -> BankEntry:
        for e in self.entries():
            if task_or_id in (e.task, e.id):
                return e
        known = [e.task for e in self.entries()]
        raise BankError(f"task {task_or_id!r} is not in bank {self.path}; it holds {known}")

    def select(self, tasks: list[str] | None) -> list[BankEntry]:
        """Entries in manifest order (``tasks`` None) or in the given order."""
        return self.entries() if tasks is None else [self.get(t) for t in tasks]

    def adapter_dir(self, entry: BankEntry) -> Path:
        return self.path / entry.adapter

    # ---- locking ---------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[dict]:
        """Hold the bank's exclusive lock; yields the current manifest (write it back with :meth:`_write`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_NAME, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield self.read_manifest()
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, manifest)

    # ---- updating --------------------------------------------------------------------------------------------------
    def check_can_add(self, task: str, model: str, replace: bool = False) -> None:
        """Fail early (before any training) on a duplicate task or a different base model."""
        manifest = self.read_manifest()
        if manifest.get("base_model") and manifest["base_model"] != model:
            raise BankError(
                f"bank {self.path} holds prefixes for base model {manifest['base_model']!r}, not {model!r}: all "
                "prefixes of a bank must share one frozen encoder (use another --bank folder)"
            )
        if not replace and any(e["task"] == task or e["id"] == entry_id(task) for e in manifest["entries"]):
            raise BankError(f"task {task!r} is already in bank {self.path}; pass --replace to retrain it")

    def staging_dir(self, task: str) -> Path:
        """A private folder to train into (renamed into place by :meth:`register`)."""
        root = self.path / PREFIX_DIR
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{entry_id(task)}-", dir=root))

    def register(self, adapter_dir: str | os.PathLike, *, task: str, model: str, max_length: int,
                 metrics: dict | None = None, source: str | None = None, replace: bool = False,
                 move: bool = True) -> BankEntry:
        """Add a trained prefix adapter under the lock (moving or copying its folder into ``prefixes/``)."""
        adapter_dir = Path(adapter_dir)
        config = read_adapter_config(adapter_dir)
        if config.get("method") != "prefix":
            raise BankError(f"{adapter_dir} is a {config.get('method')!r} adapter; a prefix bank holds prefix adapters")
        method_cfg = config["config"]
        num_layers = int(config["base_model"]["num_layers"])
        from ..methods import PrefixConfig

        lengths = PrefixConfig.from_dict(dict(method_cfg)).lengths(num_layers)
        metrics = dict(metrics or {})
        eid = entry_id(task)
        with self.locked() as manifest:
            if manifest.get("base_model") and manifest["base_model"] != model:
                raise BankError(f"bank {self.path} uses base model {manifest['base_model']!r}, not {model!r}")
            if manifest.get("max_length") and int(manifest["max_length"]) != int(max_length):
                raise BankError(
                    f"bank {self.path} encodes with max_length {manifest['max_length']}, not {max_length}: all "
                    "prefixes of a bank share one encoding setting"
                )
            old = [e for e in manifest["entries"] if e["id"] == eid or e["task"] == task]
            if old and not replace:
                raise BankError(f"task {task!r} is already in bank {self.path}; pass --replace to retrain it")
            final = self.path / PREFIX_DIR / eid
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                # Left over from a removed or replaced entry; the manifest no longer points at it.
                shutil.rmtree(final)
            if move:
                os.replace(adapter_dir, final)
            else:
                shutil.copytree(adapter_dir, final)
            entry = BankEntry(
                id=eid, task=task, adapter=f"{PREFIX_DIR}/{eid}", sha256=file_sha256(final / WEIGHTS_NAME),
                base_model=model, prefix_length=max(lengths), layer_lengths=lengths,
                steps=int(metrics.get("steps", 0) or 0), train_seconds=float(metrics.get("train_seconds", 0.0) or 0),
                metrics={k: v for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, (int, float))},
                source=source, seed=metrics.get("seed"), added_at=time.time(),
            )
            manifest["entries"] = [e for e in manifest["entries"] if e not in old] + [asdict(entry)]
            manifest["base_model"] = model
            manifest["max_length"] = int(max_length)
            manifest["format_version"] = BANK_FORMAT
            self._write(manifest)
        if old:
            from .cache import FeatureCache

            FeatureCache(self.cache_dir).drop_entries([o["sha256"] for o in old if o["sha256"] != entry.sha256])
        return entry

    def remove(self, task: str, *, keep_cache: bool = False) -> BankEntry:
        """Unregister a task, delete its adapter folder and (unless ``keep_cache``) its cached feature blocks.

        Nothing is recomputed: other tasks' cached blocks stay valid under ``concat``.
        """
        with self.locked() as manifest:
            match = [e for e in manifest["entries"] if task in (e["task"], e["id"])]
            if not match:
                raise BankError(f"task {task!r} is not in bank {self.path}; it holds "
                                f"{[e['task'] for e in manifest['entries']]}")
            entry = BankEntry.from_dict(match[0])
            manifest["entries"] = [e for e in manifest["entries"] if e is not match[0]]
            self._write(manifest)
            shutil.rmtree(self.path / entry.adapter, ignore_errors=True)
        if not keep_cache:
            from .cache import FeatureCache

            FeatureCache(self.cache_dir).drop_entries([entry.sha256])
        return entry

    def describe(self) -> str:
        """A printable table of the entries."""
        manifest = self.read_manifest()
        rows = [("task", "prefix", "steps", "seconds", "main metric", "sha256")]
        for e in self.entries():
            main = next((f"{k[5:]}={v:.4f}" for k, v in e.metrics.items() if k == "eval_main"), "")
            if not main:
                main = next((f"{k[5:]}={v:.4f}" for k, v in sorted(e.metrics.items())
                             if k not in ("eval_loss", "eval_runtime") and not k.endswith("per_second")), "")
            rows.append((e.task, str(e.prefix_length), str(e.steps), f"{e.train_seconds:.1f}", main, e.sha256[:12]))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [(f"bank {self.path}: base model {manifest.get('base_model')}, "
                  f"max_length {manifest.get('max_length')}, {len(rows) - 1} prefix(es)")]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)


def add_task(bank: str | os.PathLike, task: str, *, model: str = "minilm", file: str | None = None,
             eval_file: str | None = None, text_column: str = "text", text_pair_column: str | None = None,
             label_column: str = "label", num_virtual_tokens: int = 10, epochs: float = 3.0, max_steps: int = -1,
             lr: float | None = None, batch_size: int = 32, max_length: int | None = None,
             train_limit: int | None = None, eval_limit: int | None = None, seed: int = 42,
             data_dir: str | None = None, replace: bool = False, bf16: bool = False,
             method_options: dict | None = None) -> BankEntry:
    """Train one source-task prefix with the frozen encoder (``softprompt train --method prefix``) and register it.

    Only this task's prefix (and its linear head, which the bank keeps but never uses for features) trains; the
    other entries are never touched, so ``add_task`` calls for different tasks may run in parallel processes.
    """
    from ..train import TrainConfig, train

    pb = PrefixBank(bank)
    pb.check_can_add(task, model, replace)
    existing = pb.read_manifest().get("max_length")
    if max_length is None:
        max_length = int(existing or 128)
    if num_virtual_tokens < 1:
        raise ConfigError(f"num_virtual_tokens must be >= 1 for a bank entry, got {num_virtual_tokens}")
    staging = pb.staging_dir(task)
    try:
        cfg = TrainConfig(
            method="prefix", model=model, output=str(staging), task=None if file else task, file=file,
            eval_file=eval_file, text_column=text_column, text_pair_column=text_pair_column,
            label_column=label_column, data_dir=data_dir, epochs=epochs, max_steps=max_steps, lr=lr,
            batch_size=batch_size, max_length=max_length, train_limit=train_limit, eval_limit=eval_limit,
            seed=seed, bf16=bf16, logging_steps=10**9,
            # The run's seed also seeds the prefix initialisation (PrefixConfig.seed), so seeds differ in init too.
            method_options={"num_virtual_tokens": num_virtual_tokens, "seed": seed, **(method_options or {})},
        )
        metrics = train(cfg)
        for name in os.listdir(staging):  # Trainer checkpoints are not part of the entry
            if name.startswith("checkpoint-"):
                shutil.rmtree(staging / name)
        return pb.register(staging, task=task, model=model, max_length=max_length, metrics=metrics,
                           source=file, replace=replace)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def load_prefix_tables(adapter_dir: str | os.PathLike) -> dict[int, torch.Tensor]:
    """layer -> [2, H_kv, P, D] key/value table of a saved prefix adapter (projection MLPs are already folded)."""
    from ..io import read_adapter_tensors

    config = read_adapter_config(adapter_dir)
    if config.get("method") != "prefix":
        raise BankError(f"{adapter_dir}/{CONFIG_NAME}: method {config.get('method')!r} is not 'prefix'")
    tensors = read_adapter_tensors(adapter_dir)
    tables = {int(k.split(".")[2]): v for k, v in tensors.items() if k.startswith("method.tables.")}
    if not tables:
        raise BankError(f"{adapter_dir}: no method.tables.* tensors in {WEIGHTS_NAME}")
    return tables
