"""The report of ``fair_glue.py``: the paired bootstrap, the chance check and ``fair_glue.json`` (schema of issue 23),
and the markdown sections ``method_tables.py`` prints. The runs outside ``softprompt.train`` (readout probe, LoRA,
linear probe) are in ``fair_glue_plain.py``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
from fair_glue import (
    CARVE,
    EPOCHS,
    EXTRA_TASKS,
    LR_SEED,
    MAX_EXTEND,
    ROWS,
    TASKS,
    chosen_lr,
    load_state,
    rate_grid,
    run_name,
    unstable_rates,
)

# (a, b): the papers' claims and the spec's ablations, as "a - b".
PAIRS = [("idspam", "lpt_npg"), ("idspam", "prompt"), ("idspam", "lpt"), ("apt", "prefix"), ("apt", "prefix_half"),
         ("prefix_half", "prefix"), ("idspam", "idspam_noact"), ("idspam", "idspam_mean")]
NAMES = {"prompt": "prompt tuning", "ptuning": "P-tuning", "prefix": "prefix tuning (P-tuning v2)", "apt": "APT",
         "prefix_half": "prefix x 0.5 (APT control)", "lpt": "LPT static", "lpt_npg": "LPT generator (r=256)",
         "idspam": "ID-SPAM (ReLU)", "idspam_noact": "ID-SPAM (no activation)",
         "idspam_mean": "ID-SPAM (mean pooling)", "lora": "LoRA (PEFT r=8)", "linear_probe": "linear probe"}


# ---- scores on bootstrap resamples --------------------------------------------------------------------------
def resampled(metric: str, preds: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """[k, B] metric of each of k prediction rows on each of B resamples ``idx`` [B, n] of the examples."""
    return _metric(metric, preds[:, idx], labels[idx][None], preds, labels)


def permuted(metric: str, preds: np.ndarray, labels: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """[k, B] metric of each of k prediction rows, shuffled across examples by each of B permutations ``perms``
    [B, n], against the labels in order: scores of predictions that keep their label mix but know nothing of the
    example (the null distribution of a chance check)."""
    return _metric(metric, preds[:, perms], labels[None, None], preds, labels)


def _metric(metric: str, p: np.ndarray, y: np.ndarray, preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    n = p.shape[-1]
    if metric == "pearson":
        pc, yc = p - p.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
        den = np.sqrt((pc ** 2).sum(-1) * (yc ** 2).sum(-1))
        return np.where(den > 0, (pc * yc).sum(-1) / np.where(den > 0, den, 1), 0.0)
    acc = (p == y).mean(-1)
    if metric == "accuracy":
        return acc
    if metric in ("f1", "accuracy_f1_mean"):
        tp = ((p == 1) & (y == 1)).sum(-1)
        den = 2 * tp + ((p == 1) & (y != 1)).sum(-1) + ((p != 1) & (y == 1)).sum(-1)
        f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)
        return f1 if metric == "f1" else (acc + f1) / 2
    if metric == "matthews_correlation":
        classes = np.union1d(np.unique(preds), np.unique(labels))
        pk = np.stack([(p == k).sum(-1) for k in classes]).astype(np.float64)
        tk = np.stack([np.broadcast_to((y == k).sum(-1), pk.shape[1:]) for k in classes]).astype(np.float64)
        c = (p == y).sum(-1).astype(np.float64)
        num = c * n - (pk * tk).sum(0)
        den = np.sqrt((n * n - (pk ** 2).sum(0)) * (n * n - (tk ** 2).sum(0)))
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
    raise ValueError(f"no bootstrap for metric {metric!r}")


def reported_lr(done: dict, task: str, row: str) -> tuple[float | None, bool]:
    """(the rate whose seeds the tables report, provisional): the chosen rate, or, while runs of an extended grid are
    still missing, the choice on the row's own grid, flagged provisional."""
    lr, _ = chosen_lr(done, task, row)
    if lr is not None or rate_grid(done, task, row) == ROWS[row][2]:
        return lr, False
    base, _ = chosen_lr(done, task, row, extend=False)
    return base, base is not None


