"""Pooled sentence features from the bare frozen encoder, with zero, one, many (per-example) or joint prefixes.

The three ways to run prefixes through the engine:

* ``concat`` (:meth:`PrefixEncoder.encode_concat`): a chunk of B texts is replicated T times and each copy gets its
  own prefix through the engine's per-example prefixes (key/value of shape [B*T, H, P, D]); one forward gives all T
  blocks. Row ``t*B + b`` is text ``b`` under prefix ``t``.
* separate passes (:meth:`PrefixEncoder.encode_separate`): T forwards of B rows with one broadcast prefix each; the
  reference the batched pass must match, and the baseline of the throughput benchmark.
* ``joint`` (:meth:`PrefixEncoder.encode_joint`): one forward in which every layer's prefixes are concatenated along
  the prefix axis (sum of P virtual tokens). Bidirectional attention is permutation invariant over keys, so the order
  of the prefixes does not matter (up to float rounding).

Features are read from the bare backbone (``AutoModel``: last hidden states), never from a task head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..engine.compose import Contribution, Part, compose
from ..engine.injector import ModelInfo, attach
from ..engine.state import STATE_KWARG, InjectionState
from ..errors import ConfigError
from ..loading import load_tokenizer
from ..pooling import pool

POOLS = ("cls", "mean")
# One text: (text, optional second segment). Pairs are tokenised as the source tasks were (tokenizer(text, pair)).
Text = tuple[str, "str | None"]
Prefix = dict[int, torch.Tensor]  # layer -> [2, H_kv, P, D]


def as_texts(items: Sequence) -> list[Text]:
    """Normalise str / (text, pair) / record dicts to (text, pair) tuples."""
    out: list[Text] = []
    for it in items:
        if isinstance(it, str):
            out.append((it, None))
        elif isinstance(it, dict):
            out.append((str(it["text"]), it.get("text_pair")))
        else:
            text, pair = it
            out.append((str(text), None if pair is None else str(pair)))
    return out


def pool_features(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, N, h] -> [B, h]: the first token ("cls": [CLS] under right padding) or the mean over real tokens."""
    if how not in POOLS:
        raise ConfigError(f"pool must be one of {POOLS}, got {how!r}")
    return pool(hidden, mask, how)


def prefix_state(prefixes: dict[int, tuple[torch.Tensor, torch.Tensor]], batch: int) -> InjectionState:
    """The engine state of prefixes (layer -> key, value; batch dimension 1 or one row per example)."""
    return compose([Part(Contribution(prefixes=prefixes))], batch)


def prefix_signature(prefix: Prefix) -> tuple[tuple[int, int], ...]:
    """(layer, length) pairs: prefixes with equal signatures can share one batched pass."""
    return tuple(sorted((int(i), int(t.shape[-2])) for i, t in prefix.items()))


@dataclass
class EncodeStats:
    """Work done by the backbone (tests count calls; the benchmark reports rows)."""

    forward_calls: int = 0
    rows: int = 0  # sequences through the backbone (a text under T prefixes in one pass counts T rows)
    texts: int = 0
    seconds: float = 0.0
    blocks: list[str] = field(default_factory=list)  # cache blocks computed (not served from the cache)


