"""R(x) with caching: which representation (:class:`FeatureSpec`) and how to compute it (:class:`Representer`).

Kinds of representation, all pooled from the bare encoder:

* ``concat``: [r_1(x); ...; r_T(x)] over the bank's prefixes (T*h dims), one cached block per bank entry;
* ``joint``: the pooled output with all T prefixes at once (h dims), one cached block per combination of entries;
* ``frozen``: the base encoder without any prefix (h dims), the frozen-PLM baseline;
* ``encoder``: a fine-tuned encoder folder without prefixes (h dims), the multi-task baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from .bank import BankEntry, PrefixBank, load_prefix_tables
from .cache import FeatureCache, text_hash
from .encoder import POOLS, EncodeStats, PrefixEncoder, Text, as_texts

KINDS = ("concat", "joint", "frozen", "encoder")


@dataclass
class FeatureSpec:
    """A serialisable description of one representation (stored with every probe so it can be recomputed).

    kind: concat | joint | frozen | encoder.
    bank: prefix-bank folder (concat/joint; for frozen it supplies the base model and the cache folder).
    model: base model for ``frozen`` (default: the bank's).
    encoder: fine-tuned encoder folder for ``encoder``.
    entries: bank tasks to use, in order (None: every entry, in manifest order, at compute time).
    pool: cls | mean. max_length: tokens per text (default: the bank's encoding length, else 128).
    """

    kind: str = "concat"
    bank: str | None = None
    model: str | None = None
    encoder: str | None = None
    entries: list[str] | None = None
    pool: str = "cls"
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"feature kind must be one of {KINDS}, got {self.kind!r}")
        if self.pool not in POOLS:
            raise ConfigError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.kind in ("concat", "joint") and not self.bank:
            raise ConfigError(f"--combine {self.kind} needs --bank DIR")
        if self.kind == "encoder" and not self.encoder:
            raise ConfigError("feature kind 'encoder' needs --encoder DIR (a fine-tuned encoder folder)")
        if self.kind == "frozen" and not (self.model or self.bank):
            raise ConfigError("frozen features need --model NAME or --bank DIR (whose base model is used)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


_FINGERPRINTS: dict[tuple, str] = {}


def model_identity(name: str) -> str:
    """Cache identity of a model: the hash of a local folder's weights (fine-tuned encoders change), else the name."""
    from .. import resources

    if name in resources.ALIASES:
        return name
    p = Path(name)
    weights = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    if not weights:
        return name
    key = tuple((str(w), w.stat().st_size, w.stat().st_mtime_ns) for w in weights)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        for w in weights:
            with open(w, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
        _FINGERPRINTS[key] = "sha256:" + h.hexdigest()
    return _FINGERPRINTS[key]


class Representer:
    """Compute R(x) for a :class:`FeatureSpec`, serving every block it can from the cache.

    Only blocks (and rows) that are missing are computed: after ``bank add`` only the new entry's block is
    encoded for an already encoded corpus; after ``bank remove`` nothing is. The encoder is loaded lazily, so a
    fully cached request never loads a model.

    cache_dir: default ``<bank>/cache``; for banks-less specs (``encoder`` without a bank) ``<encoder>/feature-cache``.
    """

    def __init__(self, spec: FeatureSpec, *, cache_dir: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32, batch_size: int = 32,
                 progress: bool = True, use_cache: bool = True):
        self.spec = spec
        self.bank = PrefixBank(spec.bank) if spec.bank else None
        if cache_dir is None:
            cache_dir = self.bank.cache_dir if self.bank else Path(spec.encoder or ".") / "feature-cache"
        self.cache = FeatureCache(cache_dir)
        self.use_cache = use_cache
        self.device, self.dtype, self.batch_size, self.progress = device, dtype, batch_size, progress
        self._encoders: dict[str, PrefixEncoder] = {}
        self._tables: dict[str, dict] = {}
        self.stats = EncodeStats()
        self.layout: list[tuple[str, int]] = []  # (block name, dims) of the last result, in column order

    # ---- settings --------------------------------------------------------------------------------------------------
    @property
    def base_model(self) -> str:
        if self.spec.kind == "encoder":
            return str(self.spec.encoder)
        if self.spec.kind == "frozen" and self.spec.model:
            return self.spec.model
        return self.bank.base_model  # type: ignore[union-attr]

    @property
    def max_length(self) -> int:
        if self.spec.max_length:
            return int(self.spec.max_length)
        if self.bank is not None and self.bank.exists():
            return self.bank.max_length
        return 128

    def entries(self) -> list[BankEntry]:
        if self.bank is None:
            return []
        entries = self.bank.select(self.spec.entries)
        if not entries and self.spec.kind in ("concat", "joint"):
            raise ConfigError(f"bank {self.bank.path} has no entries: add a task first")
        return entries

    def encoder(self, model: str | None = None) -> PrefixEncoder:
        """The (lazily loaded) encoder of ``model`` (default: this spec's)."""
        model = model or self.base_model
        if model not in self._encoders:
            enc = PrefixEncoder(model, device=self.device, dtype=self.dtype, max_length=self.max_length,
                                batch_size=self.batch_size, progress=self.progress)
            enc.stats = self.stats  # one counter for everything this representer runs
            self._encoders[model] = enc
        return self._encoders[model]

    def share_encoder(self, encoder: PrefixEncoder) -> None:
        """Reuse an already loaded encoder (same model and max length) instead of loading another copy."""
        encoder.stats = self.stats
        encoder.max_length = self.max_length
        self._encoders[encoder.model_name] = encoder

    def tables(self, entry: BankEntry) -> dict:
        if entry.sha256 not in self._tables:
            self._tables[entry.sha256] = load_prefix_tables(self.bank.adapter_dir(entry))  # type: ignore[union-attr]
        return self._tables[entry.sha256]

    def _meta(self, kind: str, entries: Sequence[BankEntry] = (), model: str | None = None) -> dict:
        return {"kind": kind, "entries": [e.sha256 for e in entries], "tasks": [e.task for e in entries],
                "model": model_identity(model or self.base_model), "pool": self.spec.pool,
                "max_length": self.max_length}

    # ---- computing -------------------------------------------------------------------------------------------------
    def features(self, texts: Sequence) -> torch.Tensor:
        """R(x) for every text: [n, D] float32 (rows in input order)."""
        texts = as_texts(texts)
        if not texts:
            raise ValueError("no texts to represent")
        hashes = [text_hash(t, p) for t, p in texts]
        kind = self.spec.kind
        if kind == "concat":
            entries = self.entries()
            metas = [self._meta("prefix", [e], self.bank.base_model) for e in entries]  # type: ignore[union-attr]
            blocks = self._cached_blocks(texts, hashes, metas, entries)
            self.layout = [(e.task, b.shape[1]) for e, b in zip(entries, blocks)]
            return torch.cat(blocks, dim=1)
        if kind == "joint":
            entries = self.entries()
            meta = self._meta("joint", entries, self.bank.base_model)  # type: ignore[union-attr]
            out = self._one_block(texts, hashes, meta, lambda sub: self.encoder().encode_joint(
                sub, [self.tables(e) for e in entries], self.spec.pool))
            self.layout = [("joint:" + "+".join(e.task for e in entries), out.shape[1])]
            return out
        model = self.base_model
        meta = self._meta("plain", (), model)
        out = self._one_block(texts, hashes, meta, lambda sub: self.encoder(model).encode_plain(sub, self.spec.pool))
        self.layout = [(kind, out.shape[1])]
        return out

    def _one_block(self, texts: list[Text], hashes: list[bytes], meta: dict, compute) -> torch.Tensor:
        cached, missing = self.cache.lookup(meta, hashes) if self.use_cache else (None, list(range(len(texts))))
        if not missing:
            return cached  # type: ignore[return-value]
        uniq = _unique(missing, hashes)
        new = compute([texts[i] for i in uniq])
        if self.use_cache:
            self.cache.store(meta, [hashes[i] for i in uniq], new)
        self.stats.blocks.append(meta["kind"] + ":" + ",".join(meta["tasks"]))
        return _fill(cached, missing, uniq, hashes, new, len(texts))

    def _cached_blocks(self, texts: list[Text], hashes: list[bytes], metas: list[dict],
                       entries: list[BankEntry]) -> list[torch.Tensor]:
        """One block per entry; entries missing the same rows are computed together in one batched pass."""
        found: list[tuple[torch.Tensor | None, list[int]]] = [
            self.cache.lookup(m, hashes) if self.use_cache else (None, list(range(len(texts)))) for m in metas
        ]
        todo: dict[tuple[int, ...], list[int]] = {}
        for j, (_, missing) in enumerate(found):
            if missing:
                todo.setdefault(tuple(missing), []).append(j)
        blocks: list[torch.Tensor | None] = [c if not m else None for c, m in found]
        for missing_t, members in todo.items():
            missing = list(missing_t)
            uniq = _unique(missing, hashes)
            enc = self.encoder(self.bank.base_model)  # type: ignore[union-attr]
            new = enc.encode_concat([texts[i] for i in uniq], [self.tables(entries[j]) for j in members],
                                    self.spec.pool)
            h = new.shape[1] // len(members)
            for k, j in enumerate(members):
                part = new[:, k * h : (k + 1) * h]
                if self.use_cache:
                    self.cache.store(metas[j], [hashes[i] for i in uniq], part)
                self.stats.blocks.append("prefix:" + entries[j].task)
                blocks[j] = _fill(found[j][0], missing, uniq, hashes, part, len(texts))
        return blocks  # type: ignore[return-value]


def _unique(positions: list[int], hashes: list[bytes]) -> list[int]:
    """First position of each distinct text among ``positions`` (duplicates are encoded once)."""
    seen: set[bytes] = set()
    out = []
    for i in positions:
        if hashes[i] not in seen:
            seen.add(hashes[i])
            out.append(i)
    return out


def _fill(cached: torch.Tensor | None, missing: list[int], uniq: list[int], hashes: list[bytes],
          new: torch.Tensor, n: int) -> torch.Tensor:
    out = cached if cached is not None else torch.zeros(n, new.shape[1])
    row_of = {hashes[i]: k for k, i in enumerate(uniq)}
    out[missing] = new[[row_of[hashes[i]] for i in missing]]
    return out


def save_features(path: str | os.PathLike, feats: torch.Tensor, *, spec: FeatureSpec, layout: list[tuple[str, int]],
                  texts: Sequence[Text]) -> None:
    """Write ``features`` [n, D] and per-row text hashes to safetensors; the spec and block layout go into metadata."""
    import json

    from ..io import atomic_save_tensors

    keys = torch.tensor([list(text_hash(t, p)) for t, p in texts], dtype=torch.uint8)
    meta = {"spec": json.dumps(spec.to_dict()), "layout": json.dumps(layout), "format": "pt"}
    atomic_save_tensors(path, {"features": feats, "text_hashes": keys}, metadata=meta)
