"""Results of the cloze study: ``dnd_cloze.json`` (issue 21 schema) and its markdown.

``build_results(stages, ...)`` turns the stage JSONs of :mod:`.study` (and, when present, DnD stages with the same
per-example layout) into the machine-readable file; ``render(results)`` writes ``dnd.md`` from that file alone, so
the markdown never holds a number the JSON lacks. All accuracies are in percent.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .ablations import ablation_fields, mean_score, per_example, render_ablations, token_mean_fields
from .agreement import answer_agreement
from .diagnosis import diagnosis
from .intervals import paired_bootstrap
from .intervals import verdict as _verdict
from .study_zoo import last_build
from .templates import DATASETS

KEYS = {"acc": "correct", "acc_norm": "correct_norm", "acc_cal": "correct_cal"}  # per-example lists of a measure


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 2)


def build_results(stages: Mapping[str, Any], config: str, measure: str = "primary", *,
                  device: str, versions: Mapping[str, str], date: str, command: str,
                  datasets: Sequence[str] = DATASETS,
                  golds: Mapping[str, Sequence[int]] | None = None,
                  alone: Mapping[str, Any] | None = None,
                  conditions: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``dnd_cloze.json`` object from the stage results of one zoo config (see the issue's schema).

    A dataset is a ``valid_target`` when the base model beats both chance (1/options) and the majority-class rate
    (always answering the most frequent gold option): below either, held-out accuracies there measure answer bias,
    not the task. With ``golds`` (gold option of each evaluated example), two-option datasets also get balanced
    accuracies (mean recall over the two answers; 50 for any constant answer) and the rate of option 1 ("yes").

    ``measure``: ``primary`` (each dataset's :func:`.cloze.primary_measure`: acc_norm, acc where the options are
    single tokens or share their continuation), ``acc`` or ``acc_norm``. Fields not measured yet (the DnD rows
    before the generator stages) are ``None``; ``zoo_gate`` summarises own LoRA − base on the evaluation subsets.
    Each row names the cloze ``format`` version its stages were made with and the current one. ``alone`` (the JSON
    of ``dnd_bench.py zoo-alone``: seconds per zoo step of each dataset with nothing else on the device) adds to each
    cost row the lone estimate ``alone_seconds`` = matching step × that dataset's seconds per step. ``conditions``
    (the JSON of ``benchmarks/dnd_conditions.py``, :mod:`.geometry`) adds each row's ``condition_membership``."""
    from .cloze import format_version, primary_measure

    base_stage = stages.get("base", {})
    base = base_stage.get("datasets", {})
    cross = stages.get(f"cross:{config}", {}).get("lora_on", {})
    out: dict[str, Any] = {}
    gains = []
    measures = {d: primary_measure(d) if measure == "primary" else measure for d in datasets}
    for d in datasets:
        b = base.get(d, {}).get("test")
        if b and measures[d] not in b:
            measures[d] = "acc"  # stages of an older format of d lack this measure (the row is marked stale)
        m = measures[d]
        key = KEYS[m]
        z = stages.get(f"zoo:{config}:{d}")
        row: dict[str, Any] = {"measure": m, "chance": _pct(b["chance"]) if b else None,
                               "majority": _pct(b["majority"]) if b else None, "n": b["n"] if b else None,
                               "base": _pct(b[m]) if b else None,
                               "base_other_measure": _pct(b["acc_norm" if m == "acc" else "acc"]) if b else None,
                               "format": base_stage.get("formats", {}).get(d, 1), "format_current": format_version(d)}
        if b:
            row["valid_target"] = row["base"] > row["chance"] and row["base"] > row["majority"]
        if z:
            row["own_lora"] = _pct(z["test"][m])
            row["own_lora_dev"], row["base_dev"] = _pct(z["dev"][m]), _pct(base[d]["dev"][m])
            row["ci_own_minus_base"] = paired_bootstrap(z["test"][key], b[key])
            gains.append((d, row["own_lora"] - row["base"]))
        if b and golds and d in golds and row["chance"] == 50.0 and row["majority"] > row["chance"] + 5:
            row["binary"] = {"base": _binary(b[key], golds[d])}
            if z:
                row["binary"]["own_lora"] = _binary(z["test"][key], golds[d])
        others = {s: cross[s][d] for s in cross if d in cross[s]}
        if others:
            accs = {s: 100 * r[m] for s, r in others.items()}
            best = max(accs, key=accs.__getitem__)
            row["train_lora_mean"] = round(statistics.mean(accs.values()), 2)
            row["train_lora_best"] = {"dataset": best, "acc": round(accs[best], 2)}
        dnd = stages.get(f"dnd:{config}:{d}")
        if dnd and b and others:
            rec_src = dnd["recovery"]["dataset"]
            rec_m = measures.get(rec_src) or (primary_measure(rec_src) if measure == "primary" else measure)
            row.update(_dnd_fields(dnd, others, b, z, cross, d, m, key, rec_m))
            kept = [len(stages[f"zoo:{config}:{s}"]["losses"]) for s in dnd["similarity"]
                    if f"zoo:{config}:{s}" in stages]
            # what the generator learned from: the issue asks whether too few checkpoints or datasets hold it back
            row["training_data"] = {"datasets": len(dnd["similarity"]),
                                    "checkpoints_per_dataset": min(kept) if kept else None}
            per_step = ((alone or {}).get("datasets") or {}).get(d, {}).get("step_seconds")
            t = row["lora_to_match"]
            if t and per_step is not None:
                step = t["step"] if t.get("step") is not None else t.get("final_step")
                t["alone_seconds"] = round(step * per_step, 2) if step is not None else None
        if b and cross:
            row.update(ablation_fields(stages, config, d, b, cross, m, key, measures))
        for k in ("train_lora_mean", "train_lora_best", "own_lora", "dnd_mean", "dnd_sd", "ci_dnd_minus_train_mean",
                  "ci_dnd_minus_base", "ci_dnd_minus_nearest", "nearest_lora", "generate_seconds",
                  "in_distribution_recovery", "lora_to_match"):
            row.setdefault(k, None)
        out[d] = row
    for row in out.values():
        rec = row.get("in_distribution_recovery")
        if rec and out.get(rec["dataset"], {}).get("own_lora") is not None:
            rec["own_lora"] = out[rec["dataset"]]["own_lora"]
    gate = None
    if gains:
        g = [x for _, x in gains]
        v = [x for d, x in gains if out[d].get("valid_target")]
        gate = {"mean_gain": round(statistics.mean(g), 2), "datasets_gaining_3": sum(x >= 3 for x in g),
                "n_datasets": len(g), "passes": statistics.mean(g) >= 3 and sum(x >= 3 for x in g) >= 5,
                "valid_targets": {"n_datasets": len(v), "mean_gain": round(statistics.mean(v), 2) if v else None,
                                  "datasets_gaining_3": sum(x >= 3 for x in v)}}
    lone = None if not alone else {k: alone.get(k) for k in ("device", "date", "command", "steps_timed", "skip")}
    geometry = None
    if conditions:
        geometry = {k: conditions.get(k) for k in ("device", "date", "command", "encoder", "n")}
        for d, m in conditions.get("membership", {}).items():
            if d in out:
                out[d]["condition_membership"] = dict(m)
    return {"device": device, "versions": dict(versions), "date": date, "command": command, "measure": measure,
            "measures": measures, "zoo_config": config, "zoo_gate": gate, "zoo_alone": lone,
            "condition_geometry": geometry, "datasets": out}


