"""``decoding="auto"`` (the default of the engine, the service and ``softprompt serve``): CUDA graphs on a GPU where
fixed buffers apply and take at most half the free memory, the growing cache otherwise, always with the reason."""

import pytest
import torch
from conftest import tiny

import softprompt as sp
from softprompt.multi import MultiAdapterModel, static_batch
from softprompt.multi.generation import GenerationEngine
from softprompt.multi.static_batch import buffer_bytes, choose_decoding


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto_decoding")
    sp.wrap(tiny("llama").eval(), sp.PrefixConfig(num_virtual_tokens=5, seed=1)).save_pretrained(root / "p")
    return MultiAdapterModel(tiny("llama").eval(), {"p": str(root / "p")})


@pytest.fixture
def on_cuda(monkeypatch):
    """The model reports a CUDA device (nothing runs: ``choose_decoding`` only reads shapes and free memory)."""
    monkeypatch.setattr(MultiAdapterModel, "device", property(lambda self: torch.device("cuda", 0)))


def test_auto_on_the_cpu_is_the_growing_cache_and_says_why(model):
    engine = GenerationEngine(model, max_rows=4, max_context=32)
    assert engine.decoding == "dynamic" and engine.max_context is None
    assert "auto: the model is on cpu" in engine.decoding_reason
    asked = GenerationEngine(model, max_rows=4, decoding="static", max_context=32)
    assert asked.decoding == "static" and asked.decoding_reason == "decoding='static' (as asked)"


def test_auto_on_a_gpu_picks_cuda_graphs_when_the_buffers_fit_half_the_free_memory(model, on_cuda, monkeypatch):
    need = buffer_bytes(model, 4, 32, 5)
    monkeypatch.setattr(static_batch, "free_bytes", lambda device: 2 * need)
    decoding, reason = choose_decoding(model, 4, 32, 5)
    assert decoding == "cuda_graphs" and "4 rows x 32 columns" in reason and reason.endswith("(auto)")
    monkeypatch.setattr(static_batch, "free_bytes", lambda device: 2 * need - 1)
    decoding, reason = choose_decoding(model, 4, 32, 5)
    assert decoding == "dynamic" and "more than half" in reason and "lower max_context" in reason


def test_auto_keeps_the_growing_cache_for_layers_of_different_attention_types(model, on_cuda, monkeypatch):
    monkeypatch.setattr(static_batch, "free_bytes", lambda device: 2**50)
    config = model.base_model.config
    monkeypatch.setattr(config, "layer_types", ["full_attention", "sliding_attention"], raising=False)
    decoding, reason = choose_decoding(model, 4, 32)
    assert decoding == "dynamic" and "sliding_attention" in reason
    monkeypatch.setattr(config, "layer_types", ["full_attention"] * 2)
    assert choose_decoding(model, 4, 32)[0] == "cuda_graphs"


def test_buffer_bytes_is_what_the_fixed_buffers_allocate(model):
    """The size the choice and the memory check count is the size of the buffers a prefill then allocates."""
    engine = GenerationEngine(model, max_rows=4, decoding="static", max_context=32)
    engine.submit([5, 6, 7], "p", sp.multi.generation.SamplingParams(max_new_tokens=2))
    while engine.busy:
        engine.step()
    kv = engine.batch._kv
    assert kv.numel() * kv.element_size() == buffer_bytes(model, 4, 32, 5)


def test_the_service_rebuilds_its_engine_with_the_startup_choice(model):
    """After a failed step the server rebuilds its engine: with what ``auto`` chose at startup, not a fresh choice
    that free memory at that moment could change."""
    from softprompt.serve.generation import GenerationService

    service = GenerationService(model, max_rows=4, max_context=32)
    assert service.engine.decoding == "dynamic" and service._engine_args["decoding"] == "dynamic"
