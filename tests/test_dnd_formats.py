"""BoolQ format v2 (two demonstrations + contextual calibration): acc_cal arithmetic, evaluation, and the stage
bookkeeping that turns the 2026-12-04 BoolQ stages (format v1) stale while keeping every other dataset's."""

import json
from pathlib import Path

import pytest

from softprompt.dnd import cloze as C

STAGES = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "dnd_cloze_stages.json"


def test_acc_cal_subtracts_content_free_means(monkeypatch):
    # items: (no, yes) scores; two content-free items with means no -2.0, yes -1.0 (the model leans "yes" by 1)
    scores = [-1.0, -0.5, -1.0, -0.1, -3.0, -2.0, -1.0, 0.0]
    monkeypatch.setattr(C, "continuation_logliks", lambda *a, **k: scores)
    items = [C.Cloze(("q", "q"), (" no", " yes"), 0), C.Cloze(("q", "q"), (" no", " yes"), 1)]
    cal = [C.Cloze(("n", "n"), (" no", " yes"), -1)] * 2
    from test_dnd_harness import _tok

    res = C.score_items(None, _tok(chat=False), items, calibration=cal, return_details=True)
    assert res["calibration"] == [-2.0, -1.0]
    # item 0: yes wins by 0.5 raw, by -0.5 calibrated (correct: no); item 1: yes by 0.9 raw, by -0.1 calibrated
    assert res["correct"] == [0, 1] and res["correct_cal"] == [1, 0] and res["acc_cal"] == 0.5
    plain = C.score_items(None, _tok(chat=False), items[:1] + items[:1], return_details=True)
    assert "acc_cal" not in plain and "correct_cal" not in plain


def test_boolq_v2_items_and_measure():
    assert C.format_version("boolq") == 2 and C.format_version("arc_easy") == 1
    assert C.primary_measure("boolq") == "acc_cal" and C.calibration_items("piqa") == []
    cal = C.calibration_items("boolq")
    assert [c.contexts[0][len(C.boolq_demos()):] for c in cal] == [
        "N/A\nQuestion: N/A?\nAnswer:", "\nQuestion: ?\nAnswer:", "[MASK]\nQuestion: [MASK]?\nAnswer:"]
    assert all(c.continuations == (" no", " yes") and c.gold == -1 for c in cal)


def test_committed_v1_boolq_stages_are_stale(tmp_path):
    """The committed stages as they were before BoolQ's v2 format (every stage that depends on BoolQ marked v1, as
    the 2026-12-04 stages were): BoolQ's zoo, ``base`` and ``cross`` are stale, the other zoos are kept."""
    from softprompt.dnd.study import Study

    stages = json.loads(STAGES.read_text())
    for res in stages.values():
        if "superglue/boolq" in res.get("formats", {}):
            res["formats"]["superglue/boolq"] = 1
    v1 = tmp_path / "v1_stages.json"
    v1.write_text(json.dumps(stages))
    st = Study(tmp_path / "s", "unused", configs=["r8,lr2e-4,steps250,ckpt50"], log=lambda m: None)
    kept = st.restore(v1)
    cfg = "r8_lr2e-4_steps250_ckpt50"
    assert kept == [s for s in st.stages() if s.startswith("zoo:") and not s.endswith("boolq")]
    pending = [s for s in st.stages() if not st.done(s)]
    assert pending == st.stages()  # base, boolq's zoo and cross: stale; the other zoos: records to rebuild
    assert not st.recorded("base") and not st.recorded(f"cross:{cfg}") and not st.recorded(f"zoo:{cfg}:superglue/boolq")
    assert st.recorded(f"zoo:{cfg}:commonsense/piqa")
    old = json.loads(STAGES.read_text())[f"zoo:{cfg}:commonsense/piqa"]
    assert st.result(f"zoo:{cfg}:commonsense/piqa")["test"] == old["test"]


@pytest.mark.parametrize("name", ["arc_easy", "hellaswag", "piqa", "winogrande", "openbookqa", "arc_challenge"])
def test_other_formats_unchanged(name):
    assert C.format_version(name) == 1 and C.calibration_items(name) == []
