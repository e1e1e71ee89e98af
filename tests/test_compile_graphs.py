"""``softprompt train --compile cudagraphs``: the backend it hands the Trainer, its CUDA requirement, and one static
graph per length bucket."""

from __future__ import annotations

import pytest
import torch
from _helpers.compile_runs import bucketed_run


def test_cudagraphs_mode_uses_the_cudagraphs_backend_and_needs_cuda(tmp_path, tiny_bert_dir, varied_csv):
    """``--compile cudagraphs`` hands the Trainer Dynamo's cudagraphs backend (no Inductor mode); Inductor's modes
    keep the inductor backend; on a machine without CUDA the run stops before loading anything, with one line."""
    from softprompt.errors import ConfigError
    from softprompt.train.runner import compile_arguments

    assert compile_arguments("cudagraphs") == {"torch_compile": True, "torch_compile_backend": "cudagraphs"}
    assert compile_arguments("reduce-overhead") == {"torch_compile": True, "torch_compile_backend": "inductor",
                                                    "torch_compile_mode": "reduce-overhead"}
    assert compile_arguments(None) == {"torch_compile": False}
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        bucketed_run(tiny_bert_dir, varied_csv, str(tmp_path / "run"), "cudagraphs")
    assert not (tmp_path / "run" / "metrics.json").exists()


def _one_recording_per_graph(calls: list) -> object:
    """A Dynamo backend that behaves like a CUDA-graph recording: each compiled graph keeps the tensor shapes of its
    first call and refuses any other (the plain cudagraphs backend replays one recording whatever the length)."""
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs):
        compiled, recorded = aot_eager(gm, example_inputs), []

        def run(*args):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            if not recorded:
                recorded.append(shapes)
            elif shapes != recorded[0]:
                raise RuntimeError(f"replayed a recording of {recorded[0]} with {shapes}")
            calls.append(shapes)
            return compiled(*args)

        return run

    return backend


def test_cudagraphs_mode_compiles_each_length_bucket_statically(monkeypatch, tmp_path, tiny_bert_dir, varied_csv,
                                                                 mix_order_on):
    """``--compile cudagraphs`` with several length buckets: each bucket gets its own static graph, since the
    cudagraphs backend keeps one recording per graph (on the H100 a length-dynamic graph was replayed at another
    length: "The size of tensor a (48) must match the size of tensor b (40)"). Checked on the CPU with a backend that
    refuses a second shape per graph, as a recording does; with the length marked dynamic, as for Inductor's modes,
    the same run fails."""
    from softprompt.train import runner

    calls: list = []
    real_compile = torch.compile
    monkeypatch.setattr(runner, "check_device", lambda cfg: None)  # the CUDA requirement, not what is tested here
    monkeypatch.setattr(torch, "compile", lambda model=None, **kw: real_compile(
        model, backend=_one_recording_per_graph(calls), dynamic=kw.get("dynamic")))
    torch._dynamo.reset()
    metrics = bucketed_run(tiny_bert_dir, varied_csv, str(tmp_path / "graphs"), "cudagraphs", max_steps=12)
    assert metrics["steps"] == 12 and len(metrics["length_buckets"]) > 1
    lengths = {shapes[0][1] for shapes in calls if shapes and len(shapes[0]) == 2}
    assert len(lengths) > 1, lengths  # several lengths ran, each through its own recording

    # the length marked dynamic, as for Inductor's modes
    monkeypatch.setattr(runner, "length_is_dynamic", lambda mode, buckets: buckets > 1)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="replayed a recording"):
        bucketed_run(tiny_bert_dir, varied_csv, str(tmp_path / "dynamic"), "cudagraphs", max_steps=12)
    torch._dynamo.reset()


def test_only_inductor_modes_take_the_length_as_dynamic():
    from softprompt.train.bucketing import length_is_dynamic

    assert length_is_dynamic("reduce-overhead", 3) and length_is_dynamic("default", 2)
    assert not length_is_dynamic("cudagraphs", 3)  # a static graph per bucket
    assert not length_is_dynamic("reduce-overhead", 1) and not length_is_dynamic(None, 3)
