"""Results and reports of the resumable ``run`` of ``benchmarks/dnd_bench.py`` (split out of it, unchanged):
``collect`` gathers a state's stage files into one results dict (means, claims, costs), ``render`` writes the
markdown (``report`` subcommand, benchmarks/results/dnd*.md), and ``export_results`` writes dnd_results.json,
dnd.md and the small log tar (``export`` subcommand, and ``run --export`` after every stage)."""

from __future__ import annotations

import json
import statistics
import tarfile
from pathlib import Path

from dnd_bench_common import short, write_json
from portable import portable


# ---------------------------------------------------------------------------------------------- results + report
def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def collect(state: Path, record: dict | None = None) -> dict:
    """All stage results of ``state`` plus derived numbers (means, claims, costs) in one JSON-able dict."""
    cfg = json.loads((state / "config.json").read_text())
    invocations = json.loads((state / "invocations.json").read_text()) if (state / "invocations.json").exists() else []
    if record is not None:
        invocations = [i for i in invocations if i.get("id") != record.get("id")] + [record]
    stages_dir = state / "stages"
    stages = {p.stem.replace("__", ":"): json.loads(p.read_text()) for p in sorted(stages_dir.glob("*.json"))}
    from softprompt.dnd.templates import canonical_name

    datasets = [canonical_name(x) for x in str(cfg["datasets"]).split(",") if x.strip()]
    ans = str(cfg["answer_datasets"]).strip().lower()
    ans_ds = (datasets if ans == "all" else [] if ans in ("none", "") else
              [canonical_name(x) for x in str(cfg["answer_datasets"]).split(",") if x.strip()])
    names = (["base"] + [f"{k}:{short(d)}" for k in ("zoo", "gen") for d in datasets]
             + [f"ans:{short(d)}" for d in ans_ds])
    measures = [m for m in ("loglik", "gen") if m in str(cfg["measures"])]
    base = stages.get("base", {}).get("scores", {})
    zoo = {d: stages.get(f"zoo:{short(d)}") for d in datasets}
    rows = {}
    for h in datasets:
        g = stages.get(f"gen:{short(h)}")
        a = stages.get(f"ans:{short(h)}")
        row = {"dataset": h, "n": (base.get(h) or {}).get("n"),
               "prompt_source": (stages.get("base", {}).get("subsets", {}).get(h) or {}).get("prompt_source")}
        for m in measures:
            key = f"{m}_acc"
            others = {d: zoo[d]["final_on"][h][key] for d in datasets if d != h and zoo[d]}
            r = {"base": (base.get(h) or {}).get(key),
                 "train_mean": _mean(others.values()) if len(others) == len(datasets) - 1 else None,
                 "train_best": max(others.values()) if len(others) == len(datasets) - 1 else None,
                 "train_best_dataset": max(others, key=others.get) if len(others) == len(datasets) - 1 else None,
                 "own": zoo[h]["final_on"][h][key] if zoo[h] else None}
            if g:
                accs = [s[key] for s in g["samples"]]
                r.update({"dnd_mean": _mean(accs), "dnd_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                          "dnd_best": max(accs), "dnd_k": len(accs), "zoo_mean": g["zoo_mean"][key]})
                r["counts"] = {}
                for c in g["prompt_counts"]:
                    if key in c:
                        r["counts"].setdefault(str(c["n_prompts"]), []).append(c[key])
                r["counts"] = {n: _mean(v) for n, v in r["counts"].items()}
                if r["counts"]:
                    r["counts"][str(cfg["n_prompts"])] = r["dnd_mean"]
                if r["train_mean"] is not None and r["base"] is not None:
                    r["beats_train_mean"] = r["dnd_mean"] > r["train_mean"]
                    r["beats_base"] = r["dnd_mean"] > r["base"]
                    r["beats_train_best"] = r["dnd_mean"] > r["train_best"]
                # cost: optimiser seconds of the held-out dataset's own LoRA until its curve reaches DnD's accuracy
                if zoo[h] and r["base"] is not None and all(key in c for c in zoo[h]["curve"]):
                    curve = [(0.0, 0, r["base"])] + [(c["train_seconds"], c["step"], c[key]) for c in zoo[h]["curve"]]
                    hit = next(((t, s) for t, s, acc in curve if acc >= r["dnd_mean"]), None)
                    r["lora_seconds_to_match"] = hit[0] if hit else None
                    r["lora_steps_to_match"] = hit[1] if hit else None
                    r["lora_curve_max_seconds"] = curve[-1][0]
            if a:
                r["answers_mean"] = _mean([s[key] for s in a["samples"]])
            row[m] = r
        if g:
            row["gen_seconds"] = _mean([s["seconds"] for s in g["samples"]])
            row["generator_train_seconds"] = g["train_seconds"]
            row["generator_parameters"] = g["parameters"]
            row["loss_first"], row["loss_last"] = g["loss_first"], g["loss_last"]
            row["sanity"] = g["sanity"]
        if a:
            row["answer_generator_train_seconds"] = a["train_seconds"]
        rows[h] = row
    done = [n for n in names if n in stages]
    inv_env = next((i["env"] for i in reversed(invocations) if i.get("env")), {})
    return {
        "title": "Drag-and-Drop on SmolLM2-135M-Instruct: leave-one-dataset-out",
        "config": cfg, "env": inv_env, "invocations": invocations,
        "status": {"done": done, "pending": [n for n in names if n not in stages]},
        "stage_seconds": {n: stages[n]["stage_seconds"] for n in done},
        "subsets": stages.get("base", {}).get("subsets", {}),
        "zoo_cost": {"seconds": sum(z["zoo_seconds"] for z in zoo.values() if z),
                     "train_seconds": sum(z["train_seconds"] for z in zoo.values() if z),
                     "datasets": sum(1 for z in zoo.values() if z)},
        "rows": rows, "stages": stages,
    }


def _claims(res: dict, m: str) -> list[str]:
    out = []
    for h, row in res["rows"].items():
        r = row.get(m, {})
        if r.get("dnd_mean") is None or r.get("train_mean") is None:
            continue
        dm, tm, b = r["dnd_mean"], r["train_mean"], r["base"]
        verb = lambda x, y: "beats" if x > y else "ties with" if x == y else "does not beat"
        out.append(f"- {short(h)}: DnD {_pct(dm)} {verb(dm, tm)} the training-LoRA mean "
                   f"{_pct(tm)} ({100 * (dm - tm):+.1f}) and {verb(dm, b)} the base model "
                   f"{_pct(b)} ({100 * (dm - b):+.1f}); best training LoRA {_pct(r['train_best'])} "
                   f"({short(r['train_best_dataset'])}), own LoRA {_pct(r['own'])}.")
    n = [r[m] for r in res["rows"].values() if r.get(m, {}).get("beats_train_mean") is not None]
    if n:
        out.append(f"- **Summary:** DnD beats the training-LoRA mean on "
                   f"{sum(r['beats_train_mean'] for r in n)}/{len(n)}"
                   f", the base model on {sum(r['beats_base'] for r in n)}/{len(n)} and the best training LoRA on "
                   f"{sum(r['beats_train_best'] for r in n)}/{len(n)} held-out datasets.")
    return out


def render(res: dict) -> str:
    cfg, env = res["config"], res.get("env", {})
    mname = {"loglik": "option log-likelihood accuracy", "gen": "greedy generation, parsed answer"}
    L = [f"# {res['title']}", ""]
    invs = res.get("invocations", [])
    dates = sorted({i["start"][:10] for i in invs if i.get("start")})
    L += [(f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}, "
          f"transformers {env.get('transformers', '?')}, "
          f"peft {env.get('peft', '?')}, Python {env.get('python', '?')}. Date: {', '.join(dates) or '?'}. "
          f"Generated by `benchmarks/dnd_bench.py` (procedure: `docs/dnd_gpu.md`)."), ""]
    st = res["status"]
    if st["pending"]:
        L += [(f"**Incomplete:** {len(st['done'])} of {len(st['done']) + len(st['pending'])} stages done; not run yet: "
              f"{', '.join(st['pending'])}."), ""]
    L += ["## Setup", "",
          (f"- Base model `{cfg['model']}`; zoo: one LoRA per dataset (r={cfg['rank']}, alpha={2 * int(cfg['rank'])}, "
          f"targets {cfg['targets']}), all from one init (seed {cfg['init_seed']}, asserted), "
          f"{cfg['warmup_steps']} warm-up + {cfg['checkpoints']} kept steps, batch {cfg['zoo_batch']}, "
          f"lr {cfg['zoo_lr']}; "
          f"answer-only LM loss."),
          (f"- Generator: hyper-convolutional decoder (kernel {cfg['kernel']}, width {cfg['width']}, {cfg['n_layers']} "
          f"layers, chunk {cfg['chunk']}, target `{cfg['target']}`, "
          f"token stats code `{cfg.get('stats_code', 'dnd')}`), "
          f"{cfg['gen_steps']} steps x batch {cfg['gen_batch']}, "
          f"lr {cfg['gen_lr']}; conditions: {cfg['n_prompts']} prompts x {cfg['cond_length']} tokens from encoder "
          f"`{cfg['encoder']}`, resampled every step from up to {cfg['train_pool']} prompts per training dataset."),
          (f"- Leave-one-dataset-out: the generator for held-out h is trained on the other datasets' checkpoints only; "
          f"h's adapter is generated from h's unlabeled prompts ({cfg['samples']} draws of {cfg['n_prompts']}, seeds "
          f"0..{int(cfg['samples']) - 1}). *Train LoRAs*: the other datasets' final checkpoints evaluated on h "
          f"(mean, best); *zoo mean*: elementwise mean of A and B over the generator's training checkpoints; "
          f"*own LoRA*: h's own zoo LoRA (upper bound). *DnD best* picks the best draw with test labels (optimistic)."),
          (f"- Evaluation: a fixed sha256-ranked subset of each dataset's DnD test part (up to {cfg['eval_n']}); "
          f"{', '.join(mname[m] for m in ('loglik', 'gen') if m in cfg['measures'])} (max {cfg['max_new_tokens']} new "
          f"tokens; unparseable = wrong)."), ""]
    subs = res.get("subsets", {})
    if subs:
        L += ["| dataset | test part | evaluated | condition prompts from | pool |", "|---|---|---|---|---|"]
        for d, s in subs.items():
            L.append(f"| {short(d)} | {s['n_test']} | {s['n_eval']} | {s['prompt_source']} | {s['n_pool']} |")
        L.append("")
    for m in ("loglik", "gen"):
        if m not in cfg["measures"]:
            continue
        L += [f"## Held-out accuracy, {mname[m]} (%)", "",
              "| held-out | n | base | train LoRAs mean | train LoRAs best | zoo mean (A,B) | DnD mean ± sd | DnD best "
              "| own LoRA |",
              "|---|---|---|---|---|---|---|---|---|"]
        cols = {k: [] for k in ("base", "train_mean", "train_best", "zoo_mean", "dnd_mean", "dnd_best", "own")}
        for h, row in res["rows"].items():
            r = row.get(m, {})
            for k, col in cols.items():
                col.append(r.get(k))
            dnd = ("–" if r.get("dnd_mean") is None else
                   f"{_pct(r['dnd_mean'])} ± {100 * r['dnd_sd']:.1f} (k={r['dnd_k']})")
            best = "–" if r.get("train_best") is None else f"{_pct(r['train_best'])} ({short(r['train_best_dataset'])})"
            L.append(f"| {short(h)} | {row.get('n') or '–'} | {_pct(r.get('base'))} | {_pct(r.get('train_mean'))} | "
                     f"{best} | "
                     f"{_pct(r.get('zoo_mean'))} | {dnd} | {_pct(r.get('dnd_best'))} | {_pct(r.get('own'))} |")
        if all(all(v is not None for v in c) for c in cols.values()) and res["rows"]:
            L.append("| **mean** | | " + " | ".join(
                _pct(_mean(cols[k]))
                for k in ("base", "train_mean", "train_best", "zoo_mean", "dnd_mean", "dnd_best", "own")
            ) + " |")
        if m == "gen":
            inv = [f"{short(h)} {_pct(res['stages']['base']['scores'][h].get('gen_invalid'))}"
                   for h in res["rows"] if "base" in res["stages"] and h in res["stages"]["base"]["scores"]]
            if inv:
                L += ["", f"Unparseable answers of the base model (%): {', '.join(inv)}."]
        L += ["", f"### Where DnD does and does not win ({mname[m]}; computed from the table)", ""]
        L += _claims(res, m) or ["- (no held-out dataset complete yet)"]
        L.append("")
    # cost
    zc = res["zoo_cost"]
    L += ["## Cost", "",
          ("Seconds on this device. *Generate*: encoding the prompts + one decoder pass + detokenising "
          "(mean over draws; "
          "the generator is loaded). *LoRA to match*: optimiser seconds of the held-out dataset's own LoRA (batch "
          f"{cfg['zoo_batch']}, scored at steps {cfg['curve_steps']} and the last) until it first reaches DnD's mean "
          "accuracy (0 = the base model already does; '>' = never within the run)."), "",
          ("| held-out | generate (s) | generator training (s) | LoRA to match, log-lik (s, step) | speed-up | "
          "LoRA to match, generation (s, step) | speed-up |"), "|---|---|---|---|---|---|---|"]
    for h, row in res["rows"].items():
        if row.get("gen_seconds") is None:
            continue
        cells = []
        for m in ("loglik", "gen"):
            r = row.get(m, {})
            if "lora_seconds_to_match" not in r:
                cells += ["–", "–"]
            elif r["lora_seconds_to_match"] is None:
                cells += [f"> {r['lora_curve_max_seconds']:.2f}",
                          f"> {r['lora_curve_max_seconds'] / row['gen_seconds']:.0f}x"]
            else:
                t = r["lora_seconds_to_match"]
                cells += [f"{t:.2f} (step {r['lora_steps_to_match']})",
                          f"{t / row['gen_seconds']:.0f}x" if t else "base already matches"]
        L.append(f"| {short(h)} | {row['gen_seconds']:.3f} | {row['generator_train_seconds']:.1f} | "
                 + " | ".join(cells) + " |")
    L += ["", (f"One-off costs: the zoo ({zc['datasets']} datasets x "
          f"{int(cfg['warmup_steps']) + int(cfg['checkpoints'])} "
          f"steps, {cfg['checkpoints']} checkpoints each) took {zc['seconds']:.1f} s ({zc['train_seconds']:.1f} s of "
          f"optimiser steps; the rest is data preparation and saving checkpoints); each generator's training time is "
          "in the table above (tokenising the zoo is done once, in the zoo stages)."), ""]
    curves = {h: z["curve"] for h in res["rows"] if (z := res["stages"].get(f"zoo:{short(h)}"))}
    if curves:
        steps = sorted({c["step"] for cv in curves.values() for c in cv})
        L += [("Training curves of the held-out datasets' own LoRAs (log-lik accuracy %, cumulative optimiser seconds "
              "in brackets; step 0 = base model):"), "",
              "| dataset | 0 | " + " | ".join(str(x) for x in steps) + " |", "|---" * (len(steps) + 2) + "|"]
        for h, cv in curves.items():
            at = {c["step"]: c for c in cv}
            base_acc = res["rows"][h].get("loglik", {}).get("base")
            L.append(f"| {short(h)} | {_pct(base_acc)} | " + " | ".join(
                f"{_pct(at[x].get('loglik_acc'))} ({at[x]['train_seconds']:.2f})" if x in at else "–"
                for x in steps) + " |")
        L.append("")
    # ablations
    counts = sorted({int(n) for row in res["rows"].values()
                     for n in row.get("loglik", row.get("gen", {})).get("counts", {})})
    if counts:
        for m in ("loglik", "gen"):
            if m not in cfg["measures"]:
                continue
            L += [f"## Ablation: number of condition prompts at generation ({mname[m]}, %)", "",
                  (f"The decoder takes N={cfg['n_prompts']} prompts: fewer distinct prompts fill the N slots "
                  f"cyclically; "
                  f"more are split into groups of N whose decoded grids are averaged. Mean over "
                  f"{cfg['ablation_samples']} draws (N itself: over {cfg['samples']})."), "",
                  "| held-out | " + " | ".join(str(c) for c in counts) + " |", "|---" * (len(counts) + 1) + "|"]
            for h, row in res["rows"].items():
                c = row.get(m, {}).get("counts")
                if c:
                    L.append(f"| {short(h)} | " + " | ".join(_pct(c.get(str(n))) for n in counts) + " |")
            L.append("")
    ans_rows = [(h, row) for h, row in res["rows"].items()
                if any(row.get(m, {}).get("answers_mean") is not None for m in ("loglik", "gen"))]
    if ans_rows:
        L += ["## Ablation: prompts vs prompts with answers (%)", "",
              (f"Done for {len(ans_rows)} of {len(res['rows'])} held-out datasets "
              f"({', '.join(short(h) for h, _ in ans_rows)}): "
              "generators trained with condition = prompt + '\\nAnswer: <gold option>' and fed the held-out "
              "dataset's labeled prompts the same way."), "",
              "| held-out | prompts, log-lik | prompts+answers, log-lik | prompts, generation "
              "| prompts+answers, generation |",
              "|---|---|---|---|---|"]
        for h, row in ans_rows:
            lg, gg = row.get("loglik", {}), row.get("gen", {})
            L.append(f"| {short(h)} | {_pct(lg.get('dnd_mean'))} | {_pct(lg.get('answers_mean'))} | "
                     f"{_pct(gg.get('dnd_mean'))} | {_pct(gg.get('answers_mean'))} |")
        L.append("")
    san = [(h, row) for h, row in res["rows"].items() if row.get("sanity")]
    if san:
        L += ["## Generated adapters vs the zoo (draw 0)", "",
              ("||ΔW|| = sqrt(sum over modules of ||B·A||²_F) (alpha/r omitted); distances in the same norm. "
              "Generator loss: weighted MSE on the token grid, mean of the first and last 5% of steps."), "",
              ("| held-out | ‖ΔW‖ | zoo mean ‖ΔW‖ | nearest final LoRA (distance) | distance to own LoRA | "
              "distance to zoo mean | generator loss first → last |"), "|---|---|---|---|---|---|---|"]
        for h, row in san:
            s = row["sanity"]
            dist = s["distance_to_final"]
            near = min((d for d in dist if d != h), key=dist.get)
            L.append(f"| {short(h)} | {s['norm']:.3g} | {s['zoo_mean_norm']:.3g} | {short(near)} ({dist[near]:.3g}) | "
                     f"{dist[h]:.3g} | {s['distance_to_zoo_mean']:.3g} | "
                     f"{row['loss_first']:.4f} → {row['loss_last']:.4f} |")
        L.append("")
    L += ["## Stage times (s)", "", "| stage | seconds |", "|---|---|"]
    L += [f"| {n} | {s:.1f} |" for n, s in res["stage_seconds"].items()]
    L += ["", "## Commands", ""]
    for i in invs:
        L.append(f"- {i.get('start', '?')}: `{i.get('command', '?')}` -> {i.get('status', '?')} "
                 f"(stages: {', '.join(i.get('stages_run', [])) or 'none'})")
    return "\n".join(L) + "\n"


def export_results(state: Path, out: Path, record: dict | None = None) -> dict:
    """``out/dnd_results.json``, ``out/dnd.md`` and ``out/dnd_logs.tar.gz`` (stage JSONs, log, configs, zoo manifest,
    generator configs and loss logs; no weights)."""
    out.mkdir(parents=True, exist_ok=True)
    res = portable(collect(state, record))  # no machine's folders in what is committed
    write_json(out / "dnd_results.json", res)
    (out / "dnd.md").write_text(render(res))
    with tarfile.open(out / "dnd_logs.tar.gz", "w:gz") as tar:
        for p in [state / "config.json", state / "invocations.json", state / "log.txt", state / "zoo" / "manifest.json",
                  *sorted((state / "stages").glob("*.json")), *sorted((state / "gen").glob("*/generator_config.json")),
                  *sorted((state / "gen").glob("*/train_log.json"))]:
            if p.exists():
                tar.add(p, arcname=str(p.relative_to(state)))
    return res
