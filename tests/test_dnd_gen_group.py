"""Leave-one-out generators trained side by side (``gen_train.train_group``): each equals the same generator trained
alone, resumes from its own state under any grouping, and the study only starts what can finish in the session."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file
from test_dnd_generator import KW, zoo  # noqa: F401  (zoo: the module fixture)
from torch._inductor import config as inductor_config

from softprompt.dnd.condition import ConditionEncoder, prompts_by_dataset
from softprompt.dnd.export import read_zoo
from softprompt.dnd.gen_train import train_group
from softprompt.dnd.generator import train_generator

OPTS = {"steps": 6, **{k: KW[k] for k in ("n_prompts", "max_length", "batch_size", "width", "n_layers", "kernel",
                                          "chunk", "lr", "warmup")}}
HELD = ["pos", "neg"]


def _weights(d):
    return load_file(str(d / "generator.safetensors"))


def _same(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _group(zoo, enc, outs, held=HELD, **kw):  # noqa: F811
    pools = prompts_by_dataset(zoo, ["pos", "neg"])
    return train_group(read_zoo(zoo), held, outs, pools.__getitem__, enc, opts=OPTS, keep_steps=(3,), **kw)


def test_group_equals_solo_and_resumes_under_any_grouping(zoo, tiny_bert_dir, tmp_path):  # noqa: F811
    solo = {h: train_generator(zoo, h, tmp_path / "solo" / h, steps=6, prompts=zoo, encoder=tiny_bert_dir,
                               keep_steps=(3,), **KW) for h in HELD}
    enc = ConditionEncoder(tiny_bert_dir, max_length=OPTS["max_length"])
    both = _group(zoo, enc, [tmp_path / "g" / h for h in HELD])
    for h, r in zip(HELD, both):
        assert r["complete"] and r["losses"] == solo[h]["losses"] and _same(tmp_path / "g" / h, tmp_path / "solo" / h)
        assert r["share_seconds"] == pytest.approx(r["seconds"] / 2)  # two runs in every round
        # the rate past the call's warm-up rounds (3 of the 6) is what the planner reads
        assert r["steady_steps"] == 3 and 0 < r["steady_share_seconds"] < r["share_seconds"]
        cfg = json.loads((tmp_path / "g" / h / "generator_config.json").read_text())
        assert cfg["holdout"] == [h] and cfg["train_datasets"] == [d for d in HELD if d != h]
    assert solo["pos"]["losses"] != solo["neg"]["losses"]  # they did learn different zoos
    # 2 rounds side by side, then 'neg' alone for 1 step, then both to the end (a fresh encoder each call)
    outs = [tmp_path / "s" / h for h in HELD]
    part = _group(zoo, ConditionEncoder(tiny_bert_dir, max_length=OPTS["max_length"]), outs, stop_after=2)
    assert [r["step"] for r in part] == [2, 2] and not any(r["complete"] for r in part)
    prog = json.loads((outs[0] / "train_progress.json").read_text())
    assert prog["step"] == 2 and prog["steps"] == 6 and prog["share"] > 0
    assert prog["steady_steps"] == 0 and prog["steady_share"] == 0  # two rounds: still warming up
    one = _group(zoo, ConditionEncoder(tiny_bert_dir, max_length=OPTS["max_length"]), outs[1:], held=["neg"],
                 stop_after=1)
    assert one[0]["step"] == 3 and (outs[1] / "generator_step000003.safetensors").exists()
    done = _group(zoo, enc, outs)
    for h, r in zip(HELD, done):
        assert r["complete"] and r["losses"] == solo[h]["losses"] and _same(tmp_path / "s" / h, tmp_path / "solo" / h)
        assert not (tmp_path / "s" / h / "train_state.pt").exists()
        assert not (tmp_path / "s" / h / "train_progress.json").exists()
    kept = [load_file(str(d / "generator_step000003.safetensors")) for d in (outs[1], tmp_path / "solo" / "neg")]
    assert all(torch.equal(kept[0][k], kept[1][k]) for k in kept[0])
    t = _group(zoo, enc, [tmp_path / "t" / h for h in HELD], max_seconds=0)  # no time: nothing trains
    assert [r["step"] for r in t] == [0, 0]


def test_encoder_warm_is_order_independent(tiny_bert_dir):
    pools = {"a": ["the movie was good", "a bad film", "not a fine movie"], "b": ["the film was awful", "a good"]}
    one = ConditionEncoder(tiny_bert_dir, max_length=8)
    one.encode(["a bad film"])  # cached first from another batch
    assert one.warm(pools, batch_size=2) == 5  # both chunks of 'a' hold a missing prompt: re-encoded whole
    two = ConditionEncoder(tiny_bert_dir, max_length=8)
    two.warm({"b": pools["b"]}, batch_size=2)
    two.warm({"a": pools["a"]}, batch_size=2)
    assert two.warm(pools, batch_size=2) == 0
    for p in pools["a"] + pools["b"]:
        assert torch.equal(one.encode([p])[0], two.encode([p])[0])


def _fake_study(tmp_path, mark=True, **kw):
    from softprompt.dnd.study import Study

    ds = ["commonsense/arc_easy", "commonsense/piqa", "commonsense/winogrande"]
    st = Study(tmp_path / "state", "unused", ds, configs=["r2,lr1e-2,steps3,ckpt2"], generators=True,
               log=lambda m: None, gen={"steps": 100}, **kw)
    for s in st.stages() if mark else ():
        if s.startswith(("base", "zoo:", "cross:")):
            st.path(s).write_text(json.dumps({"seconds": 1.0, "formats": st.formats(s),
                                              "final": {"path": "step_000003"}}) + "\n")
            if s.startswith("zoo:"):  # its weights are here too
                (st.zoo_dir(st.configs[0], s.split(":")[2]) / "step_000003").mkdir(parents=True)
    return st


def test_session_plan_starts_only_what_can_finish(tmp_path):
    from softprompt.dnd.study_gen import GEN_DEFAULTS, gen_step_seconds

    st = _fake_study(tmp_path, gen_group=3, session_left=450.0, gen_step_seconds=1.0)
    first = next(s for s in st.stages() if s.startswith("gen:"))
    # (100 steps x 1 s + 120 s per dnd stage (prior)) x 1.1 + 60 s per call: 1 generator fits in 450 s, 2 do not
    assert st.gen_plan(first, t0=time.time()) == ["commonsense/arc_easy"]
    st.session_left = 5000.0
    assert st.gen_plan(first, t0=time.time()) == ["commonsense/arc_easy", "commonsense/piqa",
                                                                 "commonsense/winogrande"]
    st.session_left = 100.0
    assert st.gen_plan(first, t0=time.time()) == []
    assert st.run(time_budget=1000) == f"stopped before {first} (session)"
    # a half-trained generator needs only its remaining steps; a measured step time replaces the prior
    cfg = st.configs[0]
    d = st.gen_dir(cfg, "commonsense/arc_easy")
    d.mkdir(parents=True)
    (d / "train_progress.json").write_text(json.dumps({"step": 90, "steps": 100, "wall": 9.0, "share": 9.0}))
    assert gen_step_seconds(st, 1.0) == pytest.approx(0.1)
    st.gen_compile = True  # eager steps say nothing of compiled ones (and back): the prior until measured
    assert gen_step_seconds(st, 1.0) == 1.0
    (d / "train_progress.json").write_text(json.dumps({"step": 90, "steps": 100, "wall": 9.0, "share": 4.5,
                                                       "compiled": True}))
    assert gen_step_seconds(st, 1.0) == pytest.approx(0.05)
    st.gen_compile = False
    assert gen_step_seconds(st, 1.0) == 1.0
    # past the warm-up the steady rate wins: the first rounds of each call compile, which the planner counts per call
    (d / "train_progress.json").write_text(json.dumps({"step": 90, "steps": 100, "wall": 30.0, "share": 30.0,
                                                       "steady_share": 8.7, "steady_steps": 87}))
    assert gen_step_seconds(st, 1.0) == pytest.approx(0.1)
    (d / "train_progress.json").write_text(json.dumps({"step": 20, "steps": 100, "wall": 30.0, "share": 30.0,
                                                       "steady_share": 1.7, "steady_steps": 17}))
    assert gen_step_seconds(st, 1.0) == pytest.approx(1.5)  # too few steady steps: the whole rate
    fin, opts = st.path(first), {**GEN_DEFAULTS, **st.gen}  # a finished stage: its steady rate where recorded,
    fin.write_text(json.dumps({"share_seconds": 40.0, "steady_seconds_per_step": 0.2, "config": opts,  # else its
                               "formats": st.formats(first)}) + "\n")  # whole share
    (d / "train_progress.json").unlink()
    assert st.done(first) and gen_step_seconds(st, 1.0) == pytest.approx(0.2)
    fin.write_text(json.dumps({"share_seconds": 40.0, "config": opts, "formats": st.formats(first)}) + "\n")
    assert gen_step_seconds(st, 1.0) == pytest.approx(0.4)
    fin.unlink()
    (d / "train_progress.json").write_text(json.dumps({"step": 90, "steps": 100, "wall": 9.0, "share": 9.0}))
    st.session_left = 350.0  # at the prior's 1 s per step only the first would fit
    assert st.gen_plan(first, t0=time.time()) == ["commonsense/arc_easy", "commonsense/piqa"]
    st.session_left, st.gen_group = None, 2  # no session limit: the next two pending generators
    assert st.gen_plan(first, t0=0.0) == ["commonsense/arc_easy", "commonsense/piqa"]


def test_stale_formats_and_generator_options_are_redone(tmp_path, monkeypatch):
    from softprompt.dnd import cloze
    from softprompt.dnd.study_gen import _options

    st = _fake_study(tmp_path)
    for s in st.stages():
        if s.startswith(("gen:", "dnd:")):
            st.path(s).write_text(json.dumps({"seconds": 1.0, "formats": st.formats(s),
                                              "config": _options(st, "")}) + "\n")
    assert all(st.done(s) for s in st.stages())
    out = st.export(tmp_path / "out")
    zoo_a = "zoo:r2_lr1e-2_steps3_ckpt2:commonsense/arc_easy"
    st.path(zoo_a).write_text(json.dumps({"seconds": 1.0, "final": {"path": "step_000003"}}) + "\n")  # no formats
    assert st.done(zoo_a)  # ... read as v1, which arc_easy still is
    monkeypatch.setitem(cloze.FORMAT_VERSIONS, "commonsense/piqa", 2)
    pending = [s for s in st.stages() if not st.done(s)]
    assert pending == [s for s in st.stages() if not s.startswith("zoo:") or s.endswith("piqa")]
    assert "base" not in json.loads(st.export(tmp_path / "out2").read_text())  # stale results are not exported
    fresh = _fake_study(tmp_path / "b", mark=False)  # a new state restoring the export made before the change
    # base, cross, gen and dnd all depend on piqa's format: only the other zoo records come back (to be rebuilt)
    assert fresh.restore(out) == [s for s in st.stages() if s.startswith("zoo:") and not s.endswith("piqa")]
    monkeypatch.setitem(cloze.FORMAT_VERSIONS, "commonsense/piqa", 1)
    assert all(st.done(s) for s in st.stages())
    gen = next(s for s in st.stages() if s.startswith("gen:"))
    st.gen = {"steps": 100, "draws": 3}  # draws: only the dnd stages are stale
    assert st.done(gen) and not st.done(gen.replace("gen:", "dnd:", 1))
    st.gen = {"steps": 100, "lr": 5e-4}  # a training option: the generator is stale too
    assert not st.done(gen)


def _count_compiles(monkeypatch) -> list:
    from softprompt.dnd.hyperconv import HyperConvDecoder

    calls, original = [], HyperConvDecoder.compile

    def counted(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HyperConvDecoder, "compile", counted)
    return calls


# mix_order_on: Inductor's mix-order reduction broke this decoder's compiled backward on an H100
# (softprompt/inductor.py); it starts on, so that the callers show they turn it off before compiling.
@pytest.mark.usefixtures("mix_order_on")
def test_compiled_generators_learn_what_eager_ones_learn(zoo, tiny_bert_dir, tmp_path, monkeypatch):  # noqa: F811
    """``compile=True`` (torch.compile of each decoder) trains the same generators up to rounding, says so in its
    config, and keeps state_dict keys, so a compiled run resumes from an eager run's state and vice versa."""
    compiled = _count_compiles(monkeypatch)
    enc = ConditionEncoder(tiny_bert_dir, max_length=OPTS["max_length"])
    eager = _group(zoo, enc, [tmp_path / "e" / h for h in HELD])
    outs = [tmp_path / "c" / h for h in HELD]
    part = _group(zoo, enc, outs, stop_after=3)
    assert compiled == [] and inductor_config.triton.mix_order_reduction is True  # eager runs leave it alone
    done = _group(zoo, enc, outs, compile=True)
    assert len(compiled) == 2  # each run's decoder, once
    assert inductor_config.triton.mix_order_reduction is False
    for h, a, b in zip(HELD, eager, done):
        assert b["complete"] and b["losses"][:3] == a["losses"][:3]
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-4)
        wa, wb = _weights(tmp_path / "e" / h), _weights(tmp_path / "c" / h)
        diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
        # Adam moves a weight by about lr per step whatever the gradient's size, so where a gradient is ~0 rounding
        # can flip its updates: those few weights differ by at most 2·lr per compiled step, the rest by rounding.
        assert wa.keys() == wb.keys() and diff.max() <= 2 * OPTS["lr"] * 3 and (diff < 1e-5).float().mean() > 0.999
        assert json.loads((tmp_path / "c" / h / "generator_config.json").read_text())["compiled"] is True
    assert [r["step"] for r in part] == [3, 3]
    assert json.loads((tmp_path / "e" / "pos" / "generator_config.json").read_text())["compiled"] is False