def seed_runs(done: dict) -> dict[str, dict[str, list[dict]]]:
    """task -> row -> the finished seeds-stage runs at the reported rate, by seed (runs at a rate that proved
    unstable, and the diverged runs themselves, are left out here and listed by ``write_json``)."""
    out: dict = {}
    rates = {}
    for r in done.values():
        if r["stage"] != "seeds" or r["score"] is None:
            continue
        key = (r["task"], r["row"])
        if key not in rates:
            rates[key] = reported_lr(done, *key)[0]
        if r["lr"] == rates[key]:
            out.setdefault(r["task"], {}).setdefault(r["row"], []).append(r)
    for rows in out.values():
        for runs in rows.values():
            runs.sort(key=lambda r: r["seed"])
    return out


def bootstrap(runs: dict, task_list: list[str], a: str, b: str, n_boot: int, seed: int = 0):
    """(diff, [lo, hi]) in points of mean(a) - mean(b) averaged over ``task_list``: dev examples resampled jointly for
    a and b (paired), seeds resampled independently for each; 95% percentile interval."""
    rng = np.random.default_rng(seed)
    diffs = np.zeros(n_boot)
    point = 0.0
    for task in task_list:
        ra, rb = runs[task][a], runs[task][b]
        labels = np.asarray(ra[0]["labels"])
        idx = rng.integers(0, len(labels), (n_boot, len(labels)))
        per = []
        for rs in (ra, rb):
            s = resampled(rs[0]["metric"], np.asarray([r["predictions"] for r in rs]), labels, idx)  # [k, B]
            pick = rng.integers(0, len(rs), (n_boot, len(rs)))
            per.append(100 * s[pick, np.arange(n_boot)[:, None]].mean(-1))
        diffs += (per[0] - per[1]) / len(task_list)
        point += 100 * (statistics.mean(r["score"] for r in ra) - statistics.mean(r["score"] for r in rb)) \
            / len(task_list)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return round(point, 2), [round(float(lo), 2), round(float(hi), 2)]


def chance_check(rs: list[dict], n_perm: int, seed: int = 0) -> dict:
    """Is a row's seed mean above chance on its task? The null: each seed's dev predictions shuffled across the
    examples (the same permutation for every seed), scored and averaged over the seeds; ``chance_hi`` is the null's
    97.5th percentile (points). Also ``majority``: the score of always predicting the most frequent dev label
    (classification only)."""
    labels = np.asarray(rs[0]["labels"])
    preds = np.asarray([r["predictions"] for r in rs])
    perms = np.argsort(np.random.default_rng(seed).random((n_perm, len(labels))), axis=1)
    null = 100 * permuted(rs[0]["metric"], preds, labels, perms).mean(0)
    hi = float(np.percentile(null, 97.5))
    mean = 100 * statistics.mean(r["score"] for r in rs)
    out = {"chance_hi": round(hi, 2), "above_chance": bool(mean > hi)}
    if rs[0]["metric"] != "pearson":
        values, counts = np.unique(labels, return_counts=True)
        constant = np.full((1, len(labels)), values[counts.argmax()])
        out["majority"] = round(100 * float(resampled(rs[0]["metric"], constant, labels,
                                                      np.arange(len(labels))[None])[0, 0]), 2)
    return out


