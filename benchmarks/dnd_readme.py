"""The README's Drag-and-Drop block (issue 21), generated from ``benchmarks/results/dnd_cloze.json``, so that the
README's numbers are the JSON's: the zoo gate, the valid targets, and one row per held-out dataset whose generator
has run, with the paired intervals against the mean and the nearest training LoRA. It rewrites what lies between
the two marker lines of ``README.md`` and nothing else.

    python benchmarks/dnd_bench.py cloze-report ... && python benchmarks/dnd_readme.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import readme_block

BEGIN, END = "<!-- dnd-cloze:begin (benchmarks/dnd_readme.py) -->", "<!-- dnd-cloze:end -->"


def _name(dataset: str) -> str:
    return dataset.split("/")[-1]


def _to_match(t: dict | None) -> str:
    if not t:
        return "–"
    if t.get("step") is None:
        return "not reached by its final LoRA"
    if not t["step"]:
        return "the base already does"
    if t.get("alone_seconds") is not None:
        return f"≈{t['alone_seconds']:.1f} s alone ({t['step']} steps)"
    return f"{t['train_seconds']:.1f} s ({t['step']} steps)"


def block(res: dict) -> list[str]:
    """The block's lines (without the markers)."""
    rows = res["datasets"]
    date = (res.get("date") or "")[:10]
    lines = [f"**Drag-and-Drop on SmolLM2-135M-Instruct** ([dnd.md](benchmarks/results/dnd.md), generated from "
             f"[dnd_cloze.json](benchmarks/results/dnd_cloze.json); {res.get('device')}, {date}). Answers are scored "
             "as continuations (cloze: acc_norm; acc for WinoGrande; calibrated two-shot acc for BoolQ); the earlier "
             "letter-choice run was at chance ([dnd_letter.md](benchmarks/results/dnd_letter.md))."]
    above = [d for d, r in rows.items() if r.get("base") is not None and r["base"] > r["chance"]]
    invalid = [d for d, r in rows.items() if r.get("valid_target") is False]
    facts = [f"The base model is above chance on {len(above)} of {len(rows)} datasets"]
    if invalid:
        facts.append("not a valid held-out target (base not above the always-the-most-frequent-answer rate): "
                     + ", ".join(f"{_name(d)} ({rows[d]['base']:.1f} against {rows[d]['majority']:.1f})"
                                 for d in invalid))
    gate = res.get("zoo_gate")
    if gate:
        facts.append(f"the zoo {'passes' if gate['passes'] else 'fails'} its gate (own LoRA "
                     f"{gate['mean_gain']:+.1f} points over the base on average, +3 or more on "
                     f"{gate['datasets_gaining_3']} of {gate['n_datasets']})")
    lines[0] += " " + "; ".join(facts) + "."
    done = [(d, r) for d, r in rows.items() if r.get("dnd_mean") is not None]
    if not done:
        return lines + ["", "No leave-one-out generator has run on this zoo yet (`docs/dnd_gpu.md`)."]
    so_far = " so far" if len(done) < len(rows) else ""
    lines += ["", f"Leave one dataset out ({len(done)} of {len(rows)} held-out datasets{so_far}; paired 95% bootstrap "
              "intervals over examples):", "",
              "| held-out | measure | base | training-LoRA mean | nearest training LoRA | DnD (draws) | own LoRA | "
              "DnD − mean | DnD − nearest | own LoRA training to match DnD |", "|---" * 10 + "|"]
    for d, r in done:
        near, ci_near = r["nearest_lora"], r.get("ci_dnd_minus_nearest")
        vs_mean = readme_block.interval(r["dnd_mean"] - r["train_lora_mean"], r["ci_dnd_minus_train_mean"])
        lines.append(
            f"| {_name(d)} | {r['measure']} | {r['base']:.1f} | {r['train_lora_mean']:.1f} | {near['acc']:.1f} "
            f"({_name(near['dataset'])}) | {r['dnd_mean']:.1f} ± {r['dnd_sd']:.1f} ({r['dnd_draws']}) | "
            f"{r['own_lora']:.1f} | {vs_mean} | "
            f"{'–' if ci_near is None else readme_block.interval(r['dnd_mean'] - near['acc'], ci_near)} | "
            f"{_to_match(r.get('lora_to_match'))} against {r['generate_seconds']:.2f} s to generate |")
    valid = [r for _, r in done if r.get("valid_target") is not False]
    beats = sum(r["ci_dnd_minus_train_mean"][0] > 0 for r in valid)
    near = sum((r.get("ci_dnd_minus_nearest") or [0, 0])[0] > 0 for r in valid)
    zoo = [r["ci_dnd_minus_zoo_mean"] for r in valid if r.get("ci_dnd_minus_zoo_mean")]
    zoo_note = (f", and the zoo mean (about what it would output if it ignored its condition) on "
                f"{sum(c[0] > 0 for c in zoo)} of {len(zoo)}" if zoo else "")
    agree = [r["answer_agreement"]["ci_kappa_nearest_minus_zoo_mean"] for r in valid if r.get("answer_agreement")]
    agree_note = (f" Example by example it answers more like its nearest training LoRA than like the zoo mean on "
                  f"{sum(c[0] > 0 for c in agree)} of {len(agree)} (Cohen's kappa)." if agree else "")
    stats = [r["ci_stats_dnd_minus_relative"] for r in valid if r.get("ci_stats_dnd_minus_relative")]
    stats_note = (f" With DnD's own scale code for the weight tokens' statistics instead of ours it scores higher on "
                  f"{sum(c[0] > 0 for c in stats)} of {len(stats)} held-out datasets tried and lower on "
                  f"{sum(c[1] < 0 for c in stats)}." if stats else "")
    far = [r["without_nearest"] for r in valid if r.get("without_nearest")]
    far_note = (f" Trained without the dataset nearest to the held-out one as well, it is above its new nearest "
                f"training LoRA on {sum(w['ci_dnd_minus_nearest'][0] > 0 for w in far)} of {len(far)} held-out "
                "datasets tried." if far else "")
    evidence = ["headroom", "retrieval", "the condition", "answers", "capacity"]
    evidence += ["budget"] * any(r.get("budget") for r in valid) + ["weight tokenisation"] * bool(stats)
    evidence += ["without the nearest dataset"] * bool(far)
    lines += ["", f"DnD beats the training-LoRA mean on {beats} of {len(valid)} valid held-out targets{so_far} (the "
              f"paper's claim needs at least 5 of 7), the nearest training LoRA on {near} of {len(valid)}{zoo_note}."
              f"{agree_note}{stats_note}{far_note} Where it wins and where it does not, with the evidence for why "
              f"({', '.join(evidence)}) and the verdict: "
              "[dnd.md](benchmarks/results/dnd.md#where-dnd-wins-and-where-it-does-not)."]
    costs = [r["lora_to_match"] for _, r in done if r.get("lora_to_match")]
    if any(t.get("zoo_workers") != 1 and t.get("alone_seconds") is None for t in costs):
        lines[-1] += (" The LoRA seconds were timed in zoo rebuilds that may have shared the GPU with other zoo "
                      "stages, so they can overstate a LoRA trained alone.")
    return lines


def update(readme: Path, res: dict) -> bool:
    """Rewrite the block between the markers; False (and nothing written) when the markers are missing."""
    return readme_block.update(readme, BEGIN, END, block(res))


def main(argv=None) -> int:
    return readme_block.main(argv, __doc__.split("\n\n")[0], "benchmarks/results/dnd_cloze.json", block, BEGIN, END,
                             "python benchmarks/dnd_bench.py cloze-report ...")


if __name__ == "__main__":
    sys.exit(main())