@pytest.mark.usefixtures("mix_order_on")
def test_gen_bench_command(tmp_path, capsys, monkeypatch):
    from test_dnd_bench import _load_bench

    compiled = _count_compiles(monkeypatch)

    shape = "n_prompts=2,max_length=4,hidden=8,width=2,n_layers=2,kernel=3,batch_size=2,cache_prompts=8"
    assert _load_bench().main(["gen-bench", "--shape", shape, "--steps", "1", "--groups", "1,2", "--device", "cpu",
                               "--cudnn", "off,on", "--compile", "off,on", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "dnd_gen_bench.json").read_text())
    assert [(r["compile"], r["cudnn_benchmark"]) for r in res["runs"]] == [(False, False), (False, True),
                                                                            (True, False), (True, True)]
    assert "command" in res and all(row["compile"] for row in res["runs"][2]["rows"])
    assert len(compiled) == 2 * (1 + 2)  # the compiled runs (cuDNN off, on) built K = 1 and K = 2 decoders
    assert inductor_config.triton.mix_order_reduction is False
    assert all(row["warmup_seconds"] >= 0 for run in res["runs"] for row in run["rows"])
    rows = res["runs"][0]["rows"]
    assert [r["group"] for r in rows] == [1, 2] and not any(r["streams"] for r in rows)  # no CUDA streams on CPU
    # Both are rounded to 4 decimals on their own, so they agree to 1e-4 (a relative tolerance failed when the round
    # took 0.0963 s: 0.0481 against 0.04815).
    assert rows[1]["generator_step_seconds"] == pytest.approx(rows[1]["round_seconds"] / 2, abs=1e-4)
    out = capsys.readouterr().out
    assert res["runs"][0]["step_tflop"] > 0 and "BEST: K=" in out and "COMPILE: " in out


