"""Feature cache: per-block safetensors shards keyed by (block identity, text hash).

A *block* is the feature matrix of one representation component: one bank entry under ``concat`` (keyed by the
SHA-256 of its adapter file), one ``joint`` combination (keyed by the ordered entry hashes), or a prefix-free
encoder (keyed by the model's identity). Every block key also covers the base model, the pooling and the max length.

Layout::

    CACHE/<block key>/meta.json                       what the block is (and which bank entries it depends on)
    CACHE/<block key>/shard-<time>-<rand>.safetensors  {"keys": uint8 [n, 16] text hashes, "features": f32 [n, d]}

New texts are appended as new shards (written atomically, uniquely named), so concurrent writers never clobber each
other and an encoded corpus is never rewritten. Adding a bank entry creates one new block; removing one deletes its
block folders; assembling ``concat`` features reads the blocks of the current entries in manifest order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..io import atomic_save_tensors, atomic_write_json

HASH_BYTES = 16


def text_hash(text: str, pair: str | None = None) -> bytes:
    """16-byte digest of one (text, pair) input."""
    return hashlib.sha256(json.dumps([text, pair], ensure_ascii=False).encode()).digest()[:HASH_BYTES]


def block_key(meta: dict) -> str:
    """Folder name of a block: hash of its canonical description."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]


class FeatureCache:
    """Look up, store and drop cached feature rows."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._index: dict[str, tuple[str, dict[bytes, int], torch.Tensor | None]] = {}  # in-process memo per block

    def block_dir(self, meta: dict) -> Path:
        return self.root / block_key(meta)

    def _load(self, meta: dict) -> tuple[dict[bytes, int], torch.Tensor | None]:
        """(text hash -> row, all rows) of one block; memoised until its set of shards changes."""
        d = self.block_dir(meta)
        shards = sorted(d.glob("shard-*.safetensors")) if d.is_dir() else []
        stamp = str([(s.name, s.stat().st_size) for s in shards])
        memo = self._index.get(str(d))
        if memo is not None and memo[0] == stamp:
            return memo[1], memo[2]
        index: dict[bytes, int] = {}
        parts: list[torch.Tensor] = []
        n = 0
        for s in shards:
            try:
                data = load_file(str(s))
            except Exception:  # a shard cut short by a crash
                continue  # ignore it: its rows are recomputed
            keys, feats = data["keys"], data["features"]
            for j, k in enumerate(bytes(r) for r in keys.numpy()):
                index.setdefault(k, n + j)
            parts.append(feats)
            n += feats.shape[0]
        all_feats = torch.cat(parts) if parts else None
        self._index[str(d)] = (stamp, index, all_feats)
        return index, all_feats

    def lookup(self, meta: dict, hashes: Sequence[bytes]) -> tuple[torch.Tensor | None, list[int]]:
        """(features of the cached rows in input order, or None if none; positions of the missing rows)."""
        index, feats = self._load(meta)
        rows = [index.get(h) for h in hashes]
        missing = [i for i, r in enumerate(rows) if r is None]
        if feats is None or len(missing) == len(hashes):
            return None, list(range(len(hashes)))
        out = torch.zeros(len(hashes), feats.shape[1])
        have = [i for i, r in enumerate(rows) if r is not None]
        out[have] = feats[[rows[i] for i in have]]
        return out, missing

    def store(self, meta: dict, hashes: Sequence[bytes], feats: torch.Tensor) -> Path:
        """Append rows as one new shard (atomic); writes ``meta.json`` on first use."""
        d = self.block_dir(meta)
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "meta.json").exists():
            atomic_write_json(d / "meta.json", meta)
        keys = torch.tensor([list(h) for h in hashes], dtype=torch.uint8).reshape(-1, HASH_BYTES)
        name = f"shard-{time.time_ns()}-{uuid.uuid4().hex[:8]}.safetensors"
        atomic_save_tensors(d / name, {"keys": keys, "features": feats.float().contiguous()})
        return d / name

    def blocks(self) -> list[tuple[Path, dict]]:
        """Every block folder with its meta."""
        out = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            f = d / "meta.json"
            if d.is_dir() and f.is_file():
                try:
                    out.append((d, json.loads(f.read_text())))
                except json.JSONDecodeError:
                    continue
        return out

    def drop_entries(self, sha256s: Sequence[str]) -> list[Path]:
        """Delete every block that depends on one of these bank entries (its concat block, joint combinations)."""
        gone = set(sha256s)
        dropped = []
        for d, meta in self.blocks():
            if gone & set(meta.get("entries", [])):
                shutil.rmtree(d, ignore_errors=True)
                self._index.pop(str(d), None)
                dropped.append(d)
        return dropped

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*.safetensors")) if self.root.is_dir() else 0
