"""Weight tokeniser: PEFT LoRA tensors <-> normalised weight tokens (DnD / RPG style).

Layout (spec ``dnd.md`` §1(d)): modules sorted by layer, then q, k, v, o, up, gate, down (others alphabetically
after). Per module, ``lora_A`` [r, in] and ``lora_B``ᵀ [r, out] are split along the hidden axis into chunks of
``c`` columns (the last chunk NaN-padded), giving tokens of shape [r, c]. Every token is z-scored with its own mean
and std, which are kept, so that :func:`detokenize` restores the tensors **bitwise** for float32/bf16 inputs:

* the mean is rounded to a float32 value and the std to a power of two, and all arithmetic runs in float64; then
  ``(x - m)`` is exact in float64 for any two float32 values of comparable exponent (and for ``x == 0``),
  scaling by a power of two is exact, and ``z * s + m`` gives back exactly ``x``.

For the generator, :func:`to_grid` writes each token as an (r+2)×(c+2) grid: the z-scores, plus two extra rows and
two extra columns carrying a code of the token's (mean, std), so that a generator predicts the scales too;
:func:`from_grid` inverts that (approximately; the generator's output is not exact anyway). Two codes
(``TokenLayout.stats_code``):

* ``"dnd"``: ``(mean*8, log(0.9*std+0.1)+1.6)``, DnD's. For std ≪ 0.1 it hardly moves (d std / d code ≈ 0.11), so a
  small error of the generator in the code is a large relative error of a small std; ``lora_B`` tokens (B starts
  at 0) have stds of 1e-4 to 1e-3, and generated B came out ~10x too large in a CPU run on SmolLM2.
* ``"relative"`` (default): ``(mean/std, log(std)+6)``: a code error ε is a relative error of about ε in the std
  and an error of ε·std in the mean, at every scale.

Gauge issue (spec §4). A LoRA update is ΔW = (α/r)·B·A, and B·A is invariant under (B, A) -> (B·M, M⁻¹·A) for any
invertible r×r matrix M. Regressing per-checkpoint A and B (the ``"ab"`` target, as DnD does) is therefore only
meaningful when all checkpoints of the zoo live in the same gauge. We obtain that by **shared initialisation**: the
zoo trains every dataset's LoRA from one fixed initialisation (same seed, B = 0, the same A); with small learning
rates and few steps, the checkpoints stay close to that common starting point and hence in one gauge
(:func:`assert_shared_init` checks step-0 adapters). The gauge-free alternative is the ``"svd"`` target
(:func:`canonicalize_svd`): B·A is re-factored in low rank (QR of B and Aᵀ, then the SVD of the small r×r core),
A′ = S^{1/2}Vᵀ, B′ = U S^{1/2}, and each column of U gets its largest-magnitude entry positive. The result depends
only on B·A (up to ties in S), so any zoo can be regressed, at the cost of no longer reproducing the zoo's own
(A, B) factors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

STATS_CODES = ("relative", "dnd")
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")
_LAYER = re.compile(r"layers\.(\d+)\.")
_MODULE = re.compile(r"\.([A-Za-z0-9_]+)\.lora_[AB]\.")
_SUFFIX_A = ".lora_A.weight"
_SUFFIX_B = ".lora_B.weight"
TARGETS = ("ab", "svd")


def module_sort_key(prefix: str) -> tuple:
    """Sort key for a LoRA module prefix: (layer, position in :data:`MODULE_ORDER`, name)."""
    m = _LAYER.search(prefix + ".")
    layer = int(m.group(1)) if m else -1
    name = prefix.rsplit(".", 1)[-1]
    pos = MODULE_ORDER.index(name) if name in MODULE_ORDER else len(MODULE_ORDER)
    return (layer, pos, name, prefix)


def lora_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Module prefixes (the key without ``.lora_A.weight``) of a PEFT adapter state dict, in token order."""
    prefixes = [k[: -len(_SUFFIX_A)] for k in state if k.endswith(_SUFFIX_A)]
    missing = [p for p in prefixes if p + _SUFFIX_B not in state]
    if missing:
        raise ValueError(f"lora_A without lora_B: {missing[:3]}")
    if not prefixes:
        raise ValueError("no '*.lora_A.weight' keys: not a PEFT LoRA state dict")
    return sorted(prefixes, key=module_sort_key)


