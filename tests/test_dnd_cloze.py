"""DnD cloze scoring (issue 21): exact log-likelihoods, acc_norm per byte, templates, the cloze zoo, WinoGrande split,
bootstrap intervals and the resumable study + report on a tiny random Llama saved as a model folder."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny
from test_dnd_harness import _tok

from softprompt.dnd import cloze as C
from softprompt.dnd.harness import dnd_records
from softprompt.dnd.report import build_results, paired_bootstrap, render
from softprompt.dnd.zoo import _batch, build_zoo, lr_factor

ARC = {"text": "which is the sky", "choices": ["blue", "red green", "sky is blue and green"], "label": 0}
BOOLQ = {"text": "the sky is blue", "text_pair": "is the sky blue", "label": 1}
WG = "commonsense/winogrande"
WINO = {"text": "the sky is _ and green .", "choices": ["blue", "red"], "label": 0}


def test_templates_and_conditions():
    a = C.cloze_example("arc_easy", ARC)
    assert a.contexts == ("Question: which is the sky\nAnswer:",) * 3
    assert a.continuations == (" blue", " red green", " sky is blue and green") and a.gold == 0
    b = C.cloze_example("boolq", BOOLQ)  # format v2: two train32 demonstrations, then lm-eval's zero-shot block
    demos = C.boolq_demos()
    assert b.contexts[0] == demos + "the sky is blue\nQuestion: is the sky blue?\nAnswer:"
    assert demos.startswith("The Princess and the Goblin (film) -- ") and demos.endswith("Answer: yes\n\n")
    assert demos.count("\nAnswer: no\n\n") == 1 and demos.count("\nAnswer: yes\n\n") == 1
    assert b.continuations == (" no", " yes")
    assert b.continuations[b.gold] == " yes"
    w = C.cloze_example("winogrande", WINO)  # partial scoring: the option sits in the context
    assert w.contexts == ("the sky is blue", "the sky is red") and w.continuations == (" and green .",) * 2
    h = C.cloze_example("hellaswag", {"text": "A man [title] runs  fast", "choices": ["away [step] now"], "label": 0})
    assert h.contexts == ("A man. runs fast",) and h.continuations == (" away now",)
    assert C.condition_text("boolq", BOOLQ) == "is the sky blue?\nthe sky is blue"  # question first
    assert C.condition_text("arc_easy", ARC) == "which is the sky\nblue\nred green\nsky is blue and green"


def test_cloze_loglik_equals_full_forward_sum():
    tok, model = _tok(chat=False), tiny("llama").eval()
    items = [C.cloze_example("arc_easy", ARC), C.cloze_example("boolq", BOOLQ), C.cloze_example("winogrande", WINO)]
    pairs = [p for it in items for p in C.encode_cloze(tok, it)]
    got = C.continuation_logliks(model, tok, pairs, batch_size=3)  # mixed lengths share batches: padding exercised
    with torch.no_grad():
        for (ctx, cont), s in zip(pairs, got):
            lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
            hand = sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
            assert s == pytest.approx(hand, abs=1e-4)
    res = C.score_items(model, tok, items, batch_size=2, return_details=True)
    flat = iter(got)
    for it, sc, ok, okn in zip(items, res["scores"], res["correct"], res["correct_norm"]):
        want = [next(flat) for _ in it.continuations]
        assert sc == pytest.approx(want)
        assert ok == int(max(range(len(want)), key=want.__getitem__) == it.gold)
        per_byte = [s / len(c.encode()) for s, c in zip(want, it.continuations)]
        assert okn == int(max(range(len(want)), key=per_byte.__getitem__) == it.gold)
    assert res["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3) and res["n"] == 3


def test_acc_norm_divides_by_bytes(monkeypatch):
    # " ab" (3 bytes) scores -3.0, " abcdefgh" (9 bytes) -4.5: acc picks the first, acc_norm (-1.0 vs -0.5) the second
    monkeypatch.setattr(C, "continuation_logliks", lambda *a, **k: [-3.0, -4.5])
    item = C.Cloze(("q",) * 2, (" ab", " abcdefgh"), 1)
    res = C.score_items(None, _tok(chat=False), [item])
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0 and res["majority"] == 1.0


def test_training_pairs_mask_context():
    tok = _tok(chat=False)
    it = C.cloze_example("arc_easy", ARC)
    (ids, labels), = C.training_pairs(tok, [it], max_length=64)
    ctx, cont = C.encode_cloze(tok, it)[0]
    assert ids == ctx + cont and labels == [-100] * len(ctx) + cont
    (ids, labels), = C.training_pairs(tok, [it], max_length=len(cont) + 2)  # long context: its end is kept
    assert ids == ctx[-2:] + cont and labels[-len(cont):] == cont


def test_lr_factor():
    assert lr_factor(1, 11) == 1.0 and lr_factor(11, 11) == pytest.approx(0.1)
    assert lr_factor(6, 11) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert lr_factor(6, 11, "linear", 0.0) == pytest.approx(0.5) and lr_factor(6, 11, "constant") == 1.0


def test_zoo_batch_keeps_only_the_answer_logits_and_the_same_loss():
    """The zoo's batch asks for the logits of the answer positions only (the end of every left-padded row): the loss
    and every weight's gradient equal those of the full-logits forward (float64: rounding is all that may differ)."""
    model = tiny("llama").double()
    examples = [([5, 6, 7, 8, 9, 10, 11], [-100] * 5 + [10, 11]), ([3, 4, 12], [-100, 4, 12]),
                ([20, 21, 22, 23, 24], [-100] * 4 + [24])]
    batch = _batch(examples, pad=0, device="cpu")
    assert batch["logits_to_keep"] == 3 and batch["labels"].tolist() == [[-100, 10, 11], [-100, 4, 12],
                                                                         [-100, -100, 24]]
    full = {**batch, "labels": torch.tensor([[-100] * 5 + [10, 11], [-100] * 5 + [4, 12], [-100] * 6 + [24]])}
    del full["logits_to_keep"]
    losses, grads = [], []
    for inputs in (batch, full):
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters()]))
    assert out.logits.shape[1] == 7 and model(**batch).logits.shape[1] == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-14)