def _binary(correct: Sequence[int], gold: Sequence[int]) -> dict[str, float]:
    """Balanced accuracy and rate of option 1 (percent) of a two-option dataset from per-example correctness."""
    pred = [g if c else 1 - g for c, g in zip(correct, gold, strict=True)]
    rec = [statistics.mean(p == k for p, g in zip(pred, gold) if g == k) for k in (0, 1) if k in gold]
    return {"balanced_acc": round(100 * statistics.mean(rec), 2), "option1_rate": round(100 * statistics.mean(pred), 2)}


def _dnd_fields(dnd: Mapping[str, Any], others: Mapping[str, Any], base: Mapping[str, Any], own: Any,
                cross: Mapping[str, Any], d: str, measure: str, key: str, rec_measure: str) -> dict[str, Any]:
    """DnD mean/sd over draws, paired intervals against the training-LoRA mean and the base, nearest LoRA, recovery
    (scored on the recovery dataset, in that dataset's measure ``rec_measure``)."""
    accs = [100 * r[measure] for r in dnd["draws"]]
    n = len(base[key])
    per_dnd = per_example(dnd["draws"], key, n)
    per_train = per_example(list(others.values()), key, n)
    rec = dnd["recovery"]
    src = rec["dataset"]
    return {"dnd_mean": round(statistics.mean(accs), 2), "dnd_sd": round(statistics.stdev(accs), 2)
            if len(accs) > 1 else 0.0, "dnd_draws": len(accs),
            "ci_dnd_minus_train_mean": paired_bootstrap(per_dnd, per_train),
            "ci_dnd_minus_base": paired_bootstrap(per_dnd, base[key]),
            # Does generating beat simply picking the training LoRA whose prompts look most alike?
            "ci_dnd_minus_nearest": paired_bootstrap(per_dnd, others[dnd["nearest"]][key]),
            "nearest_lora": {"dataset": dnd["nearest"], "acc": round(100 * cross[dnd["nearest"]][d][measure], 2)},
            "generate_seconds": round(dnd["generate_seconds"], 4), "condition_source": dnd["condition_source"],
            **_zoo_mean_fields(dnd.get("zoo_mean"), per_dnd, per_train, others, dnd["nearest"], measure, key),
            **token_mean_fields(dnd, per_dnd, measure, key),
            "weight_cosine": dnd.get("weight_cosine"),  # None for stages recorded before it existed
            "budget": _budget(dnd, measure, key, n),
            "lora_to_match": _to_match(dnd.get("lora_to_match"), own),
            "in_distribution_recovery": {"dataset": src, "measure": rec_measure,
                                         "generated": mean_score(rec["draws"], rec_measure), "own_lora": None}}


