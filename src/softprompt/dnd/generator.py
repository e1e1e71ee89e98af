"""Hyper-convolutional decoder (DnD, spec ``dnd.md`` §1(d)-(e)): prompt embeddings -> LoRA weight tokens.

Input per sample: the condition map [N, L, D] (N prompts × L tokens × D hidden, from :mod:`.condition`); output:
the token grid [T, r+2, c+2] of :mod:`.tokenizer`. The chain of shapes (N, H, W) goes from the condition shape to
the target shape through ``n_layers`` :class:`HyperConvLayer` s; heights and widths are interpolated geometrically
and the channel counts are ``width, 2·width, 4·width, …`` (the size knob), ending at T.

Each layer: (1) LayerNorm over (H, W); (2) branch A = width conv (W as channels) then height conv (H as channels),
branch B = height conv, width conv, tanh; ``(A + B + bias) / 3``; (3) a channel conv (N -> N′, with bias). All
convs are k×k, 'same', no stride; a residual is added only when input and output shapes agree.

Training: weighted MSE on the non-padded grid entries (per-token weights = each token's std across checkpoints,
normalised per dataset and averaged), condition/target noise 1e-4/1e-5, AdamW, linear warm-up then cosine decay,
gradient clipping, bf16 autocast on CUDA.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .condition import ConditionEncoder, PromptSampler, PromptSource, prompts_by_dataset
from .export import ADAPTER_CONFIG, read_lora_tensors, read_zoo
from .gen_loss import token_weights, warmup_cosine, weighted_mse
from .tokenizer import (
    TokenLayout,
    canonicalize_state,
    detokenize,
    from_grid,
    grid_mask,
    to_grid,
    tokenize,
)

Shape = tuple[int, int, int]


def plan_chain(in_shape: Shape, out_shape: Shape, width: int = 64, n_layers: int = 4) -> list[Shape]:
    """Shapes (N, H, W) from the condition map to the token grid: ``n_layers + 1`` entries.

    Intermediate channels are ``width·2^i``; H and W move geometrically from input to target."""
    if n_layers < 1:
        raise ValueError("n_layers >= 1")
    (_n0, h0, w0), (_nt, ht, wt) = in_shape, out_shape
    chain = [tuple(in_shape)]
    for i in range(1, n_layers):
        f = i / n_layers
        chain.append((width * 2 ** (i - 1), max(1, round(h0 * (ht / h0) ** f)), max(1, round(w0 * (wt / w0) ** f))))
    chain.append(tuple(out_shape))
    return chain


def layer_parameters(i: Shape, o: Shape, k: int) -> int:
    """Parameter count of one :class:`HyperConvLayer` (hand formula)."""
    (n, h, w), (n2, h2, w2) = i, o
    return (2 * h * w  # LayerNorm over (H, W)
            + 2 * (w * w2 * k * k + w2)  # width convs of both branches
            + 2 * (h * h2 * k * k + h2)  # height convs of both branches
            + h2 * w2  # branch bias
            + n * n2 * k * k + n2)  # channel conv


def chain_parameters(chain: Sequence[Shape], k: int) -> int:
    """Parameter count of a whole decoder chain."""
    return sum(layer_parameters(a, b, k) for a, b in itertools.pairwise(chain))


class HyperConvLayer(nn.Module):
    """(N, H, W) -> (N′, H′, W′); see the module docstring."""

    def __init__(self, in_shape: Shape, out_shape: Shape, kernel: int = 9) -> None:
        super().__init__()
        (n, h, w), (n2, h2, w2) = in_shape, out_shape
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.norm = nn.LayerNorm([h, w])
        pad = "same"
        self.a_width = nn.Conv2d(w, w2, kernel, padding=pad)
        self.a_height = nn.Conv2d(h, h2, kernel, padding=pad)
        self.b_height = nn.Conv2d(h, h2, kernel, padding=pad)
        self.b_width = nn.Conv2d(w, w2, kernel, padding=pad)
        self.bias = nn.Parameter(torch.zeros(h2, w2))
        self.channel = nn.Conv2d(n, n2, kernel, padding=pad)
        self.residual = self.in_shape == self.out_shape

    @staticmethod
    def _width(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:  # [B,N,H,W] -> [B,N,H,W']
        return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    @staticmethod
    def _height(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:  # [B,N,H,W] -> [B,N,H',W]
        return conv(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, H, W] -> [B, N′, H′, W′]."""
        y = self.norm(x)
        a = self._height(self.a_height, self._width(self.a_width, y))
        b = torch.tanh(self._width(self.b_width, self._height(self.b_height, y)))
        y = self.channel((a + b + self.bias) / 3)
        return y + x if self.residual else y