def test_cloze_zoo_decaying_lr_spaced_checkpoints(tmp_path):
    tok, model = _tok(chat=False), tiny("llama")
    m = build_zoo("tiny", ["arc_easy", "winogrande"], rank=2, warmup_steps=2, checkpoints=3, checkpoint_every=2,
                  out=tmp_path / "zoo", lr=1e-2, batch_size=4, max_length=64, train_limit=8, dev_limit=3,
                  device="cpu", model=model, tokenizer=tok, progress=False)
    assert m["format"] == "cloze" and len(m["checkpoints"]) == 6
    for d in ("commonsense/arc_easy", "commonsense/winogrande"):
        cks = [c for c in m["checkpoints"] if c["dataset"] == d]
        assert [c["step"] for c in cks] == [4, 6, 8]
        assert [c["lr"] for c in cks] == pytest.approx([1e-2 * lr_factor(s, 8) for s in (4, 6, 8)])
        assert all(c["n"] == 3 and c["acc"] in (0, 1 / 3, 2 / 3, 1) for c in cks)


def test_winogrande_resplit_keeps_twins_together():
    parts = {p: dnd_records("winogrande", p) for p in ("zoo", "dev", "test")}
    assert [len(parts[p]) for p in ("zoo", "dev", "test")] == [685, 63, 519]
    groups = {p: {str(r["idx"]).rsplit("-", 1)[0] for r in v} for p, v in parts.items()}
    assert not (groups["zoo"] & groups["test"]) and not (groups["dev"] & groups["test"])
    assert sum(len(v) for v in parts.values()) == 1267


