"""Smoke test of benchmarks/serve_decode_profile.py (a benchmark: it prints numbers; nothing here checks a time)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import serve_decode_profile


def test_profiles_mixed_and_bare_decoding_steps(tmp_path):
    out = tmp_path / "profile.json"
    results = serve_decode_profile.main(["--model", "tiny", "--rows", "2", "--steps", "2", "--profile-steps", "1",
                                         "--top", "100", "--out", str(out)])
    assert [(r["mode"], r["rows"]) for r in results] == [("mixed", 2), ("bare", 2)]
    for r in results:
        assert len(r["step_ms_all"]) == 2 and r["top_cpu"] and r["self_cpu_ms_per_step"] > 0
    saved = json.loads(out.read_text())
    assert saved["results"][0]["mode"] == "mixed" and "torch" in saved["versions"]
    # The mixed step really decodes prefix rows: its profile holds the prefix concatenation bare rows do not have.
    cats = {r["mode"]: next((c for name, c, _ in r["top_cpu"] if name == "aten::cat"), 0) for r in results}
    assert cats["mixed"] > cats["bare"]


def test_join_steps_prefill_joining_requests_before_decoding(tmp_path):
    """With ``--join``, every profiled step prefills the joining requests and then decodes: two embedding lookups
    per step instead of one, in both modes."""
    runs = {}
    for join in (0, 2):
        results = serve_decode_profile.main(["--model", "tiny", "--rows", "2", "--steps", "3", "--profile-steps", "2",
                                             "--top", "1000", "--join", str(join), "--decoding", "static"])
        runs[join] = {r["mode"]: r for r in results}
    for mode in ("mixed", "bare"):
        lookups = {j: next(c for name, c, _ in runs[j][mode]["top_cpu"] if name == "aten::embedding") for j in runs}
        assert lookups == {0: 1, 2: 2} and runs[2][mode]["join"] == 2