class HyperConvDecoder(nn.Module):
    """A chain of :class:`HyperConvLayer` s: condition [B, N, L, D] -> token grid [B, T, r+2, c+2]."""

    def __init__(self, chain: Sequence[Shape], kernel: int = 9) -> None:
        super().__init__()
        self.chain = [tuple(int(v) for v in s) for s in chain]
        self.kernel = kernel
        self.layers = nn.ModuleList(HyperConvLayer(a, b, kernel) for a, b in zip(self.chain[:-1], self.chain[1:]))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition [B, N, L, D] -> grid [B, T, r+2, c+2]."""
        x = cond
        for layer in self.layers:
            x = layer(x)
        return x

    def count_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def registry_prompts_for(dataset: str, part: str = "zoo", condition: str = "raw") -> list[str]:
    """Unlabeled prompts of a registry dataset, one per record of its DnD ``part`` (default ``zoo``; use ``test``
    for a held-out dataset's conditions), never with the answer. ``condition="raw"`` (default): the question and its
    options as the official code feeds them (:func:`.cloze.condition_text`); ``"instruction"``: our lettered
    template's user message (the old default, whose first line is constant per dataset)."""
    from .cloze import condition_text
    from .harness import dnd_records
    from .templates import user_message

    if condition not in ("raw", "instruction"):
        raise ValueError(f"condition={condition!r}: use raw or instruction")
    text = condition_text if condition == "raw" else (lambda d, r: user_message(d, r)[0])
    return [text(dataset, r) for r in dnd_records(dataset, part)]


def load_zoo_tensors(entries: Sequence[Mapping], chunk: int, target: str = "ab",
                     cache: dict | None = None,
                     stats_code: str = "relative") -> tuple[TokenLayout, torch.Tensor, list[str]]:
    """Tokenise every zoo checkpoint: (layout, grids [M, T, r+2, c+2] float32, dataset of each).

    ``cache`` (optional) maps ``(path, chunk, target, stats_code)`` to a checkpoint's grid: hits are not
    re-tokenised and misses are added, so several generators trained in one process tokenise each checkpoint once."""
    layout, grids, ds = None, [], []
    for e in entries:
        key = (str(e["path"]), chunk, target, stats_code)
        grid = cache.get(key) if cache is not None else None
        if grid is None or layout is None:  # the layout comes from the first checkpoint's tensors
            st = canonicalize_state(read_lora_tensors(e["path"]), target)
            layout = layout or TokenLayout.from_state_dict(st, chunk, stats_code)
            if grid is None:
                grid = to_grid(tokenize(st, layout), stats_code)
                if cache is not None:
                    cache[key] = grid
        grids.append(grid)
        ds.append(e["dataset"])
    if layout is None:
        raise ValueError("empty zoo")
    return layout, torch.stack(grids), ds


def train_generator(zoo_dir: str | Path | Sequence[Mapping], holdout: str | Sequence[str] | None,
                    out: str | Path, steps: int = 1000, *, prompts: PromptSource | None = None,
                    prompts_for: Callable[[str], Sequence[str]] | None = None,
                    encoder: str | ConditionEncoder = "minilm",
                    max_length: int = 256, n_prompts: int = 64, batch_size: int = 8, lr: float = 3e-5,
                    weight_decay: float = 0.1, warmup: int = 1, clip: float = 1.0, width: int = 64,
                    n_layers: int = 4, kernel: int = 9, chain: Sequence[Shape] | None = None, chunk: int = 192,
                    target: str = "ab", stats_code: str = "relative", cond_noise: float = 1e-4,
                    target_noise: float = 1e-5,
                    weighting: str = "std", seed: int = 0, device: str | None = None, log_every: int = 50,
                    verbose: bool = True, grid_cache: dict | None = None, condition: str = "raw",
                    max_seconds: float | None = None, stop_after: int | None = None,
                    keep_steps: Sequence[int] = ()) -> dict:
    """Train a hyper-conv decoder on a zoo, leaving out the ``holdout`` dataset(s); save it to ``out``.

    ``zoo_dir``: zoo folder / manifest / list of entries (``dataset``, ``path``, …). Prompts per dataset come from
    ``prompts_for(dataset)`` or ``prompts`` (see :func:`.condition.prompts_by_dataset`), else from a ``prompts``
    field (JSONL path) of the manifest entries, else from the task registry (:func:`registry_prompts_for` with
    ``condition``).
    ``encoder`` is an alias/folder or an already loaded :class:`ConditionEncoder` (its prompt cache is then shared
    between generators; its ``max_length`` must equal ``max_length``); ``grid_cache`` is passed to
    :func:`load_zoo_tensors`. Writes ``generator.safetensors``, ``generator_config.json``
    (chain, kernel, layout, encoder, …), ``template_adapter_config.json`` and ``train_log.json``; returns a summary
    with ``losses``, ``parameters``, ``seconds`` and ``complete``.

    Resumable: when ``max_seconds`` (from the call's start) or ``stop_after`` (steps in this call) ends the call
    early, model, optimiser, schedule, losses and every random state go to ``out/train_state.pt`` and the summary
    says ``complete: False``; calling again with the same arguments continues from there (bit-identical to an
    uninterrupted run on the same device). ``keep_steps``: also save ``generator_step<6 digits>.safetensors`` then
    (earlier generator checkpoints to draw from)."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    random.seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = zoo_dir if isinstance(zoo_dir, (str, Path)) else None
    entries = read_zoo(zoo_dir)
    held = {holdout} if isinstance(holdout, str) else set(holdout or ())
    held = {h for x in held for h in x.split(",") if h}
    train = [e for e in entries if e["dataset"] not in held]
    if not train:
        raise ValueError(f"no zoo checkpoints left after holding out {sorted(held)}")
    datasets = list(dict.fromkeys(e["dataset"] for e in train))
    if prompts_for is not None:
        pool = prompts_by_dataset(prompts_for, datasets)
    elif prompts is not None:
        pool = prompts_by_dataset(prompts, datasets)
    else:
        src = {}
        for e in train:
            if "prompts" in e:
                p = Path(e["prompts"])
                src.setdefault(e["dataset"], str(p if p.is_absolute() or root is None else
                                                 (Path(root) if Path(root).is_dir() else Path(root).parent) / p))
        if src and len(src) < len(datasets):
            raise ValueError(f"no prompts for {[d for d in datasets if d not in src]}: pass prompts= or prompts_for=")
        pool = prompts_by_dataset(src or (lambda d: registry_prompts_for(d, "zoo", condition)), datasets)

    layout, grids, ds = load_zoo_tensors(train, chunk, target, cache=grid_cache, stats_code=stats_code)
    mask = grid_mask(layout)
    weight = token_weights(grids, ds) if weighting == "std" else torch.ones(grids.shape[1])
    if isinstance(encoder, ConditionEncoder):
        enc = encoder
        if enc.max_length != max_length:
            raise ValueError(f"encoder max_length {enc.max_length} != max_length {max_length}")
    else:
        enc = ConditionEncoder(encoder, max_length=max_length, device=dev)
    sampler = PromptSampler(pool, n_prompts, seed=seed)
    in_shape = (n_prompts, max_length, enc.hidden)
    chain = [tuple(s) for s in chain] if chain else plan_chain(in_shape, layout.grid_shape, width, n_layers)
    if tuple(chain[0]) != in_shape or tuple(chain[-1]) != layout.grid_shape:
        raise ValueError(f"chain {chain[0]}..{chain[-1]} does not map {in_shape} to {layout.grid_shape}")
    model = HyperConvDecoder(chain, kernel).to(dev)
    n_par = model.count_parameters()
    if verbose:
        print(f"hyper-conv decoder: {n_par:,} parameters; chain {chain}; target {layout.n_tokens} tokens "
              f"{layout.grid_shape[1:]} ({layout.n_params:,} LoRA parameters)")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, steps))
    gen = torch.Generator().manual_seed(seed)
    grids_d, mask_d, weight_d = grids.to(dev), mask.to(dev), weight.to(dev)
    use_bf16 = dev.type == "cuda"
    losses: list[float] = []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sig = {"chain": [list(s) for s in chain], "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
           "holdout": sorted(held), "kernel": kernel}
    resumed = _resume(out / "train_state.pt", sig, model, opt, sched, gen, sampler)
    start = resumed["step"] if resumed else 0
    losses = resumed["losses"] if resumed else losses
    model.train()
    for step in range(start, steps):
        if ((stop_after is not None and step - start >= stop_after)
                or (max_seconds is not None and time.perf_counter() - t0 > max_seconds)):
            torch.save({"sig": sig, "step": step, "losses": losses, "model": model.state_dict(),
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
                        "sampler": sampler.rng.getstate(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                       out / "train_state.pt")
            return {"parameters": n_par, "losses": losses, "seconds": time.perf_counter() - t0, "out": str(out),
                    "complete": False, "step": step}
        idx = torch.randint(0, grids.shape[0], (batch_size,), generator=gen)
        cond, _ = enc.encode_batch([sampler.sample(ds[i]) for i in idx.tolist()])
        cond = cond.to(dev)
        y = grids_d[idx.to(dev)]
        if cond_noise:
            cond = cond + cond_noise * torch.randn_like(cond)
        if target_noise:
            y = y + target_noise * torch.randn_like(y)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = model(cond)
        loss = weighted_mse(pred.float(), y, mask_d, weight_d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if verbose and log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {losses[-1]:.5f}  lr {sched.get_last_lr()[0]:.2e}")
        if step + 1 in keep_steps:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()},
                      str(out / f"generator_step{step + 1:06d}.safetensors"))

    (out / "train_state.pt").unlink(missing_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()},
              str(out / "generator.safetensors"))
    shutil.copy(Path(train[0]["path"]) / ADAPTER_CONFIG, out / "template_adapter_config.json")
    seconds = time.perf_counter() - t0
    cfg = {"chain": [list(s) for s in chain], "kernel": kernel, "layout": layout.to_json(), "encoder": enc.name,
           "max_length": max_length, "n_prompts": n_prompts, "target": target, "holdout": sorted(held),
           "train_datasets": datasets, "zoo_entries": train, "parameters": n_par, "steps": steps,
           "batch_size": batch_size, "lr": lr, "seed": seed, "condition": condition}
    with open(out / "generator_config.json", "w") as f:
        json.dump(cfg, f, indent=1, default=str)
    summary = {"parameters": n_par, "losses": losses, "seconds": seconds, "out": str(out), "complete": True,
               "step": steps}
    with open(out / "train_log.json", "w") as f:
        json.dump(summary, f)
    return summary


def _resume(path: Path, sig: dict, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
            gen: torch.Generator, sampler: PromptSampler) -> dict | None:
    """Load an interrupted training's state into the fresh objects; None when there is none."""
    if not path.exists():
        return None
    st = torch.load(path, map_location="cpu", weights_only=False)
    if st["sig"] != sig:
        raise ValueError(f"{path} belongs to another training ({st['sig']} != {sig}): delete it or use another out")
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    sched.load_state_dict(st["sched"])
    gen.set_state(st["gen"])
    sampler.rng.setstate(st["sampler"])
    torch.set_rng_state(st["torch"])
    if st["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    return {"step": st["step"], "losses": st["losses"]}


def load_generator_config(generator_dir: str | Path) -> dict:
    """The ``generator_config.json`` of a trained generator."""
    with open(Path(generator_dir) / "generator_config.json") as f:
        return json.load(f)


_LOADED: dict[str, tuple] = {}


def load_generator(generator_dir: str | Path, device: str | None = None, weights: str = "generator.safetensors"
                   ) -> tuple[HyperConvDecoder, ConditionEncoder, TokenLayout, dict]:
    """(decoder, condition encoder, layout, config) of a trained generator folder (``weights``: a kept step)."""
    from safetensors.torch import load_file

    cfg = load_generator_config(generator_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = HyperConvDecoder([tuple(s) for s in cfg["chain"]], cfg["kernel"])
    model.load_state_dict(load_file(str(Path(generator_dir) / weights)))
    model.to(dev).eval()
    enc = ConditionEncoder(cfg["encoder"], max_length=cfg["max_length"], device=dev)
    return model, enc, TokenLayout.from_json(cfg["layout"]), cfg


@torch.no_grad()
def generate(generator_dir: str | Path, prompts: Sequence[str], n_prompts: int | None = None, seed: int = 0,
             device: str | None = None, dtype: torch.dtype = torch.float32,
             weights: str = "generator.safetensors") -> tuple[dict[str, torch.Tensor], float]:
    """Prompts of an (unseen) dataset -> (PEFT LoRA state dict, seconds).

    Samples ``n_prompts`` (the generator's N) of ``prompts`` with ``seed``; the seconds cover encoding, the decoder
    pass and detokenisation, not loading the generator (which is cached per folder)."""
    wpath = Path(generator_dir) / weights
    key = f"{wpath.resolve()}|{wpath.stat().st_mtime_ns}|{device}"
    if key not in _LOADED:
        _LOADED[key] = load_generator(generator_dir, device, weights)
    model, enc, layout, cfg = _LOADED[key]
    n = cfg["n_prompts"]
    if n_prompts not in (None, n):
        raise ValueError(f"this generator takes {n} prompts per condition (its chain starts at {cfg['chain'][0]})")
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    batch = PromptSampler({"x": list(prompts)}, n, seed=seed).sample("x")
    cond, _ = enc.encode_batch([batch])
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        grid = model(cond.to(dev))[0].float()
    state = detokenize(from_grid(grid, layout), layout, dtype=dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return state, time.perf_counter() - t0