def write_json(state: Path, path: Path, n_boot: int = 2000) -> dict:
    """``fair_glue.json`` from the state folder (numbers in points: metric x 100)."""
    done = load_state(state)
    sessions = json.loads((state / "sessions.json").read_text()) if (state / "sessions.json").exists() else []
    readout = json.loads((state / "readout.json").read_text()) if (state / "readout.json").exists() else None
    task_names = sorted({r["task"] for r in done.values()}, key=lambda t: (t not in TASKS, t))
    lr_selection: dict = {}
    for task in task_names:
        for row in ROWS:
            lr, scores = chosen_lr(done, task, row)
            if scores:
                grid = rate_grid(done, task, row)
                reported, provisional = reported_lr(done, task, row)
                lr_selection.setdefault(task, {})[row] = {
                    "chosen": lr, "carved_scores": {f"{k:g}": None if v is None else round(100 * v, 2)
                                                    for k, v in scores.items()},
                    "grid": grid, "extended": [x for x in grid if x not in ROWS[row][2]],
                    "reported": reported, "provisional": provisional,
                    "at_grid_edge": lr in (grid[0], grid[-1]) if lr is not None else None,
                    "unstable_rates": {f"{k:g}": v for k, v in unstable_rates(done, task, row).items()},
                    "carved_dev_examples": next((done[run_name("lr", task, row, x, LR_SEED)].get("eval_examples")
                                                 for x in scores if scores[x] is not None), None)}
    runs = seed_runs(done)
    table: dict = {}
    for task, rows in runs.items():
        for row, rs in rows.items():
            vals = [100 * r["score"] for r in rs]
            table.setdefault(task, {})[row] = {
                "lr": rs[0]["lr"], "provisional": lr_selection[task][row]["provisional"],
                "scores": [round(v, 2) for v in vals], "seeds": [r["seed"] for r in rs],
                "mean": round(statistics.mean(vals), 2),
                "std": round(statistics.stdev(vals), 2) if len(vals) > 1 else None,
                "trainable_params": rs[0]["trainable_params"], "metric": rs[0]["metric"],
                **chance_check(rs, n_perm=n_boot)}
    comparisons = []
    for a, b in PAIRS:
        both = [t for t in TASKS if a in runs.get(t, {}) and b in runs.get(t, {})]
        apart = [t for t in EXTRA_TASKS if a in runs.get(t, {}) and b in runs.get(t, {})]  # never in a mean
        for task in both + apart:
            diff, ci = bootstrap(runs, [task], a, b, n_boot)
            comparisons.append({"a": a, "b": b, "task": task, "diff": diff, "ci": ci})
        if len(both) == len(TASKS):
            diff, ci = bootstrap(runs, TASKS, a, b, n_boot)
            comparisons.append({"a": a, "b": b, "task": "mean5", "diff": diff, "ci": ci})
            # The same mean without the tasks on which both rows are at chance (their difference is noise).
            informative = [t for t in TASKS if table[t][a]["above_chance"] or table[t][b]["above_chance"]]
            if informative and len(informative) < len(TASKS):
                diff, ci = bootstrap(runs, informative, a, b, n_boot)
                comparisons.append({"a": a, "b": b, "task": "mean_above_chance", "tasks": informative,
                                    "diff": diff, "ci": ci})
    last = sessions[-1] if sessions else {}
    data = {"device": last.get("device"), "versions": last.get("versions"), "date": last.get("date"),
            "command": last.get("command"), "sessions": sessions,
            "readout": readout["choice"] if readout else None, "readout_selection": readout,
            "model": last.get("model"), "units": "points (metric x 100); diff = a - b; ci = paired bootstrap 95%",
            "protocol": {"carve_dev": CARVE, "lr_seed": LR_SEED, "grids": {r: v[2] for r, v in ROWS.items()},
                         "grid_extension": f"one 1-3-10 step past an end whose rate beats all others, at most "
                                           f"{MAX_EXTEND} per direction",
                         "rows": {r: {"method": v[0], "options": v[1]} for r, v in ROWS.items()}},
            "lr_selection": lr_selection, "tasks": table, "comparisons": comparisons,
            "runs": {"lr": sum(r["stage"] == "lr" for r in done.values()),
                     "seeds": sum(r["stage"] == "seeds" for r in done.values())}}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


# ---- markdown (printed by method_tables.py) --------------------------------------------------------------------------
def verdict(c: dict | None, a: str, b: str) -> str:
    """One sentence on ``a - b`` from its interval: holds, reversed, or within noise."""
    if c is None:
        return f"{NAMES[a]} vs {NAMES[b]}: not measured yet (needs the seeds stage on all five tasks)."
    lo, hi = c["ci"]
    word = ("holds: a above b" if lo > 0 else "reversed: b above a" if hi < 0 else "within noise (the interval "
            "contains 0)")
    return (f"{NAMES[a]} - {NAMES[b]} ({c['task']}): {c['diff']:+.2f} points, 95% CI [{lo:+.2f}, {hi:+.2f}]: {word}.")