def test_gen_bench_keeps_the_eager_rows_when_compiling_fails(tmp_path, capsys, monkeypatch):
    """On an H100 (torch 2.11) the compiled generator's backward raised; the bench then reports the eager rows,
    records the failure and prints a COMPILE line saying so, instead of losing the call's numbers."""
    from test_dnd_bench import _load_bench

    from softprompt.dnd.hyperconv import HyperConvDecoder

    def broken(self, *args, **kwargs):
        raise RuntimeError("Function CompiledFunctionBackward returned an invalid gradient at index 40\nmore")

    monkeypatch.setattr(HyperConvDecoder, "compile", broken)
    shape = "n_prompts=2,max_length=4,hidden=8,width=2,n_layers=2,kernel=3,batch_size=2,cache_prompts=8"
    argv = ["gen-bench", "--shape", shape, "--steps", "1", "--groups", "1", "--device", "cpu", "--cudnn", "off",
            "--out", str(tmp_path)]
    assert _load_bench().main([*argv, "--compile", "off,on"]) == 0
    res = json.loads((tmp_path / "dnd_gen_bench.json").read_text())
    assert [r["compile"] for r in res["runs"]] == [False]
    assert res["failed"] == [{"compile": True, "cudnn_benchmark": False, "error": "RuntimeError: Function "
                              "CompiledFunctionBackward returned an invalid gradient at index 40"}]
    out = capsys.readouterr().out
    assert "COMPILE: failed (RuntimeError: Function CompiledFunctionBackward" in out and "BEST: K=1" in out
    assert _load_bench().main([*argv, "--compile", "on"]) == 1  # nothing measured: no BEST line