def test_diagnosis_says_where_dnd_wins_and_why_not():
    from softprompt.dnd.diagnosis import diagnosis

    def row(train, own_base, nearest, cos=None, rec=None, valid=True):
        return {"ci_dnd_minus_train_mean": train, "ci_own_minus_base": own_base, "ci_dnd_minus_nearest": nearest,
                "weight_cosine": cos, "in_distribution_recovery": rec, "valid_target": valid}

    cos = {"own": 0.1, "to_final_lora": {"x/a": 0.9, "x/b": 0.2, "x/c": 0.05}}
    rows = [("a", row([2.0, 5.0], [10.0, 20.0], [1.0, 3.0], rec={"dataset": "x/b", "generated": 50.0,
                                                                   "own_lora": 51.5})),
            ("b", row([-1.0, 2.0], [-2.0, 3.0], [-1.0, 1.0], cos={**cos, "own": 0.95})),
            ("c", row([-0.5, 1.0], [1.0, 4.0], [-2.0, 0.5], cos=cos)),
            ("d", row([9.0, 9.5], [1.0, 2.0], [5.0, 6.0], valid=False))]  # not a valid target: left out
    out = diagnosis(rows)
    assert out[0] == ("- **Wins.** DnD is above the training-LoRA mean on 1 of 3 valid held-out targets (a); not "
                      "above it on b [-1.0, +2.0], c [-0.5, +1.0].")
    assert out[1].startswith("- **Headroom.** On b the held-out dataset's own LoRA is not above the base either")
    assert "on 2 of 3 (b, c) and above it on 1 (a)." in out[2]
    # b's updates are closest to its own LoRA (0.95 > 0.9 with a's); c's to a's
    assert out[3].endswith("own on 1 of 2 (c: +0.90 with a's against +0.10 with its own).")
    assert out[4].startswith("- **Capacity.** Fed a training dataset's own prompts, each generator's adapters score "
                             "within 1.5 points of that dataset's LoRA (a's generator on b: 50.0 vs 51.5)")
    assert diagnosis([("d", rows[3][1])]) == []
    near, best = {"dataset": "x/a", "acc": 40.0}, {"dataset": "x/b", "acc": 42.5}
    picked = diagnosis([("e", {**rows[0][1], "nearest_lora": near, "train_lora_best": near}),
                        ("f", {**rows[0][1], "nearest_lora": near, "train_lora_best": best})])
    line = next(x for x in picked if x.startswith("- **Conditioning.**"))
    assert "best-scoring training LoRA on 1 of 2 (e); elsewhere it scores below the best (f: a's 40.0 against " \
           "b's 42.5)." in line


def test_cost_seconds_come_from_the_latest_zoo_rebuild_and_say_when_the_gpu_was_shared():
    from softprompt.dnd.report import _cost_note, _to_match

    t = {"measure": "acc_norm", "step": 100, "train_seconds": 26.0, "target": 0.3, "base": 0.29, "own_lora": 0.35,
         "scored": [{"step": 100, "acc_norm": 0.31}]}
    old_zoo = {"curve": [{"step": 100, "train_seconds": 26.0}], "profile": {}}
    rebuilt = {"curve": [{"step": 100, "train_seconds": 13.0}],
               "rebuilds": [{"profile": {"zoo_workers": 3}}, {"profile": {"zoo_workers": 1}}]}
    assert _to_match(t, old_zoo)["train_seconds"] == 26.0 and _to_match(t, old_zoo)["zoo_workers"] is None
    assert _to_match(t, rebuilt)["train_seconds"] == 13.0 and _to_match(t, rebuilt)["zoo_workers"] == 1
    assert _to_match({**t, "step": 0, "train_seconds": 0.0}, rebuilt)["train_seconds"] == 0.0

    def rows(*workers):
        return [(f"d{i}", {"lora_to_match": {"zoo_workers": w}}) for i, w in enumerate(workers)]

    assert _cost_note(rows(1, 1)) == "" and _cost_note([("d", {"lora_to_match": None})]) == ""
    assert "(`--zoo-workers`; up to 3 at once)" in _cost_note(rows(1, 3))
    assert "(`--zoo-workers`; up to 2 at once; not recorded for some rows)" in _cost_note(rows(2, None))
    assert "how many at once was not recorded" in _cost_note(rows(None))


def test_cost_rows_use_the_lone_zoo_step_when_timed():
    from softprompt.dnd.report import _cost_cell, _cost_note

    t = {"step": 100, "train_seconds": 26.0, "zoo_workers": 3, "own_lora": 34.8, "target": 32.5}
    lone = {"device": "GPU X", "date": "2026-12-06T10:00:00", "command": "zoo-alone ...", "steps_timed": 20,
            "skip": 3}
    shared = {"generate_seconds": 0.13, "lora_to_match": t}
    alone = {"generate_seconds": 0.13, "lora_to_match": {**t, "alone_seconds": 13.0}}
    assert _cost_cell(shared) == "step 100, 26.0 s | 200x"
    assert _cost_cell(alone) == "step 100, ≈13.0 s alone (26.0 s in the zoo rebuild) | 100x"
    missed = {**alone["lora_to_match"], "step": None, "final_step": 250, "final_train_seconds": 60.0,
              "alone_seconds": 30.0}
    assert "(step 250, 60.0 s, ≈30.0 s alone) scores 34.8 < 32.5" in _cost_cell({**alone, "lora_to_match": missed})
    note = _cost_note([("a", alone)], lone)
    assert "(20 steps after 3 warm-up steps; GPU X, 2026-12-06: `zoo-alone ...`); the ratio uses it." in note
    # a row without the lone figure keeps the caveat
    assert "can overstate a LoRA trained alone" in _cost_note([("a", alone), ("b", shared)], lone)


