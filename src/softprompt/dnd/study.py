"""Resumable cloze study on one GPU: base model, zoo gate and cross-dataset LoRA scores (issue 21, steps 1-2).

A *state* folder holds one JSON per finished stage (``stages/<name>.json``) plus the zoo weights. Stages:

* ``base``: the base model's cloze scores on every dataset's evaluation subset (per-example 0/1 kept);
* ``zoo:<cfg>:<dataset>``: one dataset's LoRA zoo under config ``cfg`` (its own folder
  ``zoo_<cfg>/<dataset dir>``; same init seed everywhere, so all folders share one init), then its final
  checkpoint scored on the dataset's dev part (for tuning) and on its evaluation subset;
* ``cross:<cfg>``: every final LoRA of ``cfg`` scored on every other dataset's evaluation subset (the
  training-LoRA mean / best of leave-one-out);
* with ``generators=True``, per held-out dataset: ``gen:<cfg>:<h>`` and ``dnd:<cfg>:<h>`` (:mod:`.study_gen`). A
  ``gen`` stage may span calls: it starts when 120 s are left and trains until the budget is spent. ``gen_group``
  generators train side by side in one process (:mod:`.gen_train`); with ``session_left`` (device seconds left in
  the session) a generator is started only if it and its ``dnd`` stage can finish before the session ends (a
  generator cut by the session's end loses its training state with the machine). Ablations (``stats_ablation``,
  ``nearest_ablation``: ``gen``/``dnd:<cfg>+<tag>:<h>``, :data:`.study_gen.TAGS`) come after every main generator.

A stage result records the cloze format version (:data:`.cloze.FORMAT_VERSIONS`) of every dataset it depends on
(a zoo stage: its dataset; every other stage: all datasets), and ``gen``/``dnd`` results their generator options;
a result made with other versions or options is *stale*: not done, not exported, not restored, and redone.
With ``zoo_workers`` > 1 the zoo stages of a config run in that many processes at once (:mod:`.study_zoo`).

A stage starts only if its estimate (the longest finished stage of its kind, else a prior) fits in the time budget,
so a 10-minute device call stops cleanly; a rerun skips finished stages. Stage JSONs are small: they travel back in
``$OUT`` and ``restore`` brings them into a fresh state (whose zoo weights the zoo stages then rebuild).

Evaluation subset: the sha256-ranked first ``n_eval`` records of the DnD ``test`` part (key
``<dataset>|dnd-eval``, seed 0), all of them when fewer.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .cloze import evaluate_cloze, format_version, primary_measure
from .harness import _rank, dnd_records
from .study_gen import ablation_targets
from .templates import DATASETS
from .zoo import build_zoo, dataset_dirname

PRIORS = {"base": 60.0, "zoo": 90.0, "cross": 120.0, "gen": 120.0, "dnd": 120.0}  # s, until measured
# Warm-up steps of each zoo LoRA also saved (with their optimiser seconds): the cost table's "LoRA training to match
# DnD" bisects them (``study_gen.lora_to_match``).
ZOO_CURVE_STEPS = (10, 25, 50, 100, 150, 200)
ZOO_MAX_LENGTH = 1024  # tokens per zoo training example: BoolQ v2's demonstrations + passage fit uncut
REBUILD_TOLERANCE = 0.01  # a rebuilt zoo keeps its recorded scores if every kept step's loss is this close


def eval_records(dataset: str, n_eval: int = 500) -> list[dict[str, Any]]:
    """The evaluation subset of ``dataset``: sha256-ranked first ``n_eval`` records of its DnD test part."""
    recs = dnd_records(dataset, "test")
    keep = sorted(_rank(f"{dataset}|dnd-eval", 0, len(recs))[:n_eval])
    return [recs[i] for i in keep]


def parse_config(text: str) -> dict[str, Any]:
    """``"r8,lr2e-4,steps250,ckpt50,every1"`` -> zoo options; the text (commas -> '_') names the config."""
    keys = {"r": ("rank", int), "lr": ("lr", float), "steps": ("steps", int), "ckpt": ("checkpoints", int),
            "every": ("checkpoint_every", int), "bs": ("batch_size", int), "min": ("min_lr_ratio", float)}
    cfg: dict[str, Any] = {"rank": 8, "lr": 2e-4, "steps": 250, "checkpoints": 50, "checkpoint_every": 1,
                           "batch_size": 32, "min_lr_ratio": 0.1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key = next((k for k in sorted(keys, key=len, reverse=True) if part.startswith(k)), None)
        if key is None:
            raise ValueError(f"config part {part!r}: use r, lr, steps, ckpt, every, bs, min (e.g. r8,lr2e-4)")
        name, typ = keys[key]
        cfg[name] = typ(part[len(key):])
    if cfg["steps"] < cfg["checkpoints"] * cfg["checkpoint_every"]:
        raise ValueError(f"{text}: steps < ckpt × every")
    cfg["name"] = text.replace(",", "_")
    return cfg


class Study:
    """Runs the stages of one state folder (see the module docstring)."""

    def __init__(self, state: str | Path, model: str, datasets: Sequence[str] = DATASETS,
                 configs: Sequence[str] = ("r8,lr2e-4,steps250,ckpt50",), n_eval: int = 500,
                 n_dev: int = 500, batch_size: int = 64, device: str | None = None,
                 log: Callable[[str], None] = print, generators: bool = False, encoder: str = "minilm",
                 gen: dict[str, Any] | None = None, stats_ablation: bool | Sequence[str] = False, gen_group: int = 1,
                 gen_streams: bool = False, session_left: float | None = None,
                 gen_step_seconds: float | None = None, zoo_workers: int = 1, gen_compile: bool = False,
                 nearest_ablation: bool | Sequence[str] = False) -> None:
        # what a zoo worker process needs to rebuild this study (softprompt.dnd.study_zoo)
        self.init_kwargs = {"state": str(state), "model": model, "datasets": list(datasets),
                            "configs": list(configs), "n_eval": n_eval, "n_dev": n_dev, "batch_size": batch_size,
                            "device": device}
        self.zoo_workers = max(1, zoo_workers)
        self.state = Path(state)
        self.model_path, self.datasets, self.n_eval, self.n_dev = model, list(datasets), n_eval, n_dev
        self.configs = [parse_config(c) for c in configs]
        self.batch_size, self.device, self.log = batch_size, device, log
        self._recs: dict[str, list] = {}
        self.generators, self.encoder, self.gen = generators, encoder, dict(gen or {})
        self.ablations = {tag: ablation_targets(tag, which, self.datasets)
                          for tag, which in (("statsdnd", stats_ablation), ("nonearest", nearest_ablation))}
        (self.state / "stages").mkdir(parents=True, exist_ok=True)  # after the checks: a bad call leaves nothing
        self.gen_group, self.gen_streams, self.gen_compile = max(1, gen_group), gen_streams, gen_compile
        self.session_left, self.gen_step_prior = session_left, gen_step_seconds

    # -------------------------------------------------------------------------------------------- helpers
    def stages(self) -> list[str]:
        """All stage names in run order."""
        out = ["base"]
        for c in self.configs:  # a config's cross stage right after its zoo: the first config completes first
            out += [f"zoo:{c['name']}:{d}" for d in self.datasets] + [f"cross:{c['name']}"]
            if self.generators:
                out += [f"{k}:{c['name']}:{d}" for d in self.holdout_order() for k in ("gen", "dnd")]
            for tag, held in self.ablations.items() if self.generators else ():  # after every main generator
                order = self.holdout_order() if held is True else held
                out += [f"{k}:{c['name']}+{tag}:{d}" for d in order for k in ("gen", "dnd")]
        return out

    def holdout_order(self) -> list[str]:
        """Held-out datasets in the order their generators run: once ``base`` is recorded, valid targets first (base
        above chance and above the majority-class rate in the dataset's primary measure), so that a study cut short
        by the device budget (a generator costs ~7 minutes) has the datasets on which an effect can show."""
        if not self.recorded("base"):
            return list(self.datasets)
        base = self.result("base").get("datasets", {})

        def valid(d: str) -> bool:
            t = base.get(d, {}).get("test") or {}
            m = primary_measure(d)
            return m in t and t[m] > t["chance"] and t[m] > t["majority"]

        return sorted(self.datasets, key=lambda d: not valid(d))  # stable: the study's order within each group

    def gen_dir(self, cfg: dict[str, Any], holdout: str, tag: str = "") -> Path:
        return self.state / f"gen_{cfg['name']}{tag}" / dataset_dirname(holdout)

    def path(self, stage: str) -> Path:
        return self.state / "stages" / (stage.replace(":", "__").replace("/", "__") + ".json")

    def deps(self, stage: str) -> list[str]:
        """Datasets whose cloze format a stage's result depends on: a zoo stage its own dataset; ``base``,
        ``cross``, ``gen`` and ``dnd`` every dataset of the study (a generator learns the other datasets' zoos)."""
        kind, *rest = stage.split(":")
        return [rest[1]] if kind == "zoo" else list(self.datasets)

    def formats(self, stage: str) -> dict[str, int]:
        """``{dataset: cloze format version}`` of a stage's dependencies now (:data:`.cloze.FORMAT_VERSIONS`)."""
        return {d: format_version(d) for d in self.deps(stage)}

    def fresh(self, stage: str, res: dict[str, Any]) -> bool:
        """Whether a stage result was made with today's cloze formats (a result without ``formats`` predates them:
        v1 everywhere) and, for ``gen``/``dnd`` stages, with today's generator options (:func:`.study_gen.stale`)."""
        rec = res.get("formats", {})
        if not all(rec.get(d, 1) == v for d, v in self.formats(stage).items()):
            return False
        if stage.startswith(("gen:", "dnd:")):
            from .study_gen import stale

            return not stale(self, stage, res)
        return True

    def recorded(self, stage: str) -> bool:
        """A result exists, made with the current formats/options (a stale result is redone and overwritten)."""
        return self.path(stage).exists() and self.fresh(stage, self.result(stage))

    def done(self, stage: str) -> bool:
        """Recorded, and for a zoo stage its weights are here too (restored zoo records are rebuilt, see
        :meth:`run_zoo`)."""
        if not self.recorded(stage):
            return False
        if stage.startswith("zoo:"):
            _, name, d = stage.split(":")
            cfg = next((c for c in self.configs if c["name"] == name), None)
            return cfg is not None and (self.zoo_dir(cfg, d) / self.result(stage)["final"]["path"]).exists()
        return True

    def result(self, stage: str) -> dict[str, Any]:
        return json.loads(self.path(stage).read_text())

    def estimate(self, stage: str) -> float:
        kind = stage.split(":")[0]
        seen = [self.result(s)["seconds"] for s in self.stages() if s.startswith(kind) and self.recorded(s)]
        return max(seen) if seen else PRIORS[kind]

    def records(self, dataset: str) -> list[dict[str, Any]]:
        if dataset not in self._recs:
            self._recs[dataset] = eval_records(dataset, self.n_eval)
        return self._recs[dataset]

    def _load(self, adapter: str | None = None) -> tuple[Any, Any]:
        from .harness import AdapterSlot, load_model

        if adapter is None:
            return load_model(self.model_path, None, self.device)
        self._slot = getattr(self, "_slot", None) or AdapterSlot(self.model_path, self.device)  # one base model
        return self._slot.load(adapter)

    def _score(self, model: Any, tok: Any, dataset: str, records: list | None = None) -> dict[str, Any]:
        r = evaluate_cloze(model, tok, dataset, records=records if records is not None else self.records(dataset),
                           batch_size=self.batch_size, return_details=True)
        r.pop("scores")
        return r

    # --------------------------------------------------------------------------------------------- stages
    def run_base(self) -> dict[str, Any]:
        model, tok = self._load()
        return {"datasets": {d: {"test": self._score(model, tok, d),
                                 "dev": self._score(model, tok, d, dnd_records(d, "dev")[:self.n_dev])}
                             for d in self.datasets}}

    def zoo_dir(self, cfg: dict[str, Any], dataset: str) -> Path:
        return self.state / f"zoo_{cfg['name']}" / dataset_dirname(dataset)

    def run_zoo(self, cfg: dict[str, Any], dataset: str) -> dict[str, Any]:
        """Train one dataset's zoo and score its final checkpoint. A *rebuild* (a recorded result whose weights are
        gone with a lost machine) keeps the recorded scores when every kept step's training loss matches the
        record within ``REBUILD_TOLERANCE`` (relative), and appends the check to ``rebuilds``; otherwise it is
        scored anew and the config's ``cross`` stage, which scored the old weights, is dropped."""
        import torch

        stage = f"zoo:{cfg['name']}:{dataset}"
        old = self.result(stage) if self.recorded(stage) else None
        t0 = time.time()
        model, tok = self._load()
        t_load = time.time() - t0  # where a stage's seconds go (below: the GPU machine is not profiled otherwise)
        out = self.zoo_dir(cfg, dataset)
        if out.exists():
            shutil.rmtree(out)  # a stage interrupted mid-way leaves partial checkpoints
        warm = cfg["steps"] - cfg["checkpoints"] * cfg["checkpoint_every"]
        man = build_zoo(self.model_path, [dataset], rank=cfg["rank"], warmup_steps=warm,
                        checkpoints=cfg["checkpoints"], out=out, lr=cfg["lr"], batch_size=cfg["batch_size"],
                        checkpoint_every=cfg["checkpoint_every"], min_lr_ratio=cfg["min_lr_ratio"],
                        dev_limit=0, model=model, tokenizer=tok, progress=False, device=self.device,
                        max_length=ZOO_MAX_LENGTH, curve_steps=[s for s in ZOO_CURVE_STEPS if s <= warm])
        final = man["checkpoints"][-1]
        losses = [c["train_loss"] for c in man["checkpoints"]]
        entry = man["datasets"][dataset]
        profile = {"load_s": round(t_load, 2), "build_s": round(time.time() - t0 - t_load, 2), **entry["memory"],
                   **{f"{k}_s": entry.get(f"{k}_seconds") for k in ("prep", "train", "save")}, "zoo_workers": 1}
        # This machine's optimiser seconds to each saved step, the final one last (a kept record's seconds came from
        # another machine, so a rebuild brings its own).
        curve = [{k: c[k] for k in ("step", "path", "train_seconds")} for c in man["datasets"][dataset]["curve"]]
        curve.append({"step": final["step"], "path": final["path"], "train_seconds": final["train_seconds"]})
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        if old is not None and len(old["losses"]) == len(losses):
            diff = max(abs(a - b) / max(abs(b), 1e-8) for a, b in zip(losses, old["losses"]))
            check = {"loss_max_rel_diff": diff, "train_seconds": entry["train_seconds"], "profile": profile}
            self.log(f"rebuilt {stage}: kept-step losses within {diff:.2e} (relative) of the record; "
                     f"seconds {profile}")
            if diff <= REBUILD_TOLERANCE and old["final"]["path"] == final["path"]:
                return {**old, "curve": curve, "rebuilds": [*old.get("rebuilds", []), check]}
            self.path(f"cross:{cfg['name']}").unlink(missing_ok=True)
        pm, tok = self._load(str(out / final["path"]))
        return {"final": final, "train_seconds": entry["train_seconds"], "losses": losses, "curve": curve,
                "profile": profile,
                "dev": self._score(pm, tok, dataset, dnd_records(dataset, "dev")[:self.n_dev]),
                "test": self._score(pm, tok, dataset)}

    def run_cross(self, cfg: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for src in self.datasets:
            z = self.result(f"zoo:{cfg['name']}:{src}")
            pm, tok = self._load(str(self.zoo_dir(cfg, src) / z["final"]["path"]))
            out[src] = {d: self._score(pm, tok, d) for d in self.datasets if d != src}
        return {"lora_on": out}

    def run(self, time_budget: float = 540.0, export: str | Path | None = None,
            t0: float | None = None) -> str:
        """Run the pending stages that fit; returns ``complete`` or ``stopped before <stage>``."""
        t0 = time.time() if t0 is None else t0
        cfgs = {c["name"]: c for c in self.configs}
        for stage in self.stages():
            if self.done(stage):
                continue
            left = time_budget - (time.time() - t0)
            need = 1.15 * (120.0 if stage.startswith("gen:") else self.estimate(stage)) + 10
            if need > left:
                self.log(f"stop before {stage}: needs ~{need:.0f} s, {left:.0f} s left")
                return f"stopped before {stage}"
            self.log(f"stage {stage} (estimate {self.estimate(stage):.0f} s)")
            s0 = time.time()
            kind, *rest = stage.split(":")
            if kind == "base":
                res = self.run_base()
            elif kind == "zoo" and self.zoo_workers > 1:
                from .study_zoo import run_zoos_parallel

                todo = [s for s in self.stages() if s.startswith(f"zoo:{rest[0]}:") and not self.done(s)]
                self.log(f"zoo stages {', '.join(todo)} in {self.zoo_workers} processes")
                run_zoos_parallel(self, todo, left - 20, self.zoo_workers)
                if export:
                    self.export(export)
                if not all(self.done(s) for s in todo):
                    return f"stopped during {stage}"
                continue
            elif kind == "zoo":
                res = self.run_zoo(cfgs[rest[0]], rest[1])
            elif kind == "cross":
                res = self.run_cross(cfgs[rest[0]])
            elif kind == "gen":
                status = self._run_gens(stage, cfgs, t0, time_budget, export)
                if status:
                    return status
                continue
            else:
                from .study_gen import run_dnd

                name, _, tag = rest[0].partition("+")
                res = run_dnd(self, cfgs[name], rest[1], tag=tag)
            res["seconds"], res["formats"] = round(time.time() - s0, 2), self.formats(stage)
            self.path(stage).write_text(json.dumps(res) + "\n")
            self.log(f"done {stage} in {res['seconds']:.1f} s")
            if export:
                self.export(export)
        return "complete"

    def gen_plan(self, stage: str, t0: float) -> list[str]:
        """Held-out datasets whose generators train together from ``stage`` on: the next ``gen_group`` pending
        generators of the stage's config, cut to those that can still finish, with their ``dnd`` stages, within
        ``session_left`` (seconds of device time the session had at ``t0``; a generator cut by the session's end
        restarts from zero next session). Empty when not even one fits."""
        from .study_gen import gen_step_seconds, steps_left

        head = stage.rsplit(":", 1)[0] + ":"
        group = [s.rsplit(":", 1)[1] for s in self.stages() if s.startswith(head) and not self.done(s)]
        group = group[:self.gen_group]
        if self.session_left is None:
            return group
        name, _, tag = head.split(":")[1].partition("+")
        cfg = next(c for c in self.configs if c["name"] == name)
        per_step = gen_step_seconds(self, self.gen_step_prior)
        left = self.session_left - (time.time() - t0)
        while group:
            train = sum(steps_left(self, cfg, h, tag) for h in group) * per_step
            need = 1.1 * (train + len(group) * self.estimate("dnd")) + 60 * (1 + int(train // 540))
            if need <= left:
                break
            self.log(f"session: {len(group)} generator(s) need ~{need:.0f} s ({per_step:.2f} s per generator "
                     f"step), {left:.0f} s left")
            group = group[:-1]
        return group

    def _run_gens(self, stage: str, cfgs: dict[str, dict[str, Any]], t0: float, time_budget: float,
                  export: str | Path | None) -> str | None:
        """Train the generator group that starts at ``stage`` (see :meth:`gen_plan`); writes the finished ``gen``
        stages; returns a stop status, or None when every generator of the group finished in this call."""
        from .study_gen import run_gen_group

        group = self.gen_plan(stage, t0)
        if len(group) > 1 and self.session_left is None:
            self.log(f"warning: {len(group)} generators side by side without a session limit (--session-left): "
                     "all of them restart if the session ends before they finish")
        if not group:
            self.log(f"stop before {stage}: no generator can finish within this session's device time")
            return f"stopped before {stage} (session)"
        cfg_tag = stage.split(":")[1]
        name, _, tag = cfg_tag.partition("+")
        left = time_budget - (time.time() - t0)
        self.log(f"generators {', '.join(group)} ({cfg_tag}) side by side, {left - 40:.0f} s in this call")
        res = run_gen_group(self, cfgs[name], group, max_seconds=left - 40, tag=tag)
        for h, r in res.items():
            if r is not None:
                r["seconds"], r["formats"] = round(r["share_seconds"], 2), self.formats(f"gen:{cfg_tag}:{h}")
                self.path(f"gen:{cfg_tag}:{h}").write_text(json.dumps(r) + "\n")
                self.log(f"done gen:{cfg_tag}:{h} ({r['train_seconds']:.1f} s of group training)")
        if export:
            self.export(export)
        return f"stopped during {stage}" if any(r is None for r in res.values()) else None

    def export(self, out: str | Path) -> Path:
        """Every finished stage JSON in one file ``out/dnd_cloze_stages.json`` (small; no weights)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        data = {s: self.result(s) for s in self.stages() if self.recorded(s)}
        (out / "dnd_cloze_stages.json").write_text(json.dumps(data) + "\n")
        return out / "dnd_cloze_stages.json"

    def restore(self, stages_file: str | Path) -> list[str]:
        """Bring exported stage JSONs into this state (a lost machine's state); returns the stages written.

        Kept: ``base``; every zoo stage as a *record* (its weights are rebuilt by :meth:`run_zoo`, which keeps the
        recorded scores when the rebuild reproduces the recorded losses); ``cross`` (it scored the recorded
        weights, dropped if a rebuild does not reproduce them); every finished generator (a ``gen`` stage with its
        ``dnd`` stage: its draws are scored, nothing needs its weights again; it stays paired with the zoo it was
        trained on). Dropped: stale results (older cloze formats or generator options) and a ``gen`` stage whose
        ``dnd`` stage is missing (its weights are lost, so it is trained again)."""
        raw = json.loads(Path(stages_file).read_text())
        data = {s: r for s, r in raw.items() if s in self.stages() and self.fresh(s, r)}
        kept = []
        for stage, res in data.items():
            kind, *rest = stage.split(":")
            if kind in ("gen", "dnd") and not {f"gen:{rest[0]}:{rest[1]}", f"dnd:{rest[0]}:{rest[1]}"} <= data.keys():
                continue
            if not self.recorded(stage):
                self.path(stage).write_text(json.dumps(res) + "\n")
                kept.append(stage)
        return kept
