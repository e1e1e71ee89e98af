"""Generator stages of the cloze study (issue 21, step 4): leave-one-dataset-out DnD on the cloze zoo.

For a zoo config ``cfg`` and each held-out dataset ``h`` (after ``cross:<cfg>``):

* ``gen:<cfg>:<h>``: a hyper-conv generator trained on every zoo checkpoint of the other datasets (raw conditions,
  :func:`.cloze.condition_text`), resumable across device calls (``train_generator(max_seconds=…)``; the stage is
  finished only when the training is), keeping a mid-training generator too (``generator_step<k>``);
* ``dnd:<cfg>:<h>``: ``draws`` adapters from each of the two generator checkpoints, conditioned on unlabeled prompts
  of ``h`` (the part of h's test split that is not evaluated when at least ``min_pool`` remain, else h's zoo part),
  each scored on h's evaluation subset; in-distribution recovery (the generator fed its first training dataset's
  own prompts, scored there, against that dataset's own LoRA); the nearest-dataset LoRA (the training dataset whose
  mean prompt embedding is closest in cosine to h's); the zoo mean (elementwise mean of A and of B over the
  generator's training checkpoints, jerryliang24/Drag-and-Drop-LLMs#4) and the token-space zoo mean (the decoded
  mean token grid: exactly the MSE optimum for an uninformative condition, :func:`.hyperconv.grid_mean_state`)
  and generation seconds; and the cost to match: the optimiser seconds h's own LoRA trained until it scored as
  well as DnD's mean (:func:`lora_to_match`).
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Sequence
from typing import Any

from .cloze import condition_text
from .harness import _rank, dnd_records
from .templates import canonical_name

Study = Any  # a softprompt.dnd.study.Study (not imported: study imports this module)

GEN_DEFAULTS: dict[str, Any] = {"steps": 1000, "batch_size": 64, "lr": 1e-3, "width": 64, "n_layers": 4,
                                "kernel": 5, "n_prompts": 64, "max_length": 256, "chunk": 192, "warmup": 50,
                                "stats_code": "relative", "draws": 5, "recovery_draws": 2, "min_pool": 128,
                                "pool": 1000}


def condition_pool(study: Study, dataset: str, min_pool: int = 128, pool: int = 1000) -> tuple[list[str], str]:
    """Unlabeled condition prompts of a held-out dataset and where they come from."""
    test = dnd_records(dataset, "test")
    evaluated = {str(r["idx"]) for r in study.records(dataset)}
    rest = [r for r in test if str(r["idx"]) not in evaluated]
    source = "test part, not evaluated"
    if len(rest) < min_pool:
        rest, source = dnd_records(dataset, "zoo"), f"zoo part (only {len(rest)} test records not evaluated)"
    keep = sorted(_rank(f"{dataset}|dnd-cond", 0, len(rest))[:pool])
    return [condition_text(dataset, rest[i]) for i in keep], source


def training_prompts(dataset: str, pool: int = 1000) -> list[str]:
    """Condition prompts of a training dataset: raw texts of (at most ``pool``) records of its zoo part."""
    recs = dnd_records(dataset, "zoo")
    keep = sorted(_rank(f"{dataset}|dnd-train-cond", 0, len(recs))[:pool])
    return [condition_text(dataset, recs[i]) for i in keep]


def zoo_entries(study: Study, cfg: dict[str, Any], datasets: list[str]) -> list[dict[str, Any]]:
    """Every kept checkpoint of ``datasets`` (absolute paths), from the per-dataset zoo folders."""
    from .export import read_zoo

    out = []
    for d in datasets:
        out += read_zoo(study.zoo_dir(cfg, d))
    return out


# Ablation variants of the generator (stage name suffix +tag): generator options they change. ``nonearest`` changes
# what it learns instead: the held-out dataset's nearest training dataset is left out too (:func:`left_out`).
TAGS: dict[str, dict[str, Any]] = {"": {}, "statsdnd": {"stats_code": "dnd"}, "nonearest": {}}


def ablation_targets(tag: str, which: bool | Sequence[str] | None, datasets: Sequence[str]) -> bool | list[str]:
    """An ablation's held-out datasets: all (``True``; the study runs them valid targets first), none (``[]``) or
    those named, in the order named, once each: seven more generators cost about two device sessions, so a subset,
    most telling first, answers sooner. A name outside the study's ``datasets`` is a ValueError."""
    if which is True:
        return True
    named = list(dict.fromkeys(canonical_name(d) for d in which or ()))
    unknown = [d for d in named if d not in datasets]
    if unknown:
        raise ValueError(f"{tag} ablation: {', '.join(unknown)} is not among the study's datasets; name held-out "
                         f"datasets of this study ({', '.join(datasets)})")
    return named


