"""The README's fair-protocol block (issue 23), generated from ``benchmarks/results/fair_glue.json``, so that the
README's numbers are the JSON's: one table of seed means per method and task, and the interval of each of the papers'
claims. It rewrites what lies between the two marker lines of ``README.md`` and nothing else.

    python benchmarks/fair_glue.py report && python benchmarks/fair_readme.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import readme_block
from fair_glue import ALL_ROWS, EXTRA_TASKS, TASKS
from fair_glue_report import NAMES, any_provisional, chance_note, wide_seeds

BEGIN, END = "<!-- fair-protocol:begin (benchmarks/fair_readme.py) -->", "<!-- fair-protocol:end -->"
CLAIMS = [("idspam", "lpt_npg"), ("idspam", "prompt"), ("apt", "prefix"), ("apt", "prefix_half")]
SHORT = {"glue/sst2": "SST-2", "glue/mrpc": "MRPC", "glue/rte": "RTE", "glue/cola": "CoLA", "superglue/cb": "CB",
         "glue/stsb": "STS-B (apart)"}


def _interval(c: dict) -> str:
    return readme_block.interval(c["diff"], c["ci"])


def block(data: dict) -> list[str]:
    """The block's lines (without the markers)."""
    tasks = [t for t in TASKS if t in data["tasks"]]
    columns = tasks + [t for t in EXTRA_TASKS if t in data["tasks"]]  # STS-B: a column, outside means and claims
    rows = [r for r in ALL_ROWS if any(r in data["tasks"][t] for t in columns)]
    runs = data["runs"]
    # "so far" while a cell has fewer than its 5 seeds or a provisional rate; a method not run on a task is no gap
    done = not any_provisional(data) and all(len(c["scores"]) >= 5 for t in columns for c in data["tasks"][t].values())
    so_far = "" if done else " so far"
    lines = [f"**Fair protocol (issue 23; {runs['seeds']} seed runs{so_far}, 5 seeds per cell at the learning rate "
             "chosen on a split carved from train; [fair_glue.json](benchmarks/results/fair_glue.json), tables and "
             "protocol in [apt.md](benchmarks/results/apt.md) and [idspam.md](benchmarks/results/idspam.md)).** Dev "
             "scores, mean ± std over seeds; † at chance (not above the same predictions shuffled across examples)"
             + ("; ‡ at a provisional rate (the best rate lay at an end of the grid, and the runs past it are pending)"
                if any_provisional(data) else "") + ":",
             "", "| method | " + " | ".join(SHORT[t] for t in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for t in columns:
            c = data["tasks"][t].get(r)
            cells.append("–" if c is None else
                         f"{c['mean']:.1f} ± {c['std'] or 0:.1f}{' †' if c.get('above_chance') is False else ''}"
                         f"{' ‡' if c.get('provisional') else ''}")
        lines.append(f"| {NAMES[r]} | " + " | ".join(cells) + " |")
    if columns != tasks:
        lines += ["", "STS-B (Pearson x 100) is a regression extension, not among the papers' tasks: it stays out of "
                  "the means and the claims below."]
    if wide := wide_seeds(data, columns, rows):
        lines += ["", wide]
    lines += ["", "The papers' claims as differences (points, 95% paired bootstrap interval over dev examples and "
              "seeds; *above* / *below* when the interval excludes 0):", ""]
    by_key = {(c["a"], c["b"], c["task"]): c for c in data["comparisons"]}
    for a, b in CLAIMS:
        head = f"* {NAMES[a]} − {NAMES[b]}: "
        if (a, b, "mean5") in by_key:
            parts = [f"mean of the five tasks {_interval(by_key[(a, b, 'mean5')])}"]
            if (a, b, "mean_above_chance") in by_key:
                c = by_key[(a, b, "mean_above_chance")]
                dropped = ", ".join(SHORT[t] for t in tasks if t not in c["tasks"])
                parts.append(f"without {dropped}, where both are at chance, {_interval(c)}")
            lines.append(head + "; ".join(parts) + ".")
            continue
        per = [f"{SHORT[t]} {_interval(by_key[(a, b, t)])}{chance_note(data, t, a, b)}" for t in tasks
               if (a, b, t) in by_key]
        lines.append(head + ("; ".join(per) + " (the five-task mean once every task has its seeds)." if per
                             else "not measured yet."))
    return lines + ["", excluding_zero(data, tasks)]


def excluding_zero(data: dict, tasks: list[str]) -> str:
    """One sentence naming every comparison of the claims whose interval excludes 0, on a task or on a mean."""
    hits = [f"{NAMES[c['a']]} − {NAMES[c['b']]} on {SHORT.get(c['task'], _MEANS.get(c['task'], c['task']))} "
            f"{_interval(c)}" for c in data["comparisons"] if (c["a"], c["b"]) in CLAIMS
            and (c["task"] in tasks or c["task"] in _MEANS) and (c["ci"][0] > 0 or c["ci"][1] < 0)]
    return ("Intervals of these claims that exclude 0: " + "; ".join(hits) + "." if hits else
            "No interval of these claims excludes 0, on any task or mean.")


_MEANS = {"mean5": "the five-task mean", "mean_above_chance": "the mean without tasks where both are at chance"}


def update(readme: Path, data: dict) -> bool:
    """Rewrite the block between the markers; False (and nothing written) when the markers are missing."""
    return readme_block.update(readme, BEGIN, END, block(data))


def main(argv=None) -> int:
    return readme_block.main(argv, __doc__.split("\n\n")[0], "benchmarks/results/fair_glue.json", block, BEGIN, END,
                             "python benchmarks/fair_glue.py report")


if __name__ == "__main__":
    sys.exit(main())