def test_paired_bootstrap():
    assert paired_bootstrap([1, 0, 1], [1, 0, 1]) == [0.0, 0.0]
    assert paired_bootstrap([1] * 5, [0] * 5) == [100.0, 100.0]
    a, b = [1] * 60 + [0] * 40, [1] * 50 + [0] * 50  # a beats b on exactly 10 examples, never loses
    lo, hi = paired_bootstrap(a, b)
    assert 0 < lo < 10 < hi < 20
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap([1], [1, 0])


def test_study_resumes_and_reports(tmp_path, tiny_bert_dir):
    from softprompt.dnd.study import Study

    folder = tmp_path / "tiny-llama"
    tiny("llama").save_pretrained(folder)
    _tok(chat=False).save_pretrained(folder)
    kw = {"datasets": ["commonsense/arc_easy", "commonsense/winogrande"], "configs": ["r2,lr1e-2,steps3,ckpt2,bs4"],
          "n_eval": 6, "n_dev": 4, "batch_size": 8, "device": "cpu", "log": lambda m: None, "generators": True,
          "encoder": tiny_bert_dir, "gen": {"steps": 4, "batch_size": 2, "width": 4, "n_layers": 2, "kernel": 3,
                                            "chunk": 16, "n_prompts": 4, "max_length": 16, "warmup": 1, "draws": 1,
                                            "recovery_draws": 1, "pool": 20, "min_pool": 8},
          "stats_ablation": True}
    study = Study(tmp_path / "state", str(folder), **kw)
    assert study.run(time_budget=0) == "stopped before base"  # nothing fits in no time
    assert study.run() == "complete"
    stages = json.loads(study.export(tmp_path / "out").read_text())
    assert list(stages) == study.stages() and len(stages) == 12 and study.stages()[3].startswith("cross")
    cfg = "r2_lr1e-2_steps3_ckpt2_bs4"
    z = stages[f"zoo:{cfg}:commonsense/arc_easy"]
    assert z["final"]["step"] == 3 and len(z["losses"]) == 2 and z["test"]["n"] == 6
    assert [c["step"] for c in z["curve"]] == [3] and z["curve"][0]["path"] == z["final"]["path"]  # no warm-up step
    ltm = stages[f"dnd:{cfg}:commonsense/arc_easy"]["lora_to_match"]  # saved at this size: only the final one
    assert ltm["measure"] == "acc_norm" and ltm["scored"] == [] and ltm["step"] in (0, 3, None)
    res = build_results(stages, cfg, device="cpu", versions={"torch": torch.__version__}, date="d", command="c",
                        datasets=["commonsense/arc_easy", "commonsense/winogrande"])
    row = res["datasets"]["commonsense/arc_easy"]
    assert row["own_lora"] == round(100 * z["test"]["acc_norm"], 2) and row["n"] == 6 and row["chance"] == 25.0
    assert res["datasets"][WG]["chance"] == 50.0
    other = stages[f"cross:{cfg}"]["lora_on"]["commonsense/winogrande"]["commonsense/arc_easy"]["acc_norm"]
    assert row["train_lora_mean"] == round(100 * other, 2) and row["train_lora_best"]["dataset"] == WG
    dnd = stages[f"dnd:{cfg}:commonsense/arc_easy"]
    assert len(dnd["draws"]) == 2 and {d["weights"] for d in dnd["draws"]} == {"generator_step000002.safetensors",
                                                                              "generator.safetensors"}
    accs = [100 * d["acc_norm"] for d in dnd["draws"]]
    assert row["dnd_mean"] == round(sum(accs) / 2, 2) and row["dnd_draws"] == 2
    assert dnd["nearest"] == "commonsense/winogrande" and row["nearest_lora"]["dataset"] == "commonsense/winogrande"
    lo, hi = row["ci_dnd_minus_base"]
    assert lo <= row["dnd_mean"] - row["base"] + 1e-6 and row["dnd_mean"] - row["base"] <= hi + 1e-6
    lo, hi = row["ci_dnd_minus_nearest"]  # against the nearest training LoRA, paired on the same examples
    near = row["dnd_mean"] - row["nearest_lora"]["acc"]
    assert lo <= near + 1e-6 and near <= hi + 1e-6
    assert row["zoo_mean"] == round(100 * dnd["zoo_mean"]["acc_norm"], 2)
    w = dnd["weight_cosine"]  # generated adapters against each dataset's final zoo LoRA, in weight space
    assert set(w["to_final_lora"]) == {"commonsense/arc_easy", WG} and w["own"] == w["to_final_lora"][
        "commonsense/arc_easy"] and all(-1 <= c <= 1 for c in w["to_final_lora"].values())
    assert -1 <= w["between_draws"] <= 1 and row["weight_cosine"] == w
    rec = row["in_distribution_recovery"]
    assert rec["dataset"] == WG and rec["own_lora"] == res["datasets"][WG]["own_lora"]
    assert rec["measure"] == "acc" and row["measure"] == "acc_norm"  # recovery in its own dataset's measure
    assert res["zoo_gate"]["n_datasets"] == 2
    assert row["training_data"] == {"datasets": 1, "checkpoints_per_dataset": 2}  # winogrande's 2 kept steps
    budget, key = row["budget"], "correct_norm"  # halfway (step 2 of 4) against the final generator
    mid = [d for d in dnd["draws"] if d["weights"] == "generator_step000002.safetensors"]
    fin = [d for d in dnd["draws"] if d["weights"] == "generator.safetensors"]
    assert (budget["mid_step"], budget["final_step"]) == (2, dnd["config"]["steps"]) == (2, 4)
    assert len(mid) == len(fin) == 1
    assert budget["mid"] == round(100 * mid[0]["acc_norm"], 2) and budget["final"] == round(100 * fin[0]["acc_norm"], 2)
    assert budget["ci_final_minus_mid"] == paired_bootstrap(fin[0][key], mid[0][key])
    abl = stages[f"dnd:{cfg}+statsdnd:commonsense/arc_easy"]["draws"]
    assert row["dnd_mean_stats_dnd"] == round(sum(100 * d["acc_norm"] for d in abl) / 2, 2)
    assert len(row["ci_stats_dnd_minus_relative"]) == 2
    stats = stages[f"dnd:{cfg}+statsdnd:commonsense/arc_easy"]  # where its updates sit, what it recovers
    sw = stats["weight_cosine"]
    assert row["stats_dnd_weights"] == {"closest": {"dataset": WG, "cosine": sw["to_final_lora"][WG]},
                                        "own": sw["own"], "to_zoo_mean": sw["to_zoo_mean"],
                                        "between_draws": sw["between_draws"]}
    assert row["stats_dnd_recovery"] == {"dataset": WG, "generated": round(
        sum(100 * d["acc"] for d in stats["recovery"]["draws"]) / len(stats["recovery"]["draws"]), 2)}  # WG: acc
    layouts = [json.loads((tmp_path / "state" / f"gen_{cfg}{t}" / "commonsense__arc_easy" / "generator_config.json")
                          .read_text())["layout"]["stats_code"] for t in ("", "+statsdnd")]
    assert layouts == ["relative", "dnd"]
    text = render(res)
    assert "| arc_easy | 6 | 25.0 |" in text and "training-LoRA mean (interval above 0) on" in text
    assert (f" | {w['to_final_lora'][WG]:+.2f} (winogrande) | {sw['to_final_lora'][WG]:+.2f} (winogrande) | "
            f"{w['own']:+.2f} → {sw['own']:+.2f} | winogrande: {rec['generated']:.1f} / "
            f"{row['stats_dnd_recovery']['generated']:.1f} |") in text
    cost_row = row["lora_to_match"]
    assert cost_row["target"] == round(100 * ltm["target"], 2) and cost_row["step"] == ltm["step"]
    assert f"| arc_easy | {w['own']:+.3f} | {w['to_final_lora'][WG]:+.3f} (winogrande) |" in text
    cost = text.split("| held-out | generate s | own LoRA to match DnD | LoRA s / generate s |")[1]
    assert f"| arc_easy | {row['generate_seconds']:.3f} | " in cost
    alone = {"config": cfg, "device": "cpu", "steps_timed": 20, "skip": 3,
             "datasets": {"commonsense/arc_easy": {"step_seconds": 0.5}}}
    lone = build_results(stages, cfg, device="cpu", versions={}, date="d", command="c", alone=alone,
                         datasets=["commonsense/arc_easy", "commonsense/winogrande"])
    t = lone["datasets"]["commonsense/arc_easy"]["lora_to_match"]
    step = ltm["step"] if ltm["step"] is not None else ltm["final_step"]
    assert t["alone_seconds"] == round(step * 0.5, 2) and lone["zoo_alone"]["steps_timed"] == 20
    assert res["zoo_alone"] is None and "alone_seconds" not in cost_row
    fresh = Study(tmp_path / "state2", str(folder), **kw)
    kept = fresh.restore(tmp_path / "out" / "dnd_cloze_stages.json")  # every result; the zoo weights are absent
    assert kept == study.stages()
    assert [s for s in fresh.stages() if not fresh.done(s)] == [s for s in study.stages() if s.startswith("zoo:")]
    assert math.isclose(fresh.result("base")["datasets"]["commonsense/winogrande"]["test"]["acc"],
                        stages["base"]["datasets"]["commonsense/winogrande"]["test"]["acc"])
    cross = fresh.path(f"cross:{cfg}").read_text()
    assert fresh.run() == "complete"  # rebuilds the zoo weights; same losses, so the recorded scores stay
    for d in ("commonsense/arc_easy", WG):
        r = fresh.result(f"zoo:{cfg}:{d}")
        assert r["rebuilds"][0]["loss_max_rel_diff"] == 0.0 and r["test"] == stages[f"zoo:{cfg}:{d}"]["test"]
        assert [c["step"] for c in r["curve"]] == [3]  # this machine's seconds, even when the scores are kept
    assert fresh.path(f"cross:{cfg}").read_text() == cross
    other = Study(tmp_path / "state3", str(folder), **kw)  # a record the rebuild does not reproduce
    data = json.loads((tmp_path / "out" / "dnd_cloze_stages.json").read_text())
    data[f"zoo:{cfg}:{WG}"]["losses"][0] *= 1.5
    (tmp_path / "tampered.json").write_text(json.dumps(data))
    other.restore(tmp_path / "tampered.json")
    restored = json.loads(other.path(f"cross:{cfg}").read_text())
    other.path(f"cross:{cfg}").write_text(json.dumps({**restored, "restored_marker": True}) + "\n")
    assert other.run() == "complete"
    r = other.result(f"zoo:{cfg}:{WG}")
    assert "rebuilds" not in r and r["losses"] == stages[f"zoo:{cfg}:{WG}"]["losses"]  # scored anew
    assert "rebuilds" in other.result(f"zoo:{cfg}:commonsense/arc_easy")
    # Dropped by the mismatch and measured again (its scores may well be equal, so look for the restored record's
    # marker rather than comparing texts, whose only difference could be the timing field).
    assert "restored_marker" not in json.loads(other.path(f"cross:{cfg}").read_text())