def _budget(dnd: Mapping[str, Any], measure: str, key: str, n: int) -> dict[str, Any] | None:
    """Would more generator training help? Each ``dnd`` stage draws from the generator halfway through its training
    (``generator_step<k>``) and at the end: their scores, and a paired interval of final − halfway (None without
    both)."""
    final = [r for r in dnd["draws"] if r["weights"] == "generator.safetensors"]
    mid = [r for r in dnd["draws"] if r["weights"].startswith("generator_step")]
    if not final or not mid:
        return None
    return {"mid_step": int(mid[0]["weights"].removeprefix("generator_step").split(".")[0]),
            "final_step": (dnd.get("config") or {}).get("steps"), "mid": mean_score(mid, measure),
            "final": mean_score(final, measure),
            "ci_final_minus_mid": paired_bootstrap(per_example(final, key, n), per_example(mid, key, n))}


def _zoo_mean_fields(zoo: Mapping[str, Any] | None, per_dnd: list[float], per_train: list[float],
                     others: Mapping[str, Any], nearest: str, measure: str, key: str) -> dict[str, Any]:
    """Does the condition matter? The zoo mean is about what a generator outputs for a condition it ignores: DnD
    against it in score and example by example (:mod:`.agreement`), and it against the training-LoRA mean. All
    None for a stage recorded before the zoo mean was scored."""
    if zoo is None:
        return dict.fromkeys(("zoo_mean", "ci_dnd_minus_zoo_mean", "ci_zoo_mean_minus_train_mean", "answer_agreement"))
    return {"zoo_mean": round(100 * zoo[measure], 2), "ci_dnd_minus_zoo_mean": paired_bootstrap(per_dnd, zoo[key]),
            "ci_zoo_mean_minus_train_mean": paired_bootstrap(zoo[key], per_train),
            "answer_agreement": answer_agreement(per_dnd, zoo[key], {o: v[key] for o, v in others.items()}, nearest)}


def _vs(row: Mapping[str, Any], field: str = "ci_dnd_minus_nearest") -> str:
    """A DnD − reference verdict with its interval (– for a row reported before the interval existed)."""
    ci = row.get(field)
    return "–" if ci is None else f"{_verdict(ci)} [{ci[0]:+.1f}, {ci[1]:+.1f}]"


