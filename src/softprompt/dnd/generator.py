"""DnD generator entry points: train a hyper-convolutional decoder (:mod:`.hyperconv`) on a zoo, load it, and
generate LoRA weights from prompts. The decoder (spec ``dnd.md`` §1(d)-(e)): prompt embeddings -> LoRA weight tokens.

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

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from .condition import ConditionEncoder, PromptSampler, PromptSource, prompts_by_dataset
from .export import read_zoo
from .gen_train import GeneratorRun, GridBank, train_runs
from .hyperconv import HyperConvDecoder, HyperConvLayer, Shape, chain_parameters, load_zoo_tensors, plan_chain
from .tokenizer import (
    TokenLayout,
    detokenize,
    from_grid,
)

# Re-exported: the decoder and the zoo loader live in .hyperconv (shared with .gen_train).
__all__ = ["HyperConvDecoder", "HyperConvLayer", "Shape", "chain_parameters", "generate", "load_generator",
           "load_zoo_tensors", "plan_chain", "train_generator"]


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
    t0 = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    entries = read_zoo(zoo_dir)
    held = {holdout} if isinstance(holdout, str) else set(holdout or ())
    held = {h for x in held for h in x.split(",") if h}
    train = [e for e in entries if e["dataset"] not in held]
    if not train:
        raise ValueError(f"no zoo checkpoints left after holding out {sorted(held)}")
    pool = resolve_pools(zoo_dir, train, prompts, prompts_for, condition)
    bank = GridBank(train, chunk, target, stats_code, dev, cache=grid_cache)
    enc = _condition_encoder(encoder, max_length, dev)
    enc.warm(pool)
    in_shape = (n_prompts, max_length, enc.hidden)
    chain = [tuple(s) for s in chain] if chain else plan_chain(in_shape, bank.layout.grid_shape, width, n_layers)
    if tuple(chain[0]) != in_shape or tuple(chain[-1]) != bank.layout.grid_shape:
        raise ValueError(f"chain {chain[0]}..{chain[-1]} does not map {in_shape} to {bank.layout.grid_shape}")
    run = GeneratorRun(bank, train, pool, enc, out, steps, chain, n_prompts=n_prompts, batch_size=batch_size, lr=lr,
                       weight_decay=weight_decay, warmup=warmup, clip=clip, kernel=kernel, cond_noise=cond_noise,
                       target_noise=target_noise, weighting=weighting, seed=seed, holdout=sorted(held),
                       keep_steps=keep_steps, config={"target": target, "condition": condition})
    if verbose:
        lay = bank.layout
        print(f"hyper-conv decoder: {run.parameters:,} parameters; chain {chain}; target {lay.n_tokens} tokens "
              f"{lay.grid_shape[1:]} ({lay.n_params:,} LoRA parameters); from step {run.step}")
    res = train_runs([run], max_seconds=max_seconds, stop_after=stop_after, t0=t0)[0]
    if verbose and log_every:
        for i in range(0, len(res["losses"]), log_every):
            print(f"step {i:5d}  loss {res['losses'][i]:.5f}")
    return res


def resolve_pools(zoo_dir: str | Path | Sequence[Mapping], train: Sequence[Mapping],
                  prompts: PromptSource | None = None, prompts_for: Callable[[str], Sequence[str]] | None = None,
                  condition: str = "raw") -> dict[str, list[str]]:
    """Condition prompts per training dataset: ``prompts_for``, else ``prompts``, else the entries' ``prompts``
    JSONL fields (relative to the zoo folder), else the task registry (:func:`registry_prompts_for`)."""
    datasets = list(dict.fromkeys(e["dataset"] for e in train))
    if prompts_for is not None:
        return prompts_by_dataset(prompts_for, datasets)
    if prompts is not None:
        return prompts_by_dataset(prompts, datasets)
    root = zoo_dir if isinstance(zoo_dir, (str, Path)) else None
    src = {}
    for e in train:
        if "prompts" in e:
            p = Path(e["prompts"])
            src.setdefault(e["dataset"], str(p if p.is_absolute() or root is None else
                                             (Path(root) if Path(root).is_dir() else Path(root).parent) / p))
    if src and len(src) < len(datasets):
        raise ValueError(f"no prompts for {[d for d in datasets if d not in src]}: pass prompts= or prompts_for=")
    return prompts_by_dataset(src or (lambda d: registry_prompts_for(d, "zoo", condition)), datasets)


def _condition_encoder(encoder: str | ConditionEncoder, max_length: int, dev: torch.device) -> ConditionEncoder:
    """A loaded encoder (checked against ``max_length``) or a new one (prompt cache on ``dev``)."""
    if isinstance(encoder, ConditionEncoder):
        if encoder.max_length != max_length:
            raise ValueError(f"encoder max_length {encoder.max_length} != max_length {max_length}")
        return encoder
    return ConditionEncoder(encoder, max_length=max_length, device=dev, cache_device=dev)


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