@dataclass
class ModuleSpec:
    """One LoRA module in the token layout: A is [rank, d_in], B is [d_out, rank]."""

    prefix: str
    rank: int
    d_in: int
    d_out: int
    chunks_a: int
    chunks_b: int


@dataclass
class TokenLayout:
    """Where every token of an adapter comes from; identical for all checkpoints of a zoo."""

    chunk: int
    rank: int
    modules: list[ModuleSpec] = field(default_factory=list)
    stats_code: str = "relative"  # how to_grid writes each token's (mean, std): "relative" or "dnd"

    def __post_init__(self) -> None:
        if self.stats_code not in STATS_CODES:
            raise ValueError(f"stats_code {self.stats_code!r}: expected one of {STATS_CODES}")

    @property
    def n_tokens(self) -> int:
        """Number of tokens T."""
        return sum(m.chunks_a + m.chunks_b for m in self.modules)

    @property
    def token_shape(self) -> tuple[int, int]:
        """Shape [r, c] of a bare token."""
        return (self.rank, self.chunk)

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Shape (T, r+2, c+2) of the generator's target."""
        return (self.n_tokens, self.rank + 2, self.chunk + 2)

    @property
    def n_params(self) -> int:
        """Number of LoRA parameters covered."""
        return sum(m.rank * (m.d_in + m.d_out) for m in self.modules)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], chunk: int,
                        stats_code: str = "relative") -> TokenLayout:
        """Build the layout of a PEFT LoRA state dict with chunk size ``chunk`` (c)."""
        mods = []
        ranks = set()
        for p in lora_modules(state):
            a, b = state[p + _SUFFIX_A], state[p + _SUFFIX_B]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"{p}: A {tuple(a.shape)} / B {tuple(b.shape)} are not [r,in] / [out,r]")
            r = a.shape[0]
            ranks.add(r)
            mods.append(ModuleSpec(p, r, a.shape[1], b.shape[0], math.ceil(a.shape[1] / chunk),
                                   math.ceil(b.shape[0] / chunk)))
        if len(ranks) != 1:
            raise ValueError(f"all modules must share one rank, got {sorted(ranks)}")
        return cls(chunk=chunk, rank=ranks.pop(), modules=mods, stats_code=stats_code)

    def to_json(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TokenLayout:
        """Inverse of :meth:`to_json`."""
        # layouts written before the "relative" code existed used DnD's
        return cls(chunk=d["chunk"], rank=d["rank"], modules=[ModuleSpec(**m) for m in d["modules"]],
                   stats_code=d.get("stats_code", "dnd"))

    def save(self, path) -> None:
        """Write as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_json(), f)

    @classmethod
    def load(cls, path) -> TokenLayout:
        """Read from JSON."""
        with open(path) as f:
            return cls.from_json(json.load(f))


@dataclass
class WeightTokens:
    """Normalised tokens ``z`` [T, r, c] (float64, NaN in padding) with per-token ``mean`` and ``std`` [T]."""

    z: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    dtypes: dict[str, str] = field(default_factory=dict)


def _chunks(m: torch.Tensor, c: int) -> torch.Tensor:
    """[r, n] -> [ceil(n/c), r, c], NaN-padded, float64."""
    r, n = m.shape
    k = math.ceil(n / c)
    out = torch.full((r, k * c), float("nan"), dtype=torch.float64)
    out[:, :n] = m.to(torch.float64)
    return out.view(r, k, c).permute(1, 0, 2)


def _unchunk(t: torch.Tensor, n: int) -> torch.Tensor:
    """[k, r, c] -> [r, n]."""
    k, r, c = t.shape
    return t.permute(1, 0, 2).reshape(r, k * c)[:, :n]


def _stats(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean (rounded to float32) and std (rounded to a power of two) over non-NaN entries."""
    valid = ~torch.isnan(raw)
    cnt = valid.sum(dim=(1, 2)).clamp_min(1)
    x = torch.where(valid, raw, torch.zeros_like(raw))
    mean = (x.sum(dim=(1, 2)) / cnt).to(torch.float32).to(torch.float64)
    var = (torch.where(valid, raw - mean[:, None, None], torch.zeros_like(raw)) ** 2).sum(dim=(1, 2)) / cnt
    std = var.sqrt()
    ok = torch.isfinite(std) & (std > 0)
    pow2 = torch.exp2(torch.round(torch.log2(torch.where(ok, std, torch.ones_like(std)))))
    return mean, torch.where(ok, pow2, torch.ones_like(std))


def tokenize(state: Mapping[str, torch.Tensor], layout: TokenLayout) -> WeightTokens:
    """LoRA state dict -> :class:`WeightTokens` (exactly invertible by :func:`detokenize`)."""
    c = layout.chunk
    parts, dtypes = [], {}
    for m in layout.modules:
        a, b = state[m.prefix + _SUFFIX_A], state[m.prefix + _SUFFIX_B]
        if tuple(a.shape) != (m.rank, m.d_in) or tuple(b.shape) != (m.d_out, m.rank):
            raise ValueError(f"{m.prefix}: shapes {tuple(a.shape)}, {tuple(b.shape)} do not match the layout")
        dtypes[m.prefix] = str(a.dtype).replace("torch.", "")
        parts += [_chunks(a.detach().cpu(), c), _chunks(b.detach().cpu().t(), c)]
    raw = torch.cat(parts)
    mean, std = _stats(raw)
    z = (raw - mean[:, None, None]) / std[:, None, None]
    return WeightTokens(z=z, mean=mean, std=std, dtypes=dtypes)


def detokenize(tokens: WeightTokens, layout: TokenLayout, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """:class:`WeightTokens` -> PEFT LoRA state dict (keys ``<prefix>.lora_A.weight`` / ``.lora_B.weight``).

    ``dtype`` overrides the dtypes recorded at tokenisation (default float32 when none were recorded)."""
    raw = tokens.z.to(torch.float64) * tokens.std.to(torch.float64)[:, None, None] \
        + tokens.mean.to(torch.float64)[:, None, None]
    out, i = {}, 0
    for m in layout.modules:
        dt = dtype or getattr(torch, tokens.dtypes.get(m.prefix, "float32"))
        a = _unchunk(raw[i: i + m.chunks_a], m.d_in)
        i += m.chunks_a
        bt = _unchunk(raw[i: i + m.chunks_b], m.d_out)
        i += m.chunks_b
        out[m.prefix + _SUFFIX_A] = a.to(dt).contiguous()
        out[m.prefix + _SUFFIX_B] = bt.t().to(dt).contiguous()
    return out


def encode_stats(mean: torch.Tensor, std: torch.Tensor, code: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of tokens -> the two values a grid carries for them (see the module docstring)."""
    if code == "dnd":
        return mean * 8.0, torch.log(0.9 * std + 0.1) + 1.6
    return mean / std, torch.log(std) + 6.0


def decode_stats(mcode: torch.Tensor, scode: torch.Tensor, code: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_stats`."""
    if code == "dnd":
        return mcode / 8.0, ((torch.exp(scode - 1.6) - 0.1) / 0.9).clamp_min(1e-12)
    std = torch.exp(scode - 6.0)
    return mcode * std, std


def to_grid(tokens: WeightTokens, stats_code: str = "relative") -> torch.Tensor:
    """Tokens -> float32 grid [T, r+2, c+2]: z-scores plus the encoded (mean, std) in 2 rows and 2 columns
    (``stats_code`` must be the layout's)."""
    t, r, c = tokens.z.shape
    g = torch.full((t, r + 2, c + 2), float("nan"), dtype=torch.float64)
    g[:, :r, :c] = tokens.z
    mc, sc = encode_stats(tokens.mean, tokens.std, stats_code)
    g[:, r, :] = mc[:, None]
    g[:, r + 1, :] = sc[:, None]
    g[:, :r, c] = mc[:, None]
    g[:, :r, c + 1] = sc[:, None]
    return g.to(torch.float32)


def grid_mask(layout: TokenLayout) -> torch.Tensor:
    """Boolean [T, r+2, c+2]: True where a grid entry is real (False in the NaN padding of last chunks)."""
    t, h, w = layout.grid_shape
    mask = torch.ones(t, h, w, dtype=torch.bool)
    i = 0
    for m in layout.modules:
        for n, k in ((m.d_in, m.chunks_a), (m.d_out, m.chunks_b)):
            pad = k * layout.chunk - n
            if pad:
                mask[i + k - 1, : layout.rank, layout.chunk - pad: layout.chunk] = False
            i += k
    return mask


def from_grid(grid: torch.Tensor, layout: TokenLayout) -> WeightTokens:
    """Generator output [T, r+2, c+2] -> :class:`WeightTokens` (stats averaged over their replicated cells)."""
    g = grid.detach().to(torch.float64).cpu()
    r, c = layout.rank, layout.chunk
    mc = torch.cat([g[:, r, :], g[:, :r, c]], dim=1).nanmean(dim=1)
    sc = torch.cat([g[:, r + 1, :], g[:, :r, c + 1]], dim=1).nanmean(dim=1)
    mean, std = decode_stats(mc, sc, layout.stats_code)
    z = g[:, :r, :c].clone()
    z[~grid_mask(layout)[:, :r, :c]] = float("nan")
    return WeightTokens(z=z, mean=mean, std=std)


def canonicalize_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauge-free factors of B·A in low rank: A′ = S^{1/2}Vᵀ [r,in], B′ = U S^{1/2} [out,r], B′A′ = BA.

    Never forms the dense product: QR of B and of Aᵀ, then the SVD of the r×r core; each column of U is signed so
    that its largest-magnitude entry is positive (unique up to ties in S)."""
    dt = a.dtype
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    qb, rb = torch.linalg.qr(b64)  # [out,r], [r,r]
    qa, ra = torch.linalg.qr(a64.t())  # [in,r], [r,r]
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    u_full, v_full = qb @ u, qa @ vh.t()  # [out,r], [in,r]
    idx = u_full.abs().argmax(dim=0)
    sign = torch.sign(u_full[idx, torch.arange(u_full.shape[1])])
    sign[sign == 0] = 1
    u_full, v_full = u_full * sign, v_full * sign
    sq = s.sqrt()
    return (sq[:, None] * v_full.t()).to(dt), (u_full * sq).to(dt)


def canonicalize_state(state: Mapping[str, torch.Tensor], target: str = "ab") -> dict[str, torch.Tensor]:
    """Apply the regression target's gauge: ``"ab"`` leaves the factors as they are, ``"svd"`` canonicalises."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    out = dict(state)
    if target == "svd":
        for p in lora_modules(state):
            out[p + _SUFFIX_A], out[p + _SUFFIX_B] = canonicalize_svd(state[p + _SUFFIX_A], state[p + _SUFFIX_B])
    return out


def assert_shared_init(states: list[Mapping[str, torch.Tensor]]) -> None:
    """Raise unless all given (step-0) adapters share one initialisation: identical A and identical B."""
    if len(states) < 2:
        return
    ref = states[0]
    for i, s in enumerate(states[1:], 1):
        for k, v in ref.items():
            if k not in s or not torch.equal(s[k], v):
                raise ValueError(f"adapter {i} differs from adapter 0 at {k}: the zoo does not share one gauge")
