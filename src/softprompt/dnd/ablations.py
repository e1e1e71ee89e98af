"""The cloze study's generator ablations in ``dnd_cloze.json`` and ``dnd.md`` (issue 21, step 4).

* ``statsdnd``: the same generator with DnD's scale code for weight-token statistics instead of ours
  (``stats_code``), scored on the same examples: DnD(dnd code) − DnD(relative code).
* ``nonearest``: a generator that learns neither the held-out dataset nor the training dataset nearest to it in
  condition embedding (the one the main generator's adapters most resemble). If DnD only retrieves the nearest
  training LoRA, it scores as its new nearest; if it generates, it goes beyond that LoRA, towards the left-out one.

Every interval is a 95% paired bootstrap over the evaluated examples (:func:`.intervals.paired_bootstrap`).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .agreement import answer_agreement, soft_kappa
from .intervals import paired_bootstrap, verdict


def per_example(draws: Sequence[Mapping[str, Any]], key: str, n: int) -> list[float]:
    """Mean correctness over draws (a ``dnd`` stage's, or some of them), example by example."""
    return [statistics.mean(r[key][i] for r in draws) for i in range(n)]


def mean_score(draws: Sequence[Mapping[str, Any]], measure: str) -> float:
    """Mean accuracy in percent over draws, rounded as the reports give it."""
    return round(statistics.mean(100 * r[measure] for r in draws), 2)


def token_mean_fields(stage: Mapping[str, Any], per_dnd: Sequence[float], measure: str,
                      key: str) -> dict[str, Any]:
    """DnD against the exact output for an ignored condition (the token-space zoo mean a ``dnd`` stage scores as
    ``zoo_token_mean``, :func:`.hyperconv.grid_mean_state`), paired on the same examples, and that output against
    the A,B zoo mean the older rows use as its stand-in (does the stand-in score as the exact output?); None for
    stages recorded before it was scored."""
    t = stage.get("zoo_token_mean")
    if t is None:
        return {"zoo_token_mean": None, "ci_dnd_minus_zoo_token_mean": None, "ci_zoo_token_mean_minus_zoo_mean": None}
    ab = stage.get("zoo_mean")
    return {"zoo_token_mean": round(100 * t[measure], 2),
            "ci_dnd_minus_zoo_token_mean": paired_bootstrap(list(per_dnd), t[key]),
            "ci_zoo_token_mean_minus_zoo_mean": paired_bootstrap(t[key], ab[key]) if ab else None}


def ablation_fields(stages: Mapping[str, Any], config: str, d: str, base: Mapping[str, Any],
                    cross: Mapping[str, Any], measure: str, key: str,
                    measures: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A dataset row's ablation fields (nothing for a dataset without its main ``dnd`` stage); ``measures`` names
    each dataset's reported measure, for the in-distribution recovery scored on a training dataset."""
    measures = measures or {}
    main = stages.get(f"dnd:{config}:{d}")
    if not main:
        return {}
    n = len(base[key])
    per_main = per_example(main["draws"], key, n)
    out: dict[str, Any] = {}
    stats = stages.get(f"dnd:{config}+statsdnd:{d}")
    if stats:
        out["dnd_mean_stats_dnd"] = mean_score(stats["draws"], measure)
        out["ci_stats_dnd_minus_relative"] = paired_bootstrap(per_example(stats["draws"], key, n), per_main)
        out["stats_dnd_weights"] = _weights_summary(stats.get("weight_cosine"), d)
        rec = stats["recovery"]
        out["stats_dnd_recovery"] = {"dataset": rec["dataset"],
                                     "generated": mean_score(rec["draws"], measures.get(rec["dataset"], measure))}
    far = stages.get(f"dnd:{config}+nonearest:{d}")
    if far:
        train = list(far["similarity"])  # the datasets this generator learned
        per = per_example(far["draws"], key, n)
        per_train = [statistics.mean(cross[s][d][key][i] for s in train) for i in range(n)]
        near = far["nearest"]
        accs = [100 * r[measure] for r in far["draws"]]
        to = (far.get("weight_cosine") or {}).get("to_final_lora", {})
        cos = {s: c for s, c in to.items() if s in train}
        closest = max(cos, key=cos.__getitem__) if cos else None
        out["without_nearest"] = {
            "left_out": main["nearest"], "train_datasets": train, "dnd_mean": round(statistics.mean(accs), 2),
            "dnd_sd": round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0,
            "train_lora_mean": round(statistics.mean(100 * cross[s][d][measure] for s in train), 2),
            "ci_dnd_minus_train_mean": paired_bootstrap(per, per_train),
            "nearest_lora": {"dataset": near, "acc": round(100 * cross[near][d][measure], 2)},
            "ci_dnd_minus_nearest": paired_bootstrap(per, cross[near][d][key]),
            "ci_minus_main_dnd": paired_bootstrap(per, per_main),
            "closest_in_weights": {"dataset": closest, "cosine": cos[closest]} if closest else None,
            # does it still make what the left-out LoRA is, without having seen it? (generation, not retrieval)
            "cosine_with_left_out": to.get(main["nearest"]),
            "cosine_with_zoo_mean": (far.get("weight_cosine") or {}).get("to_zoo_mean"),
            "cosine_with_zoo_token_mean": (far.get("weight_cosine") or {}).get("to_zoo_token_mean"),
            "zoo_mean": round(100 * far["zoo_mean"][measure], 2) if "zoo_mean" in far else None,
            **token_mean_fields(far, per, measure, key),
            # the same question example by example: does it answer like the LoRA it never saw?
            "kappa_with_left_out": round(soft_kappa(per, cross[main["nearest"]][d][key]), 3),
            "answer_agreement": answer_agreement(per, far["zoo_mean"][key], {s: cross[s][d][key] for s in train},
                                                 near) if "zoo_mean" in far else None}
    return out


def closest_in_weights(held_out: str, w: Mapping[str, Any]) -> str:
    """The training LoRA whose update the generated ones resemble most (a stage's ``weight_cosine``; the held-out
    dataset, by full or short name, excluded)."""
    train = {s: c for s, c in w["to_final_lora"].items() if s != held_out and not s.endswith("/" + held_out)}
    return max(train, key=train.__getitem__)


def _weights_summary(w: Mapping[str, Any] | None, held_out: str) -> dict[str, Any] | None:
    """Where a stage's generated updates sit in weight space: the closest training LoRA, the held-out one's own, the
    zoo mean and the agreement between draws (None for a stage recorded without ``weight_cosine``)."""
    if not w:
        return None
    closest = closest_in_weights(held_out, w)
    return {"closest": {"dataset": closest, "cosine": w["to_final_lora"][closest]}, "own": w.get("own"),
            "to_zoo_mean": w.get("to_zoo_mean"), "between_draws": w.get("between_draws")}


def _cos(x: float | None) -> str:
    return "–" if x is None else f"{x:+.2f}"


def _closest_cell(w: Mapping[str, Any] | None) -> str:
    return "–" if not w else f"{w['closest']['cosine']:+.2f} ({w['closest']['dataset'].split('/')[-1]})"


def _recovery_cell(main: Mapping[str, Any] | None, abl: Mapping[str, Any] | None) -> str:
    """``dataset: relative / dnd code`` (each side names its dataset should the two differ)."""
    if not main or not abl:
        return "–"
    a, b = main["dataset"].split("/")[-1], abl["dataset"].split("/")[-1]
    if a == b:
        return f"{a}: {main['generated']:.1f} / {abl['generated']:.1f}"
    return f"{a} {main['generated']:.1f} / {b} {abl['generated']:.1f}"


def render_ablations(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """Markdown lines of the ablations measured so far (none: no lines)."""
    def ci(x: Sequence[float]) -> str:
        return f"{verdict(x)} [{x[0]:+.1f}, {x[1]:+.1f}]"

    lines: list[str] = []
    stats = [(n, r) for n, r in rows if r.get("dnd_mean_stats_dnd") is not None]
    if stats:
        lines += ["", "Stats-code ablation: the same generator with DnD's scale code for the weight tokens' "
                  "statistics (`dnd`) instead of ours (`relative`), scored on the same examples. Weight columns: "
                  "cosine of the generated updates with the closest training LoRA and with the held-out dataset's "
                  "own (– where the stage did not record them); recovery: the adapters generated from a training "
                  "dataset's own prompts, scored there.", "",
                  "| held-out | DnD (relative) | DnD (dnd code) | dnd − relative | closest LoRA, relative | "
                  "closest LoRA, dnd code | own, relative → dnd code | recovery: relative / dnd code |",
                  "|" + "---|" * 8]
        for n, r in stats:
            main, abl = _weights_summary(r.get("weight_cosine"), n), r.get("stats_dnd_weights")
            lines.append(f"| {n} | {r['dnd_mean']:.1f} | {r['dnd_mean_stats_dnd']:.1f} | "
                         f"{ci(r['ci_stats_dnd_minus_relative'])} | {_closest_cell(main)} | {_closest_cell(abl)} | "
                         f"{_cos(main and main['own'])} → {_cos(abl and abl['own'])} | "
                         f"{_recovery_cell(r.get('in_distribution_recovery'), r.get('stats_dnd_recovery'))} |")
    far = [(n, r["without_nearest"]) for n, r in rows if r.get("without_nearest")]
    if far:
        lines += ["", "Without the nearest dataset: a generator that also does not learn the training dataset "
                  "nearest to the held-out one in condition embedding (`left out`). Retrieval would score as its "
                  "new nearest LoRA; generation would go beyond it, towards what the left-out LoRA scores (where "
                  "the two LoRAs score alike, only the weight and answer columns can tell them apart).", "",
                  "| held-out | left out | DnD | its training-LoRA mean | DnD − that mean | its nearest LoRA | "
                  "DnD − nearest | − main DnD | closest in weights | cosine with the left-out LoRA |",
                  "|" + "---|" * 10]
        for n, w in far:
            near, close = w["nearest_lora"], w["closest_in_weights"]
            lines.append(
                f"| {n} | {w['left_out'].split('/')[-1]} | {w['dnd_mean']:.1f} ± {w['dnd_sd']:.1f} | "
                f"{w['train_lora_mean']:.1f} | {ci(w['ci_dnd_minus_train_mean'])} | "
                f"{near['acc']:.1f} ({near['dataset'].split('/')[-1]}) | {ci(w['ci_dnd_minus_nearest'])} | "
                f"{ci(w['ci_minus_main_dnd'])} | "
                + ("–" if close is None else f"{close['cosine']:+.3f} ({close['dataset'].split('/')[-1]})") + " | "
                + ("–" if w.get("cosine_with_left_out") is None else f"{w['cosine_with_left_out']:+.3f}") + " |")
    return lines
