"""Zoo stages in parallel worker processes (``study_zoo``) give the sequential stages' results, and a deadline
stops the workers without writing half stages."""

import json
import types

import pytest
import torch
from conftest import tiny
from test_dnd_harness import _tok

from softprompt.dnd.study import Study

DS = ["commonsense/arc_easy", "commonsense/winogrande"]
KW = {"datasets": DS, "configs": ["r2,lr1e-2,steps3,ckpt2,bs4"], "n_eval": 4, "n_dev": 2, "batch_size": 8,
      "device": "cpu", "log": lambda m: None}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama").save_pretrained(d)
    _tok(chat=False).save_pretrained(d)
    return str(d)


def test_zoo_workers_match_sequential(folder, tmp_path):
    seq = Study(tmp_path / "seq", folder, **KW)
    par = Study(tmp_path / "par", folder, zoo_workers=2, **KW)
    assert seq.run() == "complete" and par.run() == "complete"
    for s in seq.stages():
        a, b = seq.result(s), par.result(s)
        assert a.keys() == b.keys() and a["formats"] == b["formats"]
        if s.startswith("zoo:"):
            assert b["losses"] == pytest.approx(a["losses"], rel=1e-4)
            assert b["test"]["correct"] == a["test"]["correct"] and b["final"]["step"] == a["final"]["step"]
            # its optimiser seconds were timed beside up to this many stages on the device
            assert (a["profile"]["zoo_workers"], b["profile"]["zoo_workers"]) == (1, 2)
    stop = Study(tmp_path / "stop", folder, zoo_workers=2, **KW)
    stop.path("base").write_text(json.dumps(par.result("base")) + "\n")
    zoo = [s for s in stop.stages() if s.startswith("zoo:")]
    from softprompt.dnd.study_zoo import run_zoos_parallel

    assert run_zoos_parallel(stop, zoo, 0.0, 2) == []  # deadline at once: workers killed, nothing written
    assert not any(stop.done(s) for s in zoo)


class OomOnceStudy(Study):
    """A study whose zoo stage for WinoGrande runs out of GPU memory the first time (a marker file in the state
    folder says so across the spawned worker processes), as a worker too many for the card would."""

    def run_zoo(self, cfg, dataset):
        import torch

        marker = self.state / "oom-once"
        if dataset.endswith("winogrande") and (marker.exists() or (self.state / "oom-always").exists()):
            marker.unlink(missing_ok=True)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().run_zoo(cfg, dataset)


def test_a_worker_out_of_memory_reruns_its_stage_with_fewer_workers(folder, tmp_path):
    from softprompt.dnd.study_zoo import run_zoos_parallel

    logs: list[str] = []
    st = OomOnceStudy(tmp_path / "oom", folder, zoo_workers=2, **{**KW, "log": logs.append})
    (st.state / "oom-once").write_text("")
    zoo = [s for s in st.stages() if s.startswith("zoo:")]
    assert run_zoos_parallel(st, zoo, 600.0, 2) == zoo  # both written: WinoGrande's on its second try
    assert not (st.state / "oom-once").exists()
    assert any("winogrande ran out of GPU memory (started beside 1 other worker(s)); it runs again alone" in m
               for m in logs), logs
    always = OomOnceStudy(tmp_path / "oom-always", folder, zoo_workers=2, **KW)
    (always.state / "oom-always").write_text("")
    with pytest.raises(torch.OutOfMemoryError):  # out of memory alone on the card: raised, not retried forever
        run_zoos_parallel(always, zoo, 600.0, 2)


def test_stages_start_longest_first_while_their_recorded_memory_fits():
    from softprompt.dnd.study_zoo import fits, to_start

    peak = {"boolq": 35.0, "hellaswag": 20.0, "arc_c": 10.0, "arc_e": 10.0, "piqa": 14.0, "new": None}
    order = ["boolq", "hellaswag", "arc_c", "arc_e", "piqa"]
    # 1.15 x peak + 0.6 GiB each: BoolQ 40.85 + HellaSwag 23.6 = 64.45; ARC-c's 12.1 more would pass 75
    assert to_start(order, [], peak, set(), 3, 75.0) == ["boolq", "hellaswag"]
    assert to_start(order, [], peak, set(), 3, 80.0) == ["boolq", "hellaswag", "arc_c"]
    assert to_start(order[1:], ["boolq"], peak, set(), 3, 75.0) == ["hellaswag"]
    assert to_start(["piqa", "arc_e"], ["boolq", "hellaswag"], peak, set(), 4, 80.0) == ["arc_e"]  # first fit
    assert to_start(order, [], peak, set(), 2, None) == ["boolq", "hellaswag"]  # no card: the count alone
    assert to_start(["new", "arc_c"], ["boolq"], peak, set(), 3, 50.0) == ["new", "arc_c"]  # unknown peak: count
    assert to_start(order, [], {**peak, "boolq": 90.0}, set(), 3, 75.0) == ["boolq"]  # alone on an idle card
    # a stage that ran out of memory beside others waits for an idle card, and nothing starts beside it
    assert to_start(["boolq", "arc_c"], ["arc_e"], peak, {"boolq"}, 3, None) == []
    assert to_start(["boolq", "arc_c"], [], peak, {"boolq"}, 3, None) == ["boolq"]
    assert fits(10.0, [], 1.0) and not fits(10.0, [60.0], 75.0) and fits(10.0, [50.0], 75.0)


def test_recorded_profiles_come_from_the_latest_rebuild():
    from softprompt.dnd.study_zoo import _recorded

    rebuilds = [{"profile": {"build_s": 90.0}}, {"profile": {"build_s": 129.0, "peak_gib": 33.1}}]
    results = {"a": {"profile": {"build_s": 60.0}}, "b": {"rebuilds": rebuilds}, "c": {"final": {}}}
    st = types.SimpleNamespace(recorded=results.__contains__, result=results.__getitem__)
    assert [_recorded(st, s, "build_s") for s in "abcd"] == [60.0, 129.0, None, None]
    assert _recorded(st, "b", "peak_gib") == 33.1 and _recorded(st, "a", "peak_gib") is None


def test_zoo_alone_times_each_datasets_zoo_loop(folder, tmp_path, capsys):
    """``dnd_bench.py zoo-alone``: seconds per zoo step of each dataset, with nothing else on the device (the cost
    table's lone-LoRA estimate); the warm-up steps are left out of the timing."""
    from test_dnd_bench import _load_bench

    argv = ["zoo-alone", "--model", folder, "--config", "r2,lr1e-2,steps3,ckpt2,bs4", "--datasets",
            "arc_easy,winogrande", "--steps", "2", "--skip", "1", "--device", "cpu", "--out", str(tmp_path)]
    assert _load_bench().main(argv) == 0
    res = json.loads((tmp_path / "dnd_zoo_alone.json").read_text())
    assert res["config"] == "r2_lr1e-2_steps3_ckpt2_bs4" and (res["skip"], res["steps_timed"]) == (1, 2)
    assert list(res["datasets"]) == DS and "device" in res and "zoo-alone" in res["command"]
    for r in res["datasets"].values():
        assert r["step_seconds"] > 0 and r["step_seconds"] == pytest.approx(r["timed_seconds"] / 2, abs=1e-5)
    assert "commonsense/arc_easy: " in capsys.readouterr().out
    assert _load_bench().main([*argv[:-6], "--skip", "0", "--device", "cpu"]) == 2
    assert "--skip and --steps must be at least 1" in capsys.readouterr().err
