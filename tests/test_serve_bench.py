"""benchmarks/serve_bench.py's engine modes send the rows they claim to: checked with a model that records calls."""

from conftest import load_benchmark


def _serve_bench():
    return load_benchmark("serve_bench")


class _Recorder:
    def __init__(self):
        self.calls = []

    def predict(self, texts, adapters):
        names = [adapters] * len(texts) if isinstance(adapters, str) else list(adapters)
        self.calls.append(list(zip(texts, names)))


def test_engine_modes_cover_every_row_once_with_its_own_adapter():
    sb = _serve_bench()
    names = ["a", "b", "a", "c", "a", "b", "a", "a", "c"]
    texts = [f"t{i}" for i in range(len(names))]
    expected = sorted(zip(texts, names))
    calls = {}
    for mode in ("mixed", "per_adapter", "per_adapter_queued"):
        model = _Recorder()
        out = sb.engine_run(model, texts, names, 4, mode, "cpu")
        assert out["model_calls"] == len(model.calls)
        assert sorted(row for call in model.calls for row in call) == expected, mode
        assert all(len(call) <= 4 for call in model.calls), mode
        if mode != "mixed":
            assert all(len({a for _, a in call}) == 1 for call in model.calls), mode  # one adapter per call
        calls[mode] = [len(c) for c in model.calls]
    assert calls["mixed"] == [4, 4, 1]  # windows of 4
    assert calls["per_adapter"] == [2, 1, 1, 3, 1, 1]  # each window split by adapter (a b a c | a b a a | c)
    assert sorted(calls["per_adapter_queued"]) == [1, 2, 2, 4]  # a: 5 rows -> 4 + 1; b: 2; c: 2