def fair_section(data: dict | None, rows: list[str], pairs: list[tuple[str, str]], title: str) -> list[str]:
    """The fair-protocol section of a results file: provenance, readout, chosen rates, seed table, intervals."""
    lines = [f"## {title}", ""]
    if data is None:
        return lines + ["`benchmarks/results/fair_glue.json` does not exist yet: run `benchmarks/gpu_fair.sh`.", ""]
    rs = data.get("readout_selection") or {}
    epochs = " / ".join(f"{t.split('/')[1]} {EPOCHS[t]:g}" for t in TASKS)
    lines += [f"Protocol: `benchmarks/fair_glue.py` (issue 23). Every run: max length 128, batch 32, AdamW, linear "
              f"decay, 6% warm-up, epochs {epochs}; bf16 on the GPU. Learning "
              f"rates chosen per method and task on a {data['protocol']['carve_dev']:.0%} dev split carved from "
              f"train (seed {data['protocol']['lr_seed']}), never on the reported dev set; then seeds 1-5 at that "
              f"rate, trained on the full train split and scored on the dev set. Seeds vary every initialisation "
              f"(head, method, generator, init sampling) and the data order and dropout.", "",
              f"Readout (one for all methods): **{data.get('readout')}**; {rs.get('protocol', 'not chosen yet')}. "
              + ("Carved-dev scores " + "; ".join(f"{t}: pooler {s['pooler']:.1f}, mean {s['mean']:.1f}"
                                                  for t, s in rs.get("scores", {}).items()) + "." if rs else ""), "",
              f"Devices (the calls ran on these; see fair_glue_status.md): "
              f"{' and '.join(sorted({x['device'] for x in data.get('sessions', []) if x.get('device')})) or 'none'}; "
              f"versions {data.get('versions')}; last run {data.get('date')}; "
              f"command `{data.get('command')}`. Runs so far: {data['runs']['lr']} learning-rate runs, "
              f"{data['runs']['seeds']} seed runs.", ""]
    tasks = TASKS + [t for t in ["glue/stsb"] if t in data["lr_selection"] or t in data["tasks"]]
    lines += ["### Learning rates (carved dev split, seed 1)", "",
              "| task | " + " | ".join(NAMES[r] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for t in tasks:
        cells = []
        for r in rows:
            sel = data["lr_selection"].get(t, {}).get(r)
            if sel is None:
                cells.append("not run")
            elif sel["chosen"] is None and sel.get("provisional"):
                base = sel["carved_scores"][f"{sel['reported']:g}"]
                pending = ", ".join(f"{x:g}" for x in sel["grid"] if f"{x:g}" not in sel["carved_scores"])
                cells.append(f"*{sel['reported']:g}* ({base:.1f}) ‡ {pending} pending")
            elif sel["chosen"] is None:
                cells.append(f"grid {len(sel['carved_scores'])}/{len(sel.get('grid', data['protocol']['grids'][r]))}: "
                             + ", ".join(f"{k}: {_score(v)}" for k, v in sel["carved_scores"].items()))
            else:
                best = sel["carved_scores"][f"{sel['chosen']:g}"]
                cells.append(f"**{sel['chosen']:g}** ({best:.1f}){' +' if sel.get('extended') else ''}"
                             f"{' edge' if sel['at_grid_edge'] else ''}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: chosen rate (its carved-dev score x 100); `+`: the grid was extended past its end for that "
              "cell (where one rate at an end beat all others, the next rate beyond it joined the grid, at most twice "
              "per direction); `edge`: the chosen rate is still at an end of the grid (a tie that goes to the smaller "
              "rate, or the cap)" + ("; ‡: provisional, the rate chosen on the row's own grid while the extension's "
                                     "runs (pending) are still missing" if any_provisional(data) else "") +
              ". Incomplete grids list the rates run so far. Carved dev "
              "examples: " + ", ".join(f"{t} {n}" for t in tasks if (n := next((c.get("carved_dev_examples") for c in
                                       data["lr_selection"].get(t, {}).values()), None))) + " (CB's 25 make "
              "its choice coarse: one example is 4 points).", "",
              "### Dev scores at the chosen rate (mean ± std over seeds, n)", "",
              "| task | " + " | ".join(NAMES[r] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for t in tasks:
        cells = []
        for r in rows:
            c = data["tasks"].get(t, {}).get(r)
            mark = (" †" if c and c.get("above_chance") is False else "") + (" ‡" if c and c.get("provisional") else "")
            cells.append(f"{c['mean']:.1f} ± {c['std'] or 0:.1f} ({len(c['scores'])}){mark}" if c else "pending")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    majority = {t: next((c["majority"] for c in data["tasks"].get(t, {}).values() if "majority" in c), None)
                for t in tasks}
    lines += ["", "†: at chance, the seed mean is not above the 97.5th percentile of the same predictions shuffled "
              "across the dev examples (a permutation null; a claim resting on that cell says nothing about the "
              "method)" + ("; ‡: at a provisional rate (grid extension pending)" if any_provisional(data) else "") +
              ". Majority-class scores: " + ", ".join(f"{t} {m:.1f}" for t, m in majority.items()
                                                             if m is not None) + ".",
              *([wide] if (wide := wide_seeds(data, tasks, rows)) else []),
              "", "### Comparisons (paired bootstrap over dev examples, seeds resampled; 95% intervals)", ""]
    by_key = {(c["a"], c["b"], c["task"]): c for c in data["comparisons"]}
    for a, b in pairs:
        lines.append("* " + verdict(by_key.get((a, b, "mean5")), a, b))
        if (a, b, "mean_above_chance") in by_key:
            c = by_key[(a, b, "mean_above_chance")]
            dropped = ", ".join(t for t in TASKS if t not in c["tasks"])
            lines.append(f"  Without {dropped} (both at chance there; mean of {', '.join(c['tasks'])}): "
                         + verdict(c, a, b))
        per_task = [c for (x, y, t), c in by_key.items() if (x, y) == (a, b) and not t.startswith("mean")]
        if per_task:
            lines.append("  Per task: " + "; ".join(f"{c['task']} {c['diff']:+.1f} [{c['ci'][0]:+.1f}, "
                                                   f"{c['ci'][1]:+.1f}]{chance_note(data, c['task'], a, b)}"
                                                   for c in per_task) + ".")
    return lines + [""]


def chance_note(data: dict, task: str, a: str, b: str) -> str:
    """" (both at chance)" when neither row beats the permutation null on ``task``: their difference is noise."""
    rows = data["tasks"].get(task, {})
    at_chance = [rows.get(r, {}).get("above_chance") is False for r in (a, b)]
    return " (both at chance)" if all(at_chance) else ""


def wide_seeds(data: dict, tasks: list[str], rows: list[str], std_points: float = 10.0) -> str:
    """A sentence naming the cells whose seeds disagree by more than ``std_points`` (sample std), with every seed's
    score, so that a mean over a collapse is read as one; "" when there is none."""
    cells = []
    for t in tasks:
        for r in rows:
            c = data["tasks"].get(t, {}).get(r)
            if c and (c.get("std") or 0) > std_points:
                cells.append(f"{t} {NAMES[r]} ({', '.join(f'{x:.1f}' for x in c['scores'])})")
    if not cells:
        return ""
    return f"Seeds that disagree (std above {std_points:g} points; each seed's score): " + "; ".join(cells) + "."


def any_provisional(data: dict) -> bool:
    """Whether a reported cell still rests on a provisional rate (a grid extension's runs pending)."""
    return any(c.get("provisional") for rows in data["tasks"].values() for c in rows.values())


def _score(v: float | None) -> str:
    return "diverged" if v is None else f"{v:.1f}"


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None
