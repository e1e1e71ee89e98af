"""Zoo stages in parallel worker processes (``study_zoo``) give the sequential stages' results, and a deadline
stops the workers without writing half stages."""

import json

import pytest
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
        if dataset.endswith("winogrande") and marker.exists():
            marker.unlink()
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
    assert any("winogrande ran out of GPU memory beside 1 other worker(s)" in m for m in logs), logs