def _to_match(t: Mapping[str, Any] | None, zoo: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """``study_gen.lora_to_match`` in percent (None for a stage recorded before it existed). The seconds come from
    the held-out dataset's zoo stage as recorded now (its latest rebuild's ``curve``) where it has the step, so every
    row times the same zoo code on the same machine, whichever session scored its DnD stage."""
    if t is None:
        return None
    now = {c["step"]: c["train_seconds"] for c in (zoo or {}).get("curve", [])}
    out = {k: t[k] for k in ("measure", "step", "train_seconds") if k in t}
    out["zoo_workers"] = (last_build(zoo or {}).get("profile") or {}).get("zoo_workers")  # None: not recorded
    if out.get("step") and out["step"] in now:
        out["train_seconds"] = now[out["step"]]
    out.update({k: round(100 * t[k], 2) for k in ("target", "base", "own_lora")})
    out["scored"] = [{"step": x["step"], "score": round(100 * x[t["measure"]], 2)} for x in t["scored"]]
    if t.get("final_step") is not None:
        out.update(final_step=t["final_step"], final_train_seconds=now.get(t["final_step"], t["final_train_seconds"]))
    return out


def _cost_cell(r: Mapping[str, Any]) -> str:
    t = r.get("lora_to_match")
    if t is None:
        return "– | –"
    if t["step"] == 0:
        return "0 (the base already scores DnD's mean) | –"
    alone = t.get("alone_seconds")
    if t["step"] is None:
        lone = "" if alone is None else f", ≈{alone:.1f} s alone"
        return (f"not reached: the final LoRA (step {t['final_step']}, {t['final_train_seconds']:.1f} s{lone}) "
                f"scores {t['own_lora']:.1f} < {t['target']:.1f} | –")
    if alone is not None:
        return (f"step {t['step']}, ≈{alone:.1f} s alone ({t['train_seconds']:.1f} s in the zoo rebuild) | "
                f"{alone / r['generate_seconds']:.0f}x")
    return (f"step {t['step']}, {t['train_seconds']:.1f} s | "
            f"{t['train_seconds'] / r['generate_seconds']:.0f}x")


def _cost_note(rows: Sequence[tuple[str, Mapping[str, Any]]], lone: Mapping[str, Any] | None = None) -> str:
    """The cost caption's note on the LoRA seconds: where they come from and, when they were timed while other zoo
    stages shared the GPU, that they overstate a lone LoRA's (or how the lone estimate replaces them)."""
    costs = [r["lora_to_match"] for _, r in rows if r.get("lora_to_match")]
    if lone and costs and all(t.get("alone_seconds") is not None for t in costs if t.get("step") != 0):
        return (" `≈ alone`: the matching step × that dataset's seconds per zoo step timed with nothing else on the "
                f"device ({lone.get('steps_timed')} steps after {lone.get('skip')} warm-up steps; "
                f"{lone.get('device')}, {str(lone.get('date'))[:10]}: `{lone.get('command')}`); the ratio uses it. "
                "The seconds in brackets come from the latest zoo rebuild, whose steps may have shared the GPU with "
                "other zoo stages.")
    workers = [t.get("zoo_workers") for t in costs]
    if not workers or all(w == 1 for w in workers):
        return ""
    known = [w for w in workers if w is not None]
    count = (f"up to {max(known)} at once" if known else "how many at once was not recorded") + (
        "; not recorded for some rows" if known and None in workers else "")
    return (" The LoRA seconds come from the latest zoo rebuild, which may have trained several datasets at once on "
            f"the one GPU (`--zoo-workers`; {count}), so they can overstate a LoRA trained alone.")


def _f(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, list):
        return f"[{x[0]:+.1f}, {x[1]:+.1f}]"
    if isinstance(x, dict):
        return f"{x['acc']:.1f} ({x['dataset'].split('/')[-1]})"
    return f"{x:.1f}" if isinstance(x, float) else str(x)


def render(res: Mapping[str, Any]) -> str:
    """Markdown report of a ``dnd_cloze.json`` object."""
    m = res["measure"]
    per = res.get("measures") or {d: m for d in res["datasets"]}
    if m == "primary":
        odd = {x: sorted(d.split("/")[-1] for d, y in per.items() if y == x) for x in ("acc", "acc_cal")}
        m = "acc_norm" + "".join(f"; {x} for {', '.join(v)}" for x, v in odd.items() if v)
    lines = [f"# Drag-and-Drop on SmolLM2-135M-Instruct: cloze scoring ({m})", "",
             f"Generated from `benchmarks/results/dnd_cloze.json` by `python benchmarks/dnd_bench.py cloze-report`. "
             f"Device: {res['device']}; date: {res['date']}; versions: "
             + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
             f"Command: `{res['command']}`", "",
             (f"Zoo config `{res['zoo_config']}`. Accuracies in percent on each dataset's evaluation subset "
             "(sha256-ranked ≤500 examples of the DnD test part); intervals are 95% paired bootstrap intervals "
             "over examples (2,000 resamples). `other` is the other measure (acc where the table shows acc_norm or "
             "acc_cal, acc_norm where it shows acc). acc_norm as lm-evaluation-harness reports these tasks; acc for "
             "WinoGrande (partial scoring: both options share their continuation, acc = acc_norm); acc_cal for "
             "BoolQ (two demonstrations, contextually calibrated: each answer's log-probability minus its mean on "
             "content-free inputs; see docs/dnd_gpu.md)."), "",
             ("| dataset | n | chance | majority | base | base (other) | own LoRA | own − base 95% CI | base dev | "
             "own dev | train-LoRA mean | best train LoRA | DnD mean ± sd | DnD − train mean | DnD − base |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d, r in res["datasets"].items():
        dnd = "–" if r["dnd_mean"] is None else f"{r['dnd_mean']:.1f} ± {r['dnd_sd']:.1f}"
        lines.append(f"| {d.split('/')[-1]} | {_f(r['n'])} | {_f(r['chance'])} | {_f(r['majority'])} | "
                     f"{_f(r['base'])} | {_f(r['base_other_measure'])} | {_f(r['own_lora'])} | "
                     f"{_f(r.get('ci_own_minus_base'))} | {_f(r.get('base_dev'))} | {_f(r.get('own_lora_dev'))} | "
                     f"{_f(r['train_lora_mean'])} | {_f(r['train_lora_best'])} | {dnd} | "
                     f"{_f(r['ci_dnd_minus_train_mean'])} | {_f(r['ci_dnd_minus_base'])} |")
    lines.append("")
    above = [d.split("/")[-1] for d, r in res["datasets"].items() if r["base"] is not None and r["chance"] is not None
             and r["base"] > r["chance"]]
    below = [d.split("/")[-1] for d, r in res["datasets"].items() if r["base"] is not None and r["chance"] is not None
             and r["base"] <= r["chance"]]
    lines.append(f"Base above chance (reported measure) on {len(above)} of {len(above) + len(below)} datasets"
                 + (f"; not above chance: {', '.join(below)}." if below else "."))
    bad = [(d.split("/")[-1], r) for d, r in res["datasets"].items() if r.get("valid_target") is False]
    if bad:
        lines.append("Not a valid held-out target (base not above both chance and the majority-class rate, i.e. "
                     "always answering the most frequent gold option): " + "; ".join(
                         f"{n} (base {r['base']:.1f} {r['measure']}, chance {r['chance']:.1f}, majority "
                         f"{r['majority']:.1f})" for n, r in bad) + ". Accuracies there measure answer bias, not the "
                     "task; its rows are shown but not counted below.")
    for d, r in res["datasets"].items():
        if r.get("binary"):
            parts = [f"{ {'own_lora': 'own LoRA'}.get(k, k)} {v['balanced_acc']:.1f} (answers option 1 on "
                     f"{v['option1_rate']:.1f}%)" for k, v in r["binary"].items()]
            lines.append(f"{d.split('/')[-1]}, balanced accuracy ({r['measure']}; 50 for any constant answer; option 1 "
                         "is BoolQ's 'yes'): "
                         + ", ".join(parts) + ".")
    stale = [f"{d.split('/')[-1]} (format v{r['format']}, current v{r['format_current']})"
             for d, r in res["datasets"].items() if r.get("format", 1) != r.get("format_current", 1)]
    if stale:
        lines.append(f"Stale: these stages predate the current cloze format of {', '.join(stale)}; the next run "
                     "redoes them (see `softprompt.dnd.cloze.FORMAT_VERSIONS`).")
    g = res.get("zoo_gate")
    if g:
        verdict = "passes" if g["passes"] else "fails"
        lines.append(f"Zoo gate (own LoRA ≥ base + 3 on average and on ≥5 of 7): mean gain {g['mean_gain']:+.1f} "
                     f"points, {g['datasets_gaining_3']} of {g['n_datasets']} datasets gain ≥3: the gate {verdict}.")
        v = g.get("valid_targets")
        if v and v["n_datasets"] < g["n_datasets"] and v["mean_gain"] is not None:
            lines.append(f"On the {v['n_datasets']} valid targets only: mean gain {v['mean_gain']:+.1f} points, "
                         f"{v['datasets_gaining_3']} of {v['n_datasets']} gain ≥3.")
    rows = [(d.split("/")[-1], r) for d, r in res["datasets"].items() if r["dnd_mean"] is not None]
    if rows:
        wins = sum(r["ci_dnd_minus_train_mean"][0] > 0 for _, r in rows)
        valid = [r for _, r in rows if r.get("valid_target") is not False]
        vwins = sum(r["ci_dnd_minus_train_mean"][0] > 0 for r in valid)
        lines.append(f"DnD beats the training-LoRA mean (interval above 0) on {wins} of {len(rows)} held-out datasets "
                     f"({vwins} of {len(valid)} valid targets); the paper's claim needs at least 5 of 7.")
        lines += ["", "| held-out | vs training-LoRA mean | vs base | nearest LoRA | vs nearest LoRA (95% CI) | "
                  "zoo mean (A,B) | vs zoo mean (95% CI) | recovery: generated vs own LoRA | generate s |",
                  "|" + "---|" * 9]
        for name, r in rows:
            rec = r["in_distribution_recovery"]
            lines.append(f"| {name} | {_verdict(r['ci_dnd_minus_train_mean'])} | {_verdict(r['ci_dnd_minus_base'])} | "
                         f"{_f(r['nearest_lora'])} | {_vs(r)} | {_f(r.get('zoo_mean'))} | "
                         f"{_vs(r, 'ci_dnd_minus_zoo_mean')} | "
                         f"{rec['dataset'].split('/')[-1]}: {_f(rec['generated'])} vs "
                         f"{_f(rec['own_lora'])} | {r['generate_seconds']:.3f} |")
    cos_rows = [(name, r) for name, r in rows if r.get("weight_cosine")]
    if cos_rows:
        lines += ["", "Weight space: cosine similarity of the generated adapters' updates ΔW = B·A (all modules; mean "
                  "over draws) with each dataset's final zoo LoRA. `own` is the held-out dataset's LoRA, which the "
                  "generator never saw; a generated adapter much closer to one training LoRA than to `own` is close to "
                  "retrieval.", "",
                  "| held-out | own | nearest training LoRA | closest training LoRA | between draws |",
                  "|---" * 5 + "|"]
        for name, r in cos_rows:
            w, near = r["weight_cosine"], r["nearest_lora"]["dataset"]
            train = {d: c for d, c in w["to_final_lora"].items() if not d.endswith("/" + name)}
            best = max(train, key=train.__getitem__)
            lines.append(f"| {name} | {w['own']:+.3f} | {train[near]:+.3f} ({near.split('/')[-1]}) | "
                         f"{train[best]:+.3f} ({best.split('/')[-1]}) | "
                         f"{'–' if w['between_draws'] is None else format(w['between_draws'], '+.3f')} |")
    if rows:
        lines += ["", "Cost: seconds to generate one adapter (the generator loaded) against the optimiser seconds the "
                  "held-out dataset's own LoRA trained (the zoo's batch size, one device) until it scored DnD's "
                  "mean in the dataset's primary measure (bisection over saved steps, assuming accuracy rises with "
                  "training; the stage lists the steps it scored)." + _cost_note(rows, res.get("zoo_alone")), "",
                  "| held-out | generate s | own LoRA to match DnD | LoRA s / generate s |", "|---|---|---|---|"]
        lines += [f"| {name} | {r['generate_seconds']:.3f} | {_cost_cell(r)} |" for name, r in rows]
    lines += render_ablations(rows)
    if rows:
        lines += ["", "### Where DnD wins and where it does not", "", *diagnosis(rows)]
    if all(r["dnd_mean"] is None for r in res["datasets"].values()):
        lines.append("No DnD generator has been run on this zoo yet (see `docs/dnd_gpu.md` for the next stages); "
                     "the DnD columns are empty, not zero.")
    return "\n".join(lines) + "\n"