def test_lora_to_match_bisects_the_saved_steps():
    """Cost to match DnD: 0 when the base already scores the target, None past the final LoRA, else the first saved
    step at or above the target found by bisection (scoring at most ceil(log2(len)) steps; the final one is known)."""
    from types import SimpleNamespace

    from softprompt.dnd.study_gen import lora_to_match

    steps = [10, 25, 50, 100, 150, 200, 250]
    acc = dict(zip(steps, [0.30, 0.32, 0.36, 0.41, 0.44, 0.46, 0.47]))
    curve = [{"step": s, "path": f"d/step_{s}", "train_seconds": s / 10} for s in steps]
    results = {"zoo:c:commonsense/piqa": {"curve": curve, "test": {"acc_norm": 0.47}},
               "base": {"datasets": {"commonsense/piqa": {"test": {"acc_norm": 0.28}}}}}
    scored = []

    def score(pm, tok, dataset):
        scored.append(pm)
        return {"acc_norm": acc[pm]}

    study = SimpleNamespace(result=results.__getitem__, zoo_dir=lambda cfg, d: Path("/zoo"),
                            _load=lambda path: (int(Path(path).name.split("_")[1]), None), _score=score)
    cfg = {"name": "c"}

    def run(target):
        scored.clear()
        return lora_to_match(study, cfg, "commonsense/piqa", [{"acc_norm": target - 0.01}, {"acc_norm": target + 0.01}])

    r = run(0.40)
    assert (r["step"], r["train_seconds"], r["measure"]) == (100, 10.0, "acc_norm") and len(scored) <= 3
    assert scored == [50, 150, 100] and [x["step"] for x in r["scored"]] == scored
    assert run(0.465)["step"] == 250 and run(0.30)["step"] == 10
    r = run(0.25)  # the base model reaches it
    assert (r["step"], r["train_seconds"]) == (0, 0.0) and scored == []
    none = run(0.50)
    assert none["step"] is None and none["final_step"] == 250 and none["final_train_seconds"] == 25.0
    results["zoo:c:commonsense/piqa"] = {"test": {"acc_norm": 0.47}}  # recorded before curves existed
    assert run(0.40) is None
