"""The report of ``prefix_representations.py``: the device name, mean ± std formatting, the tables collected from the
result JSONs (main experiment per representation and target; update experiment's cumulative costs and scores), the
update experiment's PNG, the Markdown section of one budget (``make_report``) and its place in the report file
(``write_section``), with the representations' names.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from softprompt import tasks

if TYPE_CHECKING:
    from prefix_representations_bench import Bench

REPS = ("frozen", "multitask", "concat", "joint", "concat-init")
NAMES = {"frozen": "frozen MiniLM", "multitask": "multi-task encoder", "concat": "bank concat",
         "joint": "bank joint", "concat-init": "control: concat of untrained prefixes"}

def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads " \
           f"{torch.get_num_threads()})"


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.array(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    m, s = _mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def collect_main(bench: Bench, clf: str) -> dict[str, dict[str, list[float]]]:
    """rep -> target -> scores over seeds (each probe seed reads the bank/MT of its training seed)."""
    table: dict[str, dict[str, list[float]]] = {r: {} for r in REPS}
    for seed in bench.cfg["seeds"]:
        b = bench.train_seed_of(seed)
        for rep in REPS:
            res = bench.result("probe__frozen" if rep == "frozen" else f"probe__{rep}__seed{b}")
            if res is None or clf not in res["scores"]:
                continue
            for target, per_seed in res["scores"][clf].items():
                if str(seed) in per_seed:
                    table[rep].setdefault(target, []).append(per_seed[str(seed)])
    return table


def collect_update(bench: Bench) -> list[dict]:
    """One row per (representation, k): cumulative steps/seconds and the mean target score (logreg).

    Costs accumulate over every step up to k, so a representation is listed only while it was measured at every k.
    """
    b = bench.bank_seeds()[0]
    sources = bench.cfg["sources"]
    bank = bench.bank(b)
    entries = {e.task: e for e in bank.entries()} if bank.exists() else {}
    rows = []
    for rep in ("concat", "joint", "multitask"):
        steps, seconds = 0, 0.0
        for k in range(1, len(sources) + 1):
            last = k == len(sources)
            res = bench.result(f"probe__{rep}__seed{b}" if last else f"probe__update-{rep}-k{k}__seed{b}")
            mt = bench.result(f"mt__k{k}__seed{b}")
            e = entries.get(sources[k - 1])
            if res is None or (rep == "multitask" and mt is None) or (rep != "multitask" and e is None):
                break
            enc_sec = sum(v["seconds"] for v in res["encode"].values())
            if rep == "multitask":  # retrain on all sources so far, re-encode the corpus
                steps += mt["steps"]
                seconds += mt["train_seconds"] + enc_sec
            else:  # train one new prefix; concat encodes only the new block (cache), joint re-encodes
                steps += e.steps
                seconds += e.train_seconds + enc_sec
            per_target = {t: float(np.mean(list(v.values()))) for t, v in res["scores"]["logreg"].items()}
            rows.append({"rep": rep, "k": k, "added": sources[k - 1], "cum_steps": steps,
                         "cum_seconds": round(seconds, 1), "encode_seconds": round(enc_sec, 1),
                         "encode_rows": sum(v["rows"] for v in res["encode"].values()),
                         "mean_score": float(np.mean(list(per_target.values()))), "per_target": per_target})
    rows.sort(key=lambda r: (r["k"], r["rep"]))
    return rows


def plot_update(rows: list[dict], frozen: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"concat": ("bank concat (add one prefix)", "o-"),
             "joint": ("bank joint (add one prefix, re-encode)", "s--"),
             "multitask": ("multi-task (retrain on all, re-encode)", "^-")}
    for ax, key, label in ((axes[0], "cum_steps", "cumulative training steps"),
                           (axes[1], "cum_seconds", "cumulative seconds (training + encoding)")):
        for rep, (name, fmt) in style.items():
            pts = [r for r in rows if r["rep"] == rep]
            if not pts:
                continue
            ax.plot([p[key] for p in pts], [100 * p["mean_score"] for p in pts], fmt, label=name)
            for p in pts:
                ax.annotate(f"+{p['added'].split('/')[-1]}", (p[key], 100 * p["mean_score"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 4))
        if frozen is not None:
            ax.axhline(100 * frozen, color="grey", ls=":", label="frozen MiniLM")
        ax.set_xlabel(label)
        ax.set_ylabel("mean target score (logreg probe)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_report(bench: Bench) -> str:
    c, args = bench.cfg, bench.args
    lines = []
    budget = args.budget
    lines.append(f"## Budget `{budget}`" + (" (small-budget CPU run)" if budget == "small" else ""))
    lines.append("")
    # The machine that measured (the report may be regenerated elsewhere with --stages report).
    info = bench.result("run_info") or {"device": device_name(), "torch": torch.__version__,
                                        "command": args.command_line}
    calls = (bench.result("wall") or {}).get("calls", [])
    total = sum(calls) + (0 if args.stages == "report" else time.time() - bench.start)
    lines.append(f"Command: `{info['command']}`  ")
    lines.append(f"Device: {info['device']}; torch {info['torch']}; wall time {total:.0f} s over "
                 f"{len(calls) + (0 if args.stages == 'report' else 1)} call(s) of the script.  ")
    if args.note:
        lines.append(f"Note: {args.note}  ")
    lines.append(f"Model: `{info.get('model', args.model)}` (MiniLM-L6-H384). Sources: {', '.join(c['sources'])}. "
                 f"Targets: {', '.join(c['targets'])}.  ")
    lims = (c["target_train_limit"], c["target_dev_limit"], c["target_test_limit"])
    lines.append(
        f"Source prefixes: m={c['m']} virtual tokens per layer, {c['prefix_steps']} steps of batch {c['prefix_bs']}, "
        f"lr {c['prefix_lr']}, max length {c['max_length']}, source training data "
        f"{'subsampled to ' + str(c['source_train_limit']) if c['source_train_limit'] else 'full'}. "
        f"Multi-task encoder: "
        f"{c['mt_steps_per_task']} steps per source task (batch {c['mt_bs']}, lr {c['mt_lr']}, full fine-tuning, mixed "
        f"batches, one linear head per task). Probes: features standardised, AdamW lr 1e-3, batch {c['probe_bs']}, "
        f"early stopping on dev "
        f"(patience 15); target train/dev/test limited to {lims} examples (None = all). Pooling: [CLS] of the last "
        f"layer. Seeds {c['seeds']}: "
        + ("the bank and the multi-task encoder are trained once (seed 0); the seeds vary the probes only."
           if c["seed_mode"] == "probe" else "each seed retrains the bank, the multi-task encoder and the probes."))
    lines.append("")
    # Source quality (sanity): prefix eval metrics from the manifest, multi-task heads.
    bank = bench.bank(bench.bank_seeds()[0])
    if bank.exists():
        mt = bench.result(f"mt__k{len(c['sources'])}__seed{bench.bank_seeds()[0]}")
        lines.append("Source tasks (seed of the first bank; main metric on the source dev split, "
                     f"{'subsampled' if c['source_eval_limit'] else 'full'}):")
        lines.append("")
        lines.append("| source | prefix (frozen encoder) | steps | seconds | multi-task head |")
        lines.append("|---|---|---|---|---|")
        for e in bank.entries():
            main = e.metrics.get("eval_main", e.metrics.get("eval_" + tasks.get_task(e.task).metric))
            mtv = (mt or {}).get("eval", {}).get(e.task)
            lines.append(f"| {e.task} | {main:.3f} | {e.steps} | {e.train_seconds:.0f} | "
                         f"{'' if mtv is None else f'{mtv:.3f}'} |")
        if mt:
            lines.append(f"\nMulti-task encoder: {mt['steps']} steps, {mt['train_seconds']:.0f} s.")
        lines.append("")
    # Main table.
    verdicts = []
    for clf in c["classifiers"]:
        table = collect_main(bench, clf)
        lines.append(f"### Target tasks, {clf} probe (test score × 100, mean ± std over {len(c['seeds'])} seeds)")
        lines.append("")
        lines.append("| target | metric | " + " | ".join(NAMES[r] for r in REPS) + " |")
        lines.append("|---|---|" + "---|" * len(REPS))
        for t in c["targets"]:
            metric = tasks.get_task(t).metric
            lines.append(f"| {t} | {metric} | " + " | ".join(_fmt(table[r].get(t, [])) for r in REPS) + " |")
        avg = {}
        for r in REPS:
            per_seed = [np.mean([table[r][t][i] for t in c["targets"]]) for i in range(len(c["seeds"]))
                        if all(t in table[r] and len(table[r][t]) > i for t in c["targets"])]
            avg[r] = per_seed
        lines.append("| **average** | | " + " | ".join(f"**{_fmt(avg[r])}**" for r in REPS) + " |")
        lines.append("")
        # Sampling noise of the test sets: binomial standard error at p = 0.5 (an upper bound for accuracy) per
        # target, averaged over targets; a difference of two averages is "clear" beyond 2 * sqrt(2) of it.
        frozen_res = bench.result("probe__frozen") or {}
        n_test = [frozen_res.get("splits", {}).get(t, {}).get("n_test") for t in c["targets"]]
        se = (float(np.sqrt(sum(0.25 / n for n in n_test))) / len(n_test)) if all(n_test) else None
        for rep, other in (("concat", "multitask"), ("joint", "multitask"), ("concat", "concat-init"),
                           ("concat", "frozen")):
            if not avg[rep] or not avg[other]:
                continue
            d = 100 * (np.mean(avg[rep]) - np.mean(avg[other]))
            wins = sum(np.mean(table[rep][t]) > np.mean(table[other][t]) for t in c["targets"])
            clear = se is None or abs(d) > 100 * 2 * np.sqrt(2) * se
            verdicts.append(f"{clf} probe: {NAMES[rep]} {'beats' if d > 0 else 'does not beat'} {NAMES[other]} on "
                            f"the average over unseen targets ({d:+.1f} points; better on {wins} of "
                            f"{len(c['targets'])} targets)"
                            + ("" if clear else f"; within test-set noise (2·√2·SE = "
                                                f"{100 * 2 * np.sqrt(2) * se:.1f} points)"))
    # Update experiment.
    rows = collect_update(bench)
    if rows:
        frozen = collect_main(bench, "logreg")["frozen"]
        frozen_avg = float(np.mean([np.mean(v) for v in frozen.values()])) if frozen else None
        png = Path(args.report).parent / f"prefix_representations_{budget}.png"
        try:
            plot_update(rows, frozen_avg, png, f"Update experiment ({budget} budget, {info['device']})")
        except ImportError:
            bench.log("matplotlib is not installed: no PNG (pip install matplotlib, then rerun --stages report)")
        lines.append("### Update experiment (sources added one at a time; logreg probe; mean over targets)")
        lines.append("")
        lines.append(f"![update experiment]({png.name})")
        lines.append("")
        lines.append("| representation | k | added | cumulative steps | cumulative seconds | encoded rows at this "
                     "step | mean target score |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in rows:
            lines.append(f"| {NAMES[r['rep']]} | {r['k']} | {r['added']} | {r['cum_steps']} | {r['cum_seconds']:.0f} "
                         f"| {r['encode_rows']} | {100 * r['mean_score']:.1f} |")
        lines.append("")
        lines.append("Costs: a bank update trains one prefix and (concat) encodes only the new block for the target "
                     "corpus (the cached blocks are reused: see the encoded rows); joint re-encodes the corpus once; "
                     "the multi-task baseline retrains on all sources added so far and re-encodes the corpus.")
        lines.append("")
    # Throughput.
    tp = bench.result("throughput")
    if tp:
        lines.append(f"### Throughput of R(x) ({tp['device']}; {tp['texts']} AG News texts, max length "
                     f"{tp['max_length']}, {tp['texts_per_chunk']} texts per chunk, best of {tp['repeats']})")
        lines.append("")
        lines.append("| dtype | T | mode | texts/s |")
        lines.append("|---|---|---|---|")
        for r in tp["rows"]:
            lines.append(f"| {r['dtype']} | {r['T']} | {r['mode']} | {r['texts_per_s']:.1f} |")
        lines.append("")
    if verdicts:
        lines.append("### Verdict")
        lines.append("")
        lines += [f"- {v}." for v in verdicts]
        lines.append("")
        if budget == "small":
            lines.append(
                "Caveat: this is a smoke-scale CPU run. Each source prefix and the multi-task encoder see "
                f"{c['prefix_steps']} steps of {c['prefix_bs']} examples per source (see the source table: some "
                "prefixes are near chance on their own task), the seeds vary only the probes, and the test sets are "
                f"at most {c['target_test_limit']} examples. It checks the pipeline and the cost accounting; it cannot "
                "confirm or refute the paper's claim. The full budget (GPU) is the experiment.")
            lines.append("")
    return "\n".join(lines)


def write_section(report: Path, budget: str, body: str) -> None:
    """Replace this budget's section of the report (other budgets' sections are kept)."""
    start, end = f"<!-- budget:{budget} -->", f"<!-- /budget:{budget} -->"
    text = report.read_text() if report.exists() else (
        "# Prefix-bank representations: results\n\n"
        "Written by `benchmarks/prefix_representations.py` (one section per budget). See "
        "`docs/prefix_representations.md` for the method.\n\n")
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