def test_generators_run_for_valid_targets_first(tmp_path):
    """Once ``base`` is recorded, held-out datasets whose base model is above chance and above the majority-class rate
    get their generators first (a study cut short by the device budget keeps the datasets that can show an effect);
    before that, and within each group, the study's own order holds."""
    from softprompt.dnd.study import Study

    names = ["commonsense/arc_easy", "superglue/boolq", "commonsense/piqa", "commonsense/winogrande"]
    study = Study(tmp_path / "s", "unused-model", datasets=names, configs=["r2,lr1e-2,steps3,ckpt2,bs4"],
                  generators=True, log=lambda m: None)
    assert study.holdout_order() == names
    scores = {"commonsense/arc_easy": ("acc_norm", 0.49, 0.25, 0.26),  # valid
              "superglue/boolq": ("acc_cal", 0.58, 0.50, 0.64),  # above chance, below always-"yes": not valid
              "commonsense/piqa": ("acc_norm", 0.63, 0.50, 0.51),  # valid
              "commonsense/winogrande": ("acc", 0.50, 0.50, 0.50)}  # at chance: not valid
    base = {d: {"test": {m: v, "chance": c, "majority": maj}} for d, (m, v, c, maj) in scores.items()}
    study.path("base").write_text(json.dumps({"datasets": base, "formats": study.formats("base")}))
    order = ["commonsense/arc_easy", "commonsense/piqa", "superglue/boolq", "commonsense/winogrande"]
    assert study.holdout_order() == order
    gens = [s.split(":", 2)[2] for s in study.stages() if s.startswith("gen:")]
    assert gens == order
    # The stats-code ablation on the datasets named only (aliases accepted), after every main generator.
    named = Study(tmp_path / "s", "unused-model", datasets=names, configs=["r2,lr1e-2,steps3,ckpt2,bs4"],
                  generators=True, log=lambda m: None, stats_ablation=["piqa", "boolq"])
    stages = named.stages()
    abl = [s.split(":", 2)[2] for s in stages if s.startswith("gen:") and "+statsdnd" in s]
    assert abl == ["commonsense/piqa", "superglue/boolq"]
    assert stages.index(f"gen:{stages[1].split(':')[1]}+statsdnd:commonsense/piqa") > stages.index(
        f"dnd:{stages[1].split(':')[1]}:commonsense/winogrande")
    # Named datasets run in the order named (most telling first), duplicates once; all of them: valid targets first.
    mixed = Study(tmp_path / "s", "unused-model", datasets=names, configs=["r2,lr1e-2,steps3,ckpt2,bs4"],
                  generators=True, log=lambda m: None, nearest_ablation=["winogrande", "arc_easy", "winogrande"],
                  stats_ablation=True)
    tagged = {t: [s.split(":", 2)[2] for s in mixed.stages() if s.startswith("gen:") and f"+{t}" in s]
              for t in ("statsdnd", "nonearest")}
    assert tagged == {"statsdnd": order, "nonearest": ["commonsense/winogrande", "commonsense/arc_easy"]}
    with pytest.raises(ValueError, match=r"nonearest ablation: commonsense/hellaswag is not among the study's "
                                         r"datasets; name held-out datasets of this study"):
        Study(tmp_path / "s", "unused-model", datasets=names, configs=["r2,lr1e-2,steps3,ckpt2,bs4"],
              generators=True, log=lambda m: None, nearest_ablation=["hellaswag"])