def left_out(study: Study, cfg: dict[str, Any], holdout: str, tag: str = "") -> list[str]:
    """The datasets a generator does not learn: the held-out one, and for ``nonearest`` also the training dataset
    nearest to it in condition embedding, as the main ``dnd`` stage of ``holdout`` found it (that stage runs first:
    the study orders ablations after every main generator). Does DnD still beat the training LoRAs when the one
    it resembles most is not there to be retrieved?"""
    if tag != "nonearest":
        return [holdout]
    main = f"dnd:{cfg['name']}:{holdout}"
    if not study.recorded(main):
        raise RuntimeError(f"{main} must be recorded before its nonearest ablation: it names the nearest dataset")
    return [holdout, study.result(main)["nearest"]]


def _options(study: Study, tag: str) -> dict[str, Any]:
    return {**GEN_DEFAULTS, **study.gen, **TAGS[tag]}


def _encoder(study: Study, g: dict[str, Any]) -> Any:
    """One condition encoder per study, its prompt cache on the training device: a step then stacks 64 × 64 cached
    [256, 384] states on the GPU instead of copying ~1.6 GB from host memory."""
    import torch

    from .condition import ConditionEncoder

    key = (study.encoder, g["max_length"])
    if getattr(study, "_enc_key", None) != key:
        dev = torch.device(study.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        study._enc, study._enc_key = ConditionEncoder(study.encoder, g["max_length"], dev, cache_device=dev), key
    return study._enc


def run_gen_group(study: Study, cfg: dict[str, Any], holdouts: list[str], max_seconds: float,
                  tag: str = "") -> dict[str, dict[str, Any] | None]:
    """Train (or continue) the generators without each of ``holdouts`` side by side (:func:`.gen_train.train_group`:
    one grid bank, one encoder cache); per holdout its stage result, or None while it is unfinished."""
    from .gen_train import GROUP_DEFAULTS, train_group

    g = _options(study, tag)
    outs = [study.gen_dir(cfg, h, tag and "+" + tag) for h in holdouts]
    drop = {h: left_out(study, cfg, h, tag) for h in holdouts}
    res = train_group(zoo_entries(study, cfg, study.datasets), holdouts, outs,
                      lambda d: training_prompts(d, g["pool"]), _encoder(study, g),
                      opts={k: g[k] for k in GROUP_DEFAULTS if k in g}, keep_steps=(g["steps"] // 2,),
                      max_seconds=max_seconds, streams=study.gen_streams, compile=study.gen_compile,
                      exclude=[drop[h][1:] for h in holdouts])
    out: dict[str, dict[str, Any] | None] = {}
    for h, r in zip(holdouts, res):
        if not r["complete"]:
            study.log(f"generator {h}: step {r['step']}/{g['steps']}, continues in the next call")
            out[h] = None
            continue
        losses = r["losses"]
        out[h] = {"parameters": r["parameters"], "loss_first": losses[0], "loss_last": losses[-1],
                  "loss_curve": losses[:: max(1, len(losses) // 50)], "train_seconds": r["seconds"],
                  "share_seconds": r["share_seconds"], "group": list(holdouts),
                  "steady_seconds_per_step": (r["steady_share_seconds"] / r["steady_steps"]
                                              if r["steady_steps"] else None),
                  "train_datasets": [d for d in study.datasets if d not in drop[h]], "config": g,
                  "compiled": study.gen_compile}
    return out


def run_gen(study: Study, cfg: dict[str, Any], holdout: str, max_seconds: float,
            tag: str = "") -> dict[str, Any] | None:
    """One generator (a group of one): its stage result, or None while it is unfinished."""
    return run_gen_group(study, cfg, [holdout], max_seconds, tag)[holdout]


def stale(study: Study, stage: str, res: dict[str, Any]) -> bool:
    """Whether a ``gen``/``dnd`` stage result was made with other generator options than the study's now: for a
    ``gen`` stage the training options (:data:`.gen_train.GROUP_DEFAULTS` keys and ``pool``), for a ``dnd`` stage
    all of them. Results that do not record their options are taken as current."""
    from .gen_train import GROUP_DEFAULTS

    if "config" not in res:
        return False
    g = _options(study, stage.split(":")[1].partition("+")[2])
    keys = (set(GROUP_DEFAULTS) | {"pool"}) if stage.startswith("gen:") else set(g) | set(res["config"])
    return any(res["config"].get(k) != g.get(k) for k in keys)


def gen_step_seconds(study: Study, prior: float | None = None) -> float:
    """Seconds one generator step costs (device time per generator-step, a run's share of its group): the largest
    measured over finished ``gen`` stages and unfinished runs' ``train_progress.json`` that trained as the study
    does now (compiled or eager), else ``prior``, else :data:`PRIOR_STEP_SECONDS`. Where recorded, the rate past
    each call's warm-up rounds (``steady``): each call's compile is in the planner's per-call term, and a run
    measured over one short call would otherwise carry a whole compile in its rate."""
    import json

    seen = []
    for s in study.stages():
        kind, *rest = s.split(":")
        if kind != "gen":
            continue
        if study.done(s):
            r = study.result(s)
            if "share_seconds" in r and r.get("compiled", False) == study.gen_compile:
                seen.append(r.get("steady_seconds_per_step") or r["share_seconds"] / r["config"]["steps"])
            continue
        name, _, tag = rest[0].partition("+")
        cfg = next(c for c in study.configs if c["name"] == name)
        prog = study.gen_dir(cfg, rest[1], tag and "+" + tag) / "train_progress.json"
        if prog.exists():
            p = json.loads(prog.read_text())
            if p.get("compiled", False) != study.gen_compile:
                continue
            if p.get("steady_steps", 0) >= 20:
                seen.append(p["steady_share"] / p["steady_steps"])
            elif p["step"] >= 5:  # fewer steps: warm-up
                seen.append(p["share"] / p["step"])
    if seen:
        return max(seen)
    return prior if prior is not None else PRIOR_STEP_SECONDS


PRIOR_STEP_SECONDS = 0.6  # ~74 TFLOP per step at ~120 TFLOP/s (the effective rate of the 2026-11-25 H100 run)


def steps_left(study: Study, cfg: dict[str, Any], holdout: str, tag: str = "") -> int:
    """Generator steps still to train for ``holdout`` (from its ``train_progress.json``, if any)."""
    import json

    total = _options(study, tag)["steps"]
    prog = study.gen_dir(cfg, holdout, tag and "+" + tag) / "train_progress.json"
    return total - (json.loads(prog.read_text())["step"] if prog.exists() else 0)


def _score_state(study: Study, state: dict, template: Any, dataset: str, tmp: Any) -> dict[str, Any]:
    from .export import write_adapter

    write_adapter(state, template, tmp)
    pm, tok = study._load(str(tmp))
    res = study._score(pm, tok, dataset)
    shutil.rmtree(tmp)
    return res


def _mean_embedding(enc: Any, prompts: list[str]) -> Any:
    return enc.pooled(prompts[:256]).mean(0)


def run_dnd(study: Study, cfg: dict[str, Any], holdout: str, tag: str = "") -> dict[str, Any]:
    """Draws from both generator checkpoints on ``holdout``, recovery on a training dataset, nearest LoRA."""
    import torch

    from .generator import generate, load_generator
    from .hyperconv import grid_mean_state

    g = _options(study, tag)
    gdir = study.gen_dir(cfg, holdout, tag and "+" + tag)
    template = gdir / "template_adapter_config.json"
    prompts, source = condition_pool(study, holdout, g["min_pool"], g["pool"])
    tmp = study.state / "tmp_adapter"
    draws, states = [], []
    for weights in (f"generator_step{g['steps'] // 2:06d}.safetensors", "generator.safetensors"):
        for seed in range(g["draws"]):
            state, secs = generate(gdir, prompts, seed=seed, weights=weights, device=study.device)
            states.append(state)
            draws.append({"weights": weights, "seed": seed, "seconds": secs,
                          **_score_state(study, state, template, holdout, tmp)})
    gen_stage = f"gen:{cfg['name']}{tag and '+' + tag}:{holdout}"  # what the generator learned (ablations: less)
    train = study.result(gen_stage)["train_datasets"] if study.recorded(gen_stage) else [
        d for d in study.datasets if d != holdout]
    own = train[0]
    rec_draws = []
    for seed in range(g["recovery_draws"]):
        state, _ = generate(gdir, training_prompts(own, g["pool"]), seed=seed, device=study.device)
        rec_draws.append(_score_state(study, state, template, own, tmp))
    from .export import read_lora_tensors

    entries = zoo_entries(study, cfg, train)
    mean: dict = {}
    for e in entries:
        for k, v in read_lora_tensors(e["path"]).items():
            mean[k] = mean.get(k, 0) + v.double() / len(entries)
    mean = {k: v.float() for k, v in mean.items()}
    zoo_mean = _score_state(study, mean, template, holdout, tmp)
    _, enc, layout, gcfg = load_generator(gdir, study.device)
    # the exact output for an ignored condition: the mean in the generator's token space (the A,B mean is near it)
    token_mean = grid_mean_state(entries, layout, gcfg.get("target", "ab"))
    zoo_token_mean = _score_state(study, token_mean, template, holdout, tmp)
    target = _mean_embedding(enc, prompts)
    sims = {d: float(torch.nn.functional.cosine_similarity(target, _mean_embedding(enc, training_prompts(d, 256)),
                                                            dim=0)) for d in train}
    nearest = max(sims, key=sims.__getitem__)
    return {"draws": draws, "condition_source": source, "n_condition_prompts": len(prompts),
            "weight_cosine": weight_cosines(study, cfg, holdout, states, mean, token_mean),
            "lora_to_match": None if tag else lora_to_match(study, cfg, holdout, draws),  # ablations: no cost row
            "recovery": {"dataset": own, "draws": rec_draws}, "similarity": sims, "nearest": nearest,
            "zoo_mean": zoo_mean, "zoo_token_mean": zoo_token_mean, "config": g,
            "generate_seconds": statistics.mean(d["seconds"] for d in draws)}


def weight_cosines(study: Study, cfg: dict[str, Any], holdout: str, states: list[dict],
                   zoo_mean: dict | None = None, token_mean: dict | None = None) -> dict[str, Any]:
    """What the generated adapters resemble in weight space (:func:`.delta.delta_cosine` of their updates, mean over
    draws): each dataset's final zoo LoRA (the held-out one's own included, which the generator never saw), the
    draws among themselves (how much the seed changes the adapter) and, given, the zoo mean of A and B and the
    token-space mean (near 1: the generator makes what it would for a condition it ignores)."""
    from .delta import delta_cosine
    from .export import read_lora_tensors

    def final(d: str) -> dict:
        return read_lora_tensors(study.zoo_dir(cfg, d) / study.result(f"zoo:{cfg['name']}:{d}")["final"]["path"])

    def r4(x: float) -> float:
        return round(x, 4) + 0.0  # + 0.0: no "-0.0" in the results

    to = {d: r4(statistics.mean(delta_cosine(s, ref) for s in states))
          for d, ref in ((d, final(d)) for d in study.datasets)}
    pairs = [delta_cosine(a, b) for i, a in enumerate(states) for b in states[i + 1:]]
    return {"to_final_lora": to, "own": to[holdout], "between_draws": r4(statistics.mean(pairs)) if pairs else None,
            **{f"to_{name}": None if ref is None else r4(statistics.mean(delta_cosine(s, ref) for s in states))
               for name, ref in (("zoo_mean", zoo_mean), ("zoo_token_mean", token_mean))}}


def lora_to_match(study: Study, cfg: dict[str, Any], holdout: str, draws: list[dict[str, Any]],
                  measure: str | None = None) -> dict[str, Any] | None:
    """Optimiser seconds (and steps) of ``holdout``'s own zoo LoRA until it scores DnD's mean in ``measure`` (the
    dataset's primary measure): 0 when the base model already does, None when not even the final LoRA does. Between
    the two, a bisection over the saved steps (``zoo`` stage ``curve``; up to 3 scorings of the evaluation subset)
    finds a step that reaches the target right after one that does not; it assumes accuracy rises with training
    (``scored`` lists what was scored, to show where it did not). None for a zoo stage recorded without a curve."""
    from .cloze import primary_measure

    zoo = study.result(f"zoo:{cfg['name']}:{holdout}")
    curve = zoo.get("curve")
    if not curve:
        return None
    m = measure or primary_measure(holdout)
    target = statistics.mean(d[m] for d in draws)
    base = study.result("base")["datasets"][holdout]["test"][m]
    out: dict[str, Any] = {"measure": m, "target": target, "base": base, "own_lora": zoo["test"][m], "scored": []}
    if target <= base:
        return {**out, "step": 0, "train_seconds": 0.0}
    if target > zoo["test"][m]:
        return {**out, "step": None, "train_seconds": None, "final_step": curve[-1]["step"],
                "final_train_seconds": curve[-1]["train_seconds"]}
    lo, hi = -1, len(curve) - 1  # curve[lo] (the base at -1) is below the target, curve[hi] reaches it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        pm, tok = study._load(str(study.zoo_dir(cfg, holdout) / curve[mid]["path"]))
        score = study._score(pm, tok, holdout)[m]
        out["scored"].append({"step": curve[mid]["step"], m: score})
        lo, hi = (lo, mid) if score >= target else (mid, hi)
    return {**out, "step": curve[hi]["step"], "train_seconds": curve[hi]["train_seconds"]}
