"""Condition encoder: a frozen sentence encoder (MiniLM-L6 by default) embeds batches of unlabeled prompts.

As in DnD (spec ``dnd.md`` §1(c)) there is no pooling: every prompt keeps its per-token ``last_hidden_state``,
padded (or truncated) to a fixed ``max_length`` so that the generator sees a fixed [N, L, D] map. Because the
encoder is frozen, each prompt's states are cached, so resampling a fresh batch every step costs no re-encoding.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch


class ConditionEncoder:
    """Frozen HF encoder -> per-token states.

    Args:
        model: alias (``"minilm"``) or a local HF folder.
        max_length: tokens per prompt after padding/truncation (L).
        device: torch device for the encoder.
        cache: keep each prompt's states (float32) for reuse.
        cache_device: where cached states live (default CPU; the encoder's device avoids a host copy per batch).
    """

    def __init__(self, model: str = "minilm", max_length: int = 128, device: str | torch.device = "cpu",
                 cache: bool = True, cache_device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        from ..resources import resolve

        self.name = model
        path = resolve(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device)
        self.max_length = max_length
        self.hidden = int(self.model.config.hidden_size)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None
        self.cache_device = torch.device(cache_device)

    @torch.no_grad()
    def _encode_new(self, prompts: list[str], batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for i in range(0, len(prompts), batch_size):
            enc = self.tokenizer(prompts[i: i + batch_size], padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].bool()
            h = h * mask[..., None]  # padded positions are exactly zero
            h, mask = h.to(self.cache_device), mask.to(self.cache_device)
            out += [(h[j], mask[j]) for j in range(h.shape[0])]
        return out

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (states [N, L, D] float32, mask [N, L] bool); padded states are zero."""
        prompts = list(prompts)
        if self._cache is None:
            res = self._encode_new(prompts)
        else:
            todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
            if todo:
                self._cache.update(zip(todo, self._encode_new(todo)))
            res = [self._cache[p] for p in prompts]
        return torch.stack([r[0] for r in res]), torch.stack([r[1] for r in res])

    def pooled(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> one embedding each [N, D]: the token states averaged over real tokens (the study's pooling
        for comparing datasets; the generator itself sees every token)."""
        states, mask = self.encode(prompts)
        m = mask.to(states.dtype)[..., None]
        return (states * m).sum(1) / m.sum(1).clamp_min(1)

    def warm(self, pools: Mapping[str, Sequence[str]], batch_size: int = 64) -> int:
        """Encode every prompt of ``pools`` into the cache in a fixed order: each dataset's deduplicated pool in
        chunks of ``batch_size``, a chunk (re-)encoded whole when any of its prompts is missing. A cached state then
        depends only on its own dataset's pool, never on which generator asked first or on what else is cached,
        so generators trained alone or side by side see identical conditions. Returns the prompts encoded."""
        if self._cache is None:
            return 0
        n = 0
        for prompts in pools.values():
            uniq = list(dict.fromkeys(prompts))
            for i in range(0, len(uniq), batch_size):
                chunk = uniq[i:i + batch_size]
                if any(p not in self._cache for p in chunk):
                    self._cache.update(zip(chunk, self._encode_new(chunk, batch_size)))
                    n += len(chunk)
        return n

    def encode_batch(self, batch: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """B lists of N prompts -> (states [B, N, L, D], mask [B, N, L])."""
        enc = [self.encode(p) for p in batch]
        return torch.stack([e[0] for e in enc]), torch.stack([e[1] for e in enc])


class PromptSampler:
    """Seeded sampler: a fresh random batch of ``n`` prompts of a dataset at every call.

    Samples without replacement when the pool has at least ``n`` prompts, with replacement otherwise."""

    def __init__(self, prompts: Mapping[str, Sequence[str]], n: int, seed: int = 0) -> None:
        empty = [d for d, p in prompts.items() if not p]
        if empty:
            raise ValueError(f"no prompts for datasets {empty}")
        self.prompts = {d: list(p) for d, p in prompts.items()}
        self.n = n
        self.rng = random.Random(seed)

    def sample(self, dataset: str) -> list[str]:
        """``n`` prompts of ``dataset``."""
        pool = self.prompts[dataset]
        if len(pool) >= self.n:
            return self.rng.sample(pool, self.n)
        return [self.rng.choice(pool) for _ in range(self.n)]


PROMPT_FIELDS = ("prompt", "text", "question", "input", "instruction", "sentence", "query", "ctx", "goal")


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts from a JSONL file (one JSON string, or an object with a prompt/text/question/... field, per line),
    a JSON list, a CSV/TSV file (the ``column`` column, default the first of :data:`PROMPT_FIELDS` in the header),
    or a plain-text file (one prompt per line)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".csv", ".tsv"):
        return _read_table(path, text, column)
    if column is not None:
        raise ValueError(f"--column {column} applies to .csv/.tsv files, not {path.name}")
    if path.suffix == ".json":
        data = json.loads(text)
        return [_prompt_of(x) for x in data]
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl" or line[0] in "{\"":
            out.append(_prompt_of(json.loads(line)))
        else:
            out.append(line)
    return out


def _read_table(path: Path, text: str, column: str | None) -> list[str]:
    import csv
    import io

    rows = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv" else ",")
    header = rows.fieldnames or []
    col = column or next((c for c in PROMPT_FIELDS if c in header), None)
    if col not in header:
        raise ValueError(f"{path.name}: no column {col or 'named ' + '/'.join(PROMPT_FIELDS)} (columns: "
                         f"{', '.join(header)}); pass --column NAME")
    return [r[col].strip() for r in rows if (r.get(col) or "").strip()]


def _prompt_of(x) -> str:
    if isinstance(x, str):
        return x
    for k in PROMPT_FIELDS:
        if k in x and isinstance(x[k], str):
            return x[k]
    raise ValueError(f"no prompt field ({', '.join(PROMPT_FIELDS)}) in {str(x)[:80]}")


PromptSource = Mapping[str, "str | Path | Sequence[str]"] | Callable[[str], Sequence[str]] | str | Path


def prompts_by_dataset(source: PromptSource, datasets: Iterable[str]) -> dict[str, list[str]]:
    """Resolve prompts for each dataset from: a callable ``prompts_for(dataset)``; a mapping dataset -> JSONL path
    or list of prompts; a folder holding ``<dataset>.jsonl``; or a JSON file with that mapping."""
    datasets = list(datasets)
    if callable(source):
        return {d: list(source(d)) for d in datasets}
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_dir():
            return {d: read_prompts(p / f"{d}.jsonl") for d in datasets}
        with open(p) as f:
            source = json.load(f)
        base = p.parent
        source = {d: (str(base / v) if isinstance(v, str) and not Path(v).is_absolute() else v)
                  for d, v in source.items()}
    out = {}
    for d in datasets:
        v = source[d]
        out[d] = read_prompts(v) if isinstance(v, (str, Path)) else list(v)
    return out
