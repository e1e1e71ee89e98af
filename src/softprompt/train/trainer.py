"""transformers' Trainer, changed only in what it saves and loads: the adapter (safetensors + JSON), never the
frozen base model; plus a sampler that makes runs independent of the number of processes."""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..errors import NonFiniteLossError
from ..io import read_adapter_tensors
from .bucketing import mark_length_dynamic


class ListDataset(torch.utils.data.Dataset):
    """A list of feature dicts as a torch Dataset."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch), identical on every rank.

    accelerate shards the *batches* of this sampler across ranks (rank r takes batches r, r+W, ...), so a step of
    W processes with batch b sees exactly the examples of one step of a single process with batch W*b: runs with the
    same global batch give the same adapter whatever the number of processes.

    ``full_batches`` (a global batch size, 0 = off): each epoch keeps the largest multiple of it, so that every batch
    is full. Compiled runs use it: a smaller last batch changes the batch dimension, and the step compiles again (a
    second, dynamic graph; on the GPU Inductor failed on one, see docs/performance.md). The examples left out differ
    from epoch to epoch (each epoch's permutation is new); a dataset smaller than one batch keeps all its examples.
    """

    def __init__(self, n: int, seed: int, full_batches: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0
        self.kept = n - n % full_batches if 0 < full_batches <= n else n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.kept

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[: self.kept].tolist())


class AdapterTrainer(Trainer):
    """Saves and restores only the adapter (safetensors + JSON); stops on a non-finite loss."""

    # Set when a compiled run pads batches to several length buckets: the model's inputs then carry a dynamic
    # length, so that one compilation serves them all (``bucketing.mark_length_dynamic``).
    dynamic_length = False
    # Set by compiled runs: train on full global batches only (``EpochShuffleSampler``'s ``full_batches``).
    full_batches_only = False

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        return mark_length_dynamic(inputs) if self.dynamic_length and self.model.training else inputs

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        full = self.args.per_device_train_batch_size * self.args.world_size if self.full_batches_only else 0
        return EpochShuffleSampler(len(dataset), self.args.data_seed or self.args.seed, full_batches=full)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        self.check_finite()  # never save what a non-finite step produced
        output_dir = output_dir or self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        unwrapped.save_pretrained(output_dir, **getattr(self, "adapter_metadata", {}))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model
        load_adapter_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter_weights(self.model, self.state.best_model_checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The first step whose loss is not finite (step, loss), kept on the device: reading it back every step would
        # make the host wait for every step (no overlap, and CUDA graphs lose what they gain). It is read where the
        # Trainer reads anyway (logging) and before anything is saved.
        value = loss.detach().float().sum()
        step, first = getattr(self, "_first_bad", None) or (torch.zeros((), dtype=torch.long, device=loss.device),
                                                           torch.zeros((), device=loss.device))
        new = ~torch.isfinite(value) & (step == 0)
        self._first_bad = (torch.where(new, self.state.global_step + 1, step), torch.where(new, value, first))
        return loss

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if some step's loss was not finite (one read of two device scalars)."""
        if getattr(self, "_first_bad", None) is None:
            return
        step, value = torch.stack([t.double() for t in self._first_bad]).tolist()
        if step:
            raise NonFiniteLossError(
                f"loss became {value} at step {int(step)}; the last good checkpoint is kept in {self.args.output_dir}. "
                "Lower the learning rate (--lr) or use bf16 instead of fp16."
            )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        self.check_finite()
        super().log(logs, *args, **kwargs)


def load_adapter_weights(model, folder: str) -> None:
    """Restore a checkpoint's adapter tensors into a training model (names and shapes checked)."""
    model.load_adapter_tensors(read_adapter_tensors(folder), folder)


class LossLogger(TrainerCallback):
    """Keeps every logged entry (loss, learning rate, eval metrics) with its step."""

    def __init__(self):
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs:
            self.history.append({"step": state.global_step, **logs})


class StepClock(TrainerCallback):
    """Splits a run's training time into steady steps and one-off costs (compilation, CUDA-graph recording, warm-up),
    so that ``--compile auto``'s cost model can be calibrated from real runs (``train/bucketing.py``).

    It reads the host clock at the end of every ``window``-th step and never synchronises: over a window the host
    cannot run ahead of the device by more than the launch queue, and the Trainer reads the loss back at logging
    steps. ``summary()``: ``steady_step_ms``, the median of the windows' mean step times over the run's second half
    (by then every length bucket has been seen), and ``one_off_s``, the training time those steps do not explain."""

    def __init__(self, window: int = 50):
        self.window = window
        self.marks: list[tuple[int, float]] = []

    def on_train_begin(self, args, state, control, **kw):
        self.marks = [(state.global_step, time.perf_counter())]

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % self.window == 0:
            self.marks.append((state.global_step, time.perf_counter()))

    def on_train_end(self, args, state, control, **kw):
        self.marks.append((state.global_step, time.perf_counter()))

    def summary(self) -> dict[str, float | None]:
        """``steady_step_ms`` and ``one_off_s`` of this run (:func:`split_time`)."""
        return split_time(self.marks, self.window)


def split_time(marks: list[tuple[int, float]], window: int) -> dict[str, float | None]:
    """From (step, seconds) marks taken every ``window`` steps (plus the start and the end): ``steady_step_ms``, the
    median of the full windows' mean step times over the second half, and ``one_off_s``, the time those steps do
    not explain. Both None with fewer than four windows."""
    spans = [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(marks) if b[0] > a[0]]
    late = [sec / steps for steps, sec in spans[len(spans) // 2:] if steps == window]
    if len(spans) < 4 or not late:
        return {"steady_step_ms": None, "one_off_s": None}
    steady = statistics.median(late)
    total_steps, total_s = marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1]
    return {"steady_step_ms": round(steady * 1e3, 3), "one_off_s": round(total_s - total_steps * steady, 2)}


def last_checkpoint(output: str) -> str | None:
    """The newest *complete* checkpoint folder: a process killed while writing one leaves it incomplete, so we fall
    back to the one before (the Trainer writes ``trainer_state.json`` last; our adapter files are atomic)."""
    root = Path(output)
    if not root.is_dir():
        return None
    found = []
    for d in root.glob("checkpoint-*"):
        suffix = d.name.split("-", 1)[1]
        if d.is_dir() and suffix.isdigit():
            found.append((int(suffix), d))
    for _, d in sorted(found, reverse=True):
        try:
            json.loads((d / "trainer_state.json").read_text())
            read_adapter_tensors(d)
        except (OSError, ValueError):
            continue
        if (d / "optimizer.pt").exists() and (d / "scheduler.pt").exists():
            return str(d)
    return None


class ProgressLines(TrainerCallback):
    """One plain, flushed line per logging step, for output that is not a terminal (CI, nohup, a pipe), where the
    progress bar is off and print's buffering would otherwise hold everything back until the run ends."""

    def __init__(self):
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or not state.is_world_process_zero:
            return
        keep = [(k, v) for k, v in logs.items() if k in ("loss", "learning_rate", "grad_norm")
                or (k.startswith("eval_") and not k.endswith(("_runtime", "_per_second")))]
        if not keep:  # the end-of-training summary: the CLI prints the metrics itself
            return
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in keep)
        print(f"step {state.global_step}/{state.max_steps}  {shown}  ({time.time() - self.start:.0f} s)", flush=True)