class PrefixEncoder:
    """A frozen bare encoder + tokenizer with the injection engine attached.

    model: alias (``minilm``) or a transformers folder of the *frozen* base model, or of a fine-tuned encoder
        (multi-task baseline); loaded with ``AutoModel`` so no task head is involved.
    """

    def __init__(self, model: str, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 max_length: int = 128, batch_size: int = 32, progress: bool = True):
        from transformers import AutoModel

        from .. import resources

        self.model_name = model
        path = resources.resolve(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbone = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.injector = attach(self.backbone)
        self.info: ModelInfo = self.injector.info
        if self.info.is_causal:
            raise ConfigError(f"{model} is a causal decoder; prefix representations use encoder models (e.g. minilm)")
        self.tokenizer = load_tokenizer(model)
        self.dtype = dtype
        self.max_length = max_length
        self.batch_size = batch_size
        self.progress = progress
        self.stats = EncodeStats()

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    # ---- plumbing --------------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[Text]) -> dict[str, torch.Tensor]:
        firsts = [t for t, _ in texts]
        pairs = [p for _, p in texts]
        has_pair = any(p is not None for p in pairs)
        enc = self.tokenizer(firsts, [p or "" for p in pairs] if has_pair else None, truncation=True,
                             max_length=self.max_length, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def _forward(self, enc: dict[str, torch.Tensor], state: InjectionState) -> torch.Tensor:
        """Last hidden states [rows, N, h] of one backbone call under ``state``."""
        self.stats.forward_calls += 1
        self.stats.rows += int(enc["input_ids"].shape[0])
        state.attention_mask = enc["attention_mask"]
        out = self.backbone(**enc, **{STATE_KWARG: state})
        return out.last_hidden_state

    def _prefix_tensor(self, table: torch.Tensor) -> torch.Tensor:
        return table.to(device=self.device, dtype=self.dtype)

    def _chunks(self, texts: Sequence[Text], fn: Callable[[list[Text]], torch.Tensor], desc: str,
                texts_per_chunk: int | None = None) -> torch.Tensor:
        """Apply ``fn`` to length-sorted chunks (less padding) and restore the input order."""
        import time

        from tqdm.auto import tqdm

        texts = list(texts)
        if not texts:
            raise ValueError("no texts to encode")
        size = max(1, texts_per_chunk or self.batch_size)
        # Character length is a cheap proxy of token length; sorting by it groups similar lengths per chunk.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i][0]) + len(texts[i][1] or ""))
        out: list[torch.Tensor] = [None] * len(texts)  # type: ignore[list-item]
        start = time.perf_counter()
        n_chunks = (len(texts) + size - 1) // size
        bar = tqdm(total=len(texts), desc=desc, unit="text", disable=not self.progress or n_chunks < 4,
                   leave=False)
        with torch.no_grad():
            for c in range(0, len(texts), size):
                idx = order[c : c + size]
                feats = fn([texts[i] for i in idx]).float().cpu()
                for j, i in enumerate(idx):
                    out[i] = feats[j]
                bar.update(len(idx))
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stats.seconds += time.perf_counter() - start
        self.stats.texts += len(texts)
        return torch.stack(out)

    # ---- the four encodings ----------------------------------------------------------------------------------------
    def encode_plain(self, texts: Sequence[Text], pool: str = "cls") -> torch.Tensor:
        """[n, h]: the encoder with no prefix (frozen-PLM and multi-task baselines)."""

        def fn(chunk: list[Text]) -> torch.Tensor:
            enc = self.tokenize(chunk)
            return pool_features(self._forward(enc, InjectionState()), enc["attention_mask"], pool)

        return self._chunks(as_texts(texts), fn, "encode")

    def encode_concat(self, texts: Sequence[Text], prefixes: Sequence[Prefix], pool: str = "cls",
                      texts_per_chunk: int | None = None) -> torch.Tensor:
        """[n, T*h]: pooled output under each prefix, concatenated in the order of ``prefixes``.

        Prefixes with the same per-layer lengths run together in ONE forward per chunk (per-example prefixes);
        groups of different shapes (rare: a bank mixing prefix lengths) get one forward each.
        """
        prefixes = list(prefixes)
        if not prefixes:
            raise ValueError("encode_concat needs at least one prefix")
        groups: dict[tuple, list[int]] = {}
        for t, p in enumerate(prefixes):
            groups.setdefault(prefix_signature(p), []).append(t)
        h = self.hidden_size
        blocks: list[torch.Tensor | None] = [None] * len(prefixes)
        for members in groups.values():
            feats = self._encode_group(as_texts(texts), [prefixes[t] for t in members], pool, texts_per_chunk)
            for j, t in enumerate(members):
                blocks[t] = feats[:, j * h : (j + 1) * h]
        return torch.cat(blocks, dim=1)  # type: ignore[arg-type]

    def _encode_group(self, texts: list[Text], prefixes: list[Prefix], pool: str,
                      texts_per_chunk: int | None) -> torch.Tensor:
        t_count = len(prefixes)
        layers = sorted(prefixes[0])
        # [T, H, P, D] per layer, stacked once; expanded per chunk to the chunk's B*T rows.
        keys = {i: torch.stack([self._prefix_tensor(p[i][0]) for p in prefixes]) for i in layers}
        values = {i: torch.stack([self._prefix_tensor(p[i][1]) for p in prefixes]) for i in layers}

        def fn(chunk: list[Text]) -> torch.Tensor:
            enc = self.tokenize(chunk)
            b = enc["input_ids"].shape[0]
            # Row t*B + b = text b under prefix t: tile the inputs, repeat each prefix B times.
            rep = {k: v.repeat(t_count, 1) for k, v in enc.items()}
            per_row = {i: (keys[i].repeat_interleave(b, dim=0), values[i].repeat_interleave(b, dim=0)) for i in layers}
            state = prefix_state(per_row, t_count * b)
            pooled = pool_features(self._forward(rep, state), rep["attention_mask"], pool)  # [T*B, h]
            return pooled.view(t_count, b, -1).transpose(0, 1).reshape(b, -1)  # [B, T*h], prefix-major blocks

        return self._chunks(texts, fn, f"encode x{t_count} prefixes", texts_per_chunk)

    def encode_separate(self, texts: Sequence[Text], prefixes: Sequence[Prefix], pool: str = "cls") -> torch.Tensor:
        """[n, T*h] like :meth:`encode_concat`, but with T separate passes of one broadcast prefix each (the baseline
        of the batched path). Each chunk is tokenised once and then run T times, so that the comparison is between
        backbone passes, not tokenisations."""
        states = []
        for p in prefixes:
            state_layers = {}
            for i, table in p.items():
                t = self._prefix_tensor(table)
                state_layers[i] = (t[0][None], t[1][None])  # [1, H, P, D], broadcast over the batch
            states.append(state_layers)

        def fn(chunk: list[Text]) -> torch.Tensor:
            enc = self.tokenize(chunk)
            outs = []
            for layers in states:
                state = prefix_state(layers, len(chunk))
                outs.append(pool_features(self._forward(enc, state), enc["attention_mask"], pool))
            return torch.cat(outs, dim=1)

        return self._chunks(as_texts(texts), fn, f"encode ({len(states)} separate passes)")

    def encode_joint(self, texts: Sequence[Text], prefixes: Sequence[Prefix], pool: str = "cls") -> torch.Tensor:
        """[n, h]: one pass with every layer's prefixes concatenated along the prefix axis."""
        layers = sorted({i for p in prefixes for i in p})
        joint: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in layers:
            tabs = [self._prefix_tensor(p[i]) for p in prefixes if i in p]
            cat = torch.cat(tabs, dim=-2)  # [2, H, sum P, D]
            joint[i] = (cat[0][None], cat[1][None])

        def fn(chunk: list[Text]) -> torch.Tensor:
            enc = self.tokenize(chunk)
            state = prefix_state(joint, len(chunk))
            return pool_features(self._forward(enc, state), enc["attention_mask"], pool)

        return self._chunks(as_texts(texts), fn, f"encode joint ({len(prefixes)} prefixes)")
