"""Training one or several hyper-conv generators at once on one device (issue 21: the leave-one-out generators).

A :class:`GeneratorRun` is one generator's training: its zoo checkpoints (rows of a shared :class:`GridBank`), its
prompt pools, model, optimiser, schedule and its **own** random streams (checkpoint draws, prompt draws, condition and
target noise, model init), so what it learns does not depend on what trains beside it. :func:`train_runs` steps K
runs in lockstep in one process: the condition encoder (its prompt cache on the device) and the zoo grids are loaded
once for all K, instead of once per generator. A run trained in a group of K is bit-identical to the same run
trained alone (same device; ``tests/test_dnd_gen_group.py``), and each run resumes on its own from its
``train_state.pt`` (a later call may group runs differently).

Throughput: one generator step at the default size (batch 64 of 64 prompts × 256 tokens) is ~74 TFLOP, enough to
fill a GPU, so K runs in lockstep cost about K times one run; ``streams=True`` (CUDA) issues each run on its own
stream, which only helps where one run leaves the GPU idle (measure it with ``dnd_bench.py gen-bench``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..inductor import disable_mix_order_reduction
from .condition import ConditionEncoder, PromptSampler
from .export import ADAPTER_CONFIG
from .gen_loss import token_weights, warmup_cosine, weighted_mse
from .hyperconv import HyperConvDecoder, load_zoo_tensors, plan_chain
from .tokenizer import grid_mask

STATE_VERSION = 2  # train_state.pt layout: per-run noise generator (1: global torch RNG)


class GridBank:
    """Token grids of zoo checkpoints, tokenised once: CPU copy (for the loss weights) and one device copy shared by
    every run (``rows`` maps a run's entries to bank rows)."""

    def __init__(self, entries: Sequence[Mapping], chunk: int, target: str, stats_code: str,
                 device: torch.device | str, cache: dict | None = None) -> None:
        self.entries = [dict(e) for e in entries]
        self.layout, self.grids, self.datasets = load_zoo_tensors(self.entries, chunk, target, cache, stats_code)
        self.device = torch.device(device)
        self.grids_d = self.grids.to(self.device)
        self.mask_d = grid_mask(self.layout).to(self.device)
        self._row = {str(e["path"]): i for i, e in enumerate(self.entries)}

    def rows(self, entries: Sequence[Mapping]) -> list[int]:
        """Bank rows of ``entries`` (every entry must be in the bank)."""
        return [self._row[str(e["path"])] for e in entries]


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


class GeneratorRun:
    """One generator's training state (see the module docstring); ``chain`` must map (n_prompts, max_length,
    encoder hidden) to the bank's grid shape."""

    def __init__(self, bank: GridBank, entries: Sequence[Mapping], pool: Mapping[str, Sequence[str]],
                 encoder: ConditionEncoder, out: str | Path, steps: int, chain: Sequence[tuple[int, int, int]], *,
                 n_prompts: int, batch_size: int, lr: float, weight_decay: float, warmup: int, clip: float,
                 kernel: int, cond_noise: float, target_noise: float, weighting: str, seed: int,
                 holdout: Sequence[str], keep_steps: Sequence[int] = (), config: Mapping[str, Any] | None = None,
                 compile: bool = False) -> None:
        self.bank, self.enc, self.out, self.steps = bank, encoder, Path(out), steps
        self.entries = [dict(e) for e in entries]
        self.ds = [e["dataset"] for e in self.entries]
        rows = bank.rows(self.entries)
        self.rows_d = torch.tensor(rows, device=bank.device)
        self.weight_d = (token_weights(bank.grids[rows], self.ds) if weighting == "std"
                         else torch.ones(bank.grids.shape[1])).to(bank.device)
        self.batch_size, self.clip, self.keep_steps = batch_size, clip, set(keep_steps)
        self.cond_noise, self.target_noise = cond_noise, target_noise
        self.sampler = PromptSampler(pool, n_prompts, seed=seed)
        dev = bank.device
        with torch.random.fork_rng(devices=[]):  # init from the run's seed alone, global RNG untouched
            torch.manual_seed(seed)
            self.model = HyperConvDecoder(chain, kernel)
        self.model.to(dev)
        if compile:  # in place, so state_dict keys and train_state.pt stay those of the eager model
            disable_mix_order_reduction()  # its fused norm backward broke this decoder on CUDA (..inductor)
            self.model.compile()
        self.compiled = compile
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: warmup_cosine(s, warmup, steps))
        self.gen = torch.Generator().manual_seed(seed)  # checkpoint draws
        self.noise = torch.Generator(device=dev).manual_seed(seed + 1)  # condition / target noise
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.sig = {"chain": [list(s) for s in chain], "steps": steps, "batch_size": batch_size, "lr": lr,
                    "seed": seed, "holdout": sorted(holdout), "kernel": kernel, "state_version": STATE_VERSION}
        self.config = dict(config or {})
        self.losses: list[float] = []
        self._pending: list[torch.Tensor] = []  # losses not yet copied to the host (no sync per step)
        self.wall, self.share, self.step = 0.0, 0.0, 0  # share: this run's part of the group's wall seconds
        # share seconds and steps of rounds past each call's warm-up (WARM_ROUNDS): the planner's per-step rate
        # without the compile and first-touch costs, which it counts once per call
        self.steady_share, self.steady_steps = 0.0, 0
        self.out.mkdir(parents=True, exist_ok=True)
        self._resume()

    # ------------------------------------------------------------------------------------------- state
    def _resume(self) -> None:
        path = self.out / "train_state.pt"
        if not path.exists():
            return
        st = torch.load(path, map_location="cpu", weights_only=False)
        if st["sig"] != self.sig:
            raise ValueError(f"{path} belongs to another training ({st['sig']} != {self.sig}): delete it or use "
                             "another out")
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.gen.set_state(st["gen"])
        self.noise.set_state(st["noise"])
        self.sampler.rng.setstate(st["sampler"])
        self.step, self.losses, self.wall, self.share = st["step"], st["losses"], st["wall"], st["share"]
        self.steady_share, self.steady_steps = st.get("steady", (0.0, 0))  # states saved before it: none

    def flush(self) -> list[float]:
        """Copy pending losses to the host (one sync) and return all losses so far."""
        if self._pending:
            self.losses += torch.stack(self._pending).float().cpu().tolist()
            self._pending = []
        return self.losses

    def save_state(self) -> None:
        """Everything needed to continue bit-identically: ``out/train_state.pt``."""
        torch.save({"sig": self.sig, "step": self.step, "losses": self.flush(), "wall": self.wall,
                    "share": self.share, "steady": (self.steady_share, self.steady_steps),
                    "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                    "sched": self.sched.state_dict(), "gen": self.gen.get_state(), "noise": self.noise.get_state(),
                    "sampler": self.sampler.rng.getstate()}, self.out / "train_state.pt")
        (self.out / "train_progress.json").write_text(json.dumps(self.progress()) + "\n")

    def progress(self) -> dict[str, Any]:
        """``step``, ``steps``, ``wall`` and ``share`` seconds, ``steady_share`` seconds over ``steady_steps``
        (rounds past each call's warm-up) and ``compiled`` (small; read by planners without the state)."""
        return {"step": self.step, "steps": self.steps, "wall": round(self.wall, 3), "share": round(self.share, 3),
                "steady_share": round(self.steady_share, 3), "steady_steps": self.steady_steps,
                "compiled": self.compiled}

    # -------------------------------------------------------------------------------------------- step
    def train_step(self) -> None:
        """One optimiser step on a fresh batch (no host sync on CUDA)."""
        dev = self.bank.device
        idx = torch.randint(0, len(self.entries), (self.batch_size,), generator=self.gen)
        cond, _ = self.enc.encode_batch([self.sampler.sample(self.ds[i]) for i in idx.tolist()])
        cond = cond.to(dev)
        y = self.bank.grids_d[self.rows_d[idx.to(dev)]]
        if self.cond_noise:
            cond = cond + self.cond_noise * torch.randn(cond.shape, generator=self.noise, device=dev)
        if self.target_noise:
            y = y + self.target_noise * torch.randn(y.shape, generator=self.noise, device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            pred = self.model(cond)
        loss = weighted_mse(pred.float(), y, self.bank.mask_d, self.weight_d)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        self._pending.append(loss.detach())
        self.step += 1
        if self.step in self.keep_steps:
            _save_weights(self.model, self.out / f"generator_step{self.step:06d}.safetensors")

    def finish(self) -> dict[str, Any]:
        """Write ``generator.safetensors``, ``generator_config.json``, the template adapter config and
        ``train_log.json``; drop ``train_state.pt``."""
        self.flush()
        (self.out / "train_state.pt").unlink(missing_ok=True)
        (self.out / "train_progress.json").unlink(missing_ok=True)
        _save_weights(self.model, self.out / "generator.safetensors")
        shutil.copy(Path(self.entries[0]["path"]) / ADAPTER_CONFIG, self.out / "template_adapter_config.json")
        cfg = {"chain": self.sig["chain"], "kernel": self.sig["kernel"], "layout": self.bank.layout.to_json(),
               "encoder": self.enc.name, "max_length": self.enc.max_length, "n_prompts": self.sampler.n,
               "holdout": self.sig["holdout"], "train_datasets": list(dict.fromkeys(self.ds)),
               "zoo_entries": self.entries, "parameters": self.parameters, "steps": self.steps,
               "batch_size": self.batch_size, "lr": self.sig["lr"], "seed": self.sig["seed"],
               "compiled": self.compiled, **self.config}
        with open(self.out / "generator_config.json", "w") as f:
            json.dump(cfg, f, indent=1, default=str)
        summary = self.summary(True)
        with open(self.out / "train_log.json", "w") as f:
            json.dump(summary, f)
        return summary

    @property
    def parameters(self) -> int:
        """Trainable parameters of the decoder."""
        return self.model.count_parameters()

    def summary(self, complete: bool) -> dict[str, Any]:
        """``parameters``, ``losses``, ``seconds`` (wall seconds of the training loop over all calls: the group's),
        ``share_seconds`` (this run's part: each round's time divided by the runs in it), ``steady_share_seconds``
        over ``steady_steps`` (the same, past each call's warm-up rounds), ``out``, ``complete``, ``step``."""
        return {"parameters": self.parameters, "losses": self.flush(), "seconds": self.wall,
                "share_seconds": self.share, "steady_share_seconds": self.steady_share,
                "steady_steps": self.steady_steps, "out": str(self.out), "complete": complete, "step": self.step}


WARM_ROUNDS = 3  # rounds of each call that compile (Inductor), autotune and first touch memory


def train_runs(runs: Sequence[GeneratorRun], *, max_seconds: float | None = None, stop_after: int | None = None,
               streams: bool = False, t0: float | None = None) -> list[dict[str, Any]]:
    """Step every unfinished run once per round until all are done, ``stop_after`` rounds have run in this call, or
    ``max_seconds`` (from ``t0``) have passed; then finished runs write their generator and the others their
    ``train_state.pt``. Returns one summary per run (``complete`` says which). ``streams``: each run on its own
    CUDA stream (rounds are synchronised, so a stop is never more than one round late). A run's wall seconds are
    the group's (K runs in lockstep each record the whole round time)."""
    t0 = time.perf_counter() if t0 is None else t0
    cuda = any(r.bank.device.type == "cuda" for r in runs)
    for r in runs:
        r.model.train()
        if r.stream is not None:
            r.stream.wait_stream(torch.cuda.current_stream(r.bank.device))
    rounds = 0
    done = {id(r): r.finish() for r in runs if r.step >= r.steps}
    while True:
        active = [r for r in runs if r.step < r.steps]
        if not active:
            break
        if ((stop_after is not None and rounds >= stop_after)
                or (max_seconds is not None and time.perf_counter() - t0 > max_seconds)):
            for r in active:
                r.save_state()
            break
        s0 = time.perf_counter()
        for r in active:
            if streams and r.stream is not None:
                with torch.cuda.stream(r.stream):
                    r.train_step()
            else:
                r.train_step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - s0
        for r in active:
            r.wall += dt
            r.share += dt / len(active)
            if rounds >= WARM_ROUNDS:
                r.steady_share += dt / len(active)
                r.steady_steps += 1
            if r.step >= r.steps:
                done[id(r)] = r.finish()  # at once: a later stop or crash cannot lose a finished generator
        rounds += 1
    return [done.get(id(r)) or r.summary(False) for r in runs]


GROUP_DEFAULTS: dict[str, Any] = {"steps": 1000, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.1, "warmup": 50,
                                  "clip": 1.0, "width": 64, "n_layers": 4, "kernel": 5, "n_prompts": 64,
                                  "max_length": 256, "chunk": 192, "target": "ab", "stats_code": "relative",
                                  "cond_noise": 1e-4, "target_noise": 1e-5, "weighting": "std", "seed": 0}


def train_group(entries: Sequence[Mapping], holdouts: Sequence[str], outs: Sequence[str | Path],
                pools_for: Callable[[str], Sequence[str]], encoder: ConditionEncoder, *,
                opts: Mapping[str, Any] | None = None, keep_steps: Sequence[int] = (),
                max_seconds: float | None = None, stop_after: int | None = None, streams: bool = False,
                grid_cache: dict | None = None, t0: float | None = None, compile: bool = False,
                exclude: Sequence[Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """Leave-one-out generators for ``holdouts`` trained side by side: generator i learns every entry whose dataset
    is not ``holdouts[i]`` (nor in ``exclude[i]``, an ablation's further datasets left out) and writes to
    ``outs[i]``. One :class:`GridBank` over all entries and one warmed encoder cache serve every run. ``opts``
    overrides :data:`GROUP_DEFAULTS`. Returns one :meth:`GeneratorRun.summary` per holdout (``complete`` False for a
    run that continues in a later call, from its ``train_state.pt``).
    ``compile``: each decoder through ``torch.compile`` (an execution choice like ``streams``: fused element-wise
    work around the convolutions). Its rounding differs from eager's; a run may switch between calls (the state
    is the same), and its generator records whether its last call compiled."""
    t0 = time.perf_counter() if t0 is None else t0
    o = {**GROUP_DEFAULTS, **(opts or {})}
    if encoder.max_length != o["max_length"]:
        raise ValueError(f"encoder max_length {encoder.max_length} != max_length {o['max_length']}")
    dev = encoder.cache_device
    bank = GridBank(entries, o["chunk"], o["target"], o["stats_code"], dev, cache=grid_cache)
    datasets = list(dict.fromkeys(e["dataset"] for e in entries))
    pools = {d: list(pools_for(d)) for d in datasets}
    encoder.warm(pools)
    in_shape = (o["n_prompts"], o["max_length"], encoder.hidden)
    chain = plan_chain(in_shape, bank.layout.grid_shape, o["width"], o["n_layers"])
    runs = []
    for h, out, more in zip(holdouts, outs, exclude or [()] * len(holdouts), strict=True):
        left_out = [h, *more]
        train = [e for e in entries if e["dataset"] not in left_out]
        if not train:
            raise ValueError(f"no zoo checkpoints left after holding out {', '.join(left_out)}")
        runs.append(GeneratorRun(
            bank, train, {d: pools[d] for d in dict.fromkeys(e["dataset"] for e in train)}, encoder, out,
            o["steps"], chain, n_prompts=o["n_prompts"], batch_size=o["batch_size"], lr=o["lr"],
            weight_decay=o["weight_decay"], warmup=o["warmup"], clip=o["clip"], kernel=o["kernel"],
            cond_noise=o["cond_noise"], target_noise=o["target_noise"], weighting=o["weighting"], seed=o["seed"],
            holdout=left_out, keep_steps=keep_steps, config={"target": o["target"], "condition": "raw",
                                                        "group": list(holdouts)}, compile=compile))
    return train_runs(runs, max_seconds=max_seconds, stop_after=stop_after, streams=streams, t0=t0)


__all__ = ["GROUP_DEFAULTS", "STATE_VERSION", "GeneratorRun", "GridBank", "train_group", "train_runs"]
