"""Mixed-adapter generation with fixed decoding buffers: visibility, host copies and reads, sizes, joining rows."""

import sys

import pytest
import torch
from _helpers.generation import PROMPTS, alone, tiny_lm

from softprompt.errors import ConfigError
from softprompt.multi import MultiAdapterModel
from softprompt.multi.generation import GenerationEngine, SamplingParams


def test_decoding_state_masks_prefix_columns_only_where_needed(adapters):
    """Rows of one prefix length decode with no prefix mask (attention's unmasked path); when a bare row joins, the
    rows' visibility is one mask tensor shared by every layer (attention builds it once per step, not per layer)."""
    multi = MultiAdapterModel(tiny_lm(), adapters)
    engine = GenerationEngine(multi)
    for prompt in PROMPTS[:3]:
        engine.submit(prompt, "prefix", SamplingParams(max_new_tokens=6))
    engine.step()
    engine.step()  # the decode state is built by the first decoding step after rows changed
    layers = engine.batch._state.layers
    assert layers and all(inj.prefix_mask is None for inj in layers.values())
    engine.submit(PROMPTS[3], None, SamplingParams(max_new_tokens=3))
    engine.step()
    engine.step()
    masks = {id(inj.prefix_mask) for inj in engine.batch._state.layers.values()}
    assert len(masks) == 1 and engine.batch._state.layers[0].prefix_mask.tolist() == [[True] * 5] * 3 + [[False] * 5]


def test_fixed_buffers_share_one_visibility_across_layers_until_a_row_differs_by_layer(adapters):
    """Fixed decoding buffers: while every row sees the same prefix columns in every layer (prefix rows, bare rows),
    every layer gets one visibility tensor (attention builds its mask once per step); once a row whose layers differ
    joins (a late prompt: a prefix from layer 1 on), visibility becomes per layer, and every row stays exact."""
    engine = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters), decoding="static", max_context=32)
    jobs = [(name, prompt, engine.submit(prompt, name, SamplingParams(max_new_tokens=8)))
            for name, prompt in (("prefix", PROMPTS[0]), (None, PROMPTS[1]), ("prefix_short", PROMPTS[3]))]
    short = engine.submit(PROMPTS[2], "prefix", SamplingParams(max_new_tokens=2))  # leaves after one decoding step
    for _ in range(3):
        engine.step()
    assert engine.result(short) == alone(adapters["prefix"], PROMPTS[2], 2) and 4 in engine.batch._states
    state = engine.batch._states[engine.batch.rows]
    assert len({id(inj.prefix_mask) for inj in state.layers.values()}) == 1
    seen = {"prefix": 5, None: 0, "prefix_short": 2}
    want = [[True] * seen[r.request.adapter] + [False] * (5 - seen[r.request.adapter]) for r in engine.rows]
    assert state.layers[0].prefix_mask.tolist() == want
    jobs.append(("lpt", PROMPTS[2], engine.submit(PROMPTS[2], "lpt", SamplingParams(max_new_tokens=4))))
    engine.step()
    engine.step()
    state = engine.batch._states[4]
    assert engine.rows[3].request.adapter == "lpt"
    assert [state.layers[i].prefix_mask[3].any().item() for i in sorted(state.layers)] == [
        i >= 1 for i in sorted(state.layers)]  # LatePromptConfig(layer=1): a prefix from layer 1 on
    engine.run()
    for name, prompt, rid in jobs:
        assert engine.result(rid) == alone(adapters.get(name), prompt, 8 if name != "lpt" else 4), name


def test_the_engine_copies_host_values_to_the_device_once_per_pass(adapters):
    """A copy from pageable host memory to the GPU waits for the device to finish its queue. The engine makes one
    such copy per prefill pass (token ids, mask, position shifts and every adapter's row indices together) and one
    per decoding step (last tokens and positions), not one per adapter or per tensor. Counted on the CPU as tensors
    built from Python values (``aten.lift_fresh``) in the engine's own code."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import softprompt.multi.generation as generation

    class Made(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.where = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.lift_fresh.default:
                frame = sys._getframe(1)
                while frame is not None and "torch" in frame.f_code.co_filename.split("softprompt")[-1]:
                    frame = frame.f_back
                if frame is not None and frame.f_code.co_name == "_to_device":  # the engine's one packed copy
                    frame = frame.f_back
                if frame is not None and frame.f_code.co_filename == generation.__file__:
                    self.where.append(frame.f_code.co_name)
            return func(*args, **(kwargs or {}))

    engine = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters), max_rows=8)
    for name in ("prefix", "apt", "prompt", "prefix_short", None):
        engine.submit(PROMPTS[0], name, SamplingParams(max_new_tokens=4))
    made = Made()
    with made:
        engine.step()  # one prefill pass of five rows and four adapters
        engine.step()  # one decoding step
    assert made.where == ["_prefill", "_decode"]


# Ops that read a device value on the host: each is a device sync, which a CUDA graph cannot capture.
HOST_READS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.nonzero.default",
              "aten.equal.default", "aten.item.default"}


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_a_static_decoding_step_reads_nothing_back_to_the_host(adapters, decoding):
    """What a CUDA graph needs, checked on the CPU: the forward of a decoding step with fixed buffers dispatches no
    op that reads a device value on the host (the dynamic step does: transformers builds its mask from the 2D one),
    and it runs at a fixed shape whatever the number of live rows (the bucket)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in HOST_READS:
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    engine = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters), max_rows=8, decoding=decoding, max_context=32)
    for name, prompt in zip(["prefix", "apt", "lpt", "prompt", None], PROMPTS + [PROMPTS[0]]):
        engine.submit(prompt, name, SamplingParams(max_new_tokens=8))
    engine.step()
    batch = engine.batch
    last = torch.tensor([[r.request.tokens[-1]] for r in engine.rows])
    positions = torch.tensor([[r.position] for r in engine.rows])
    with torch.inference_mode(), HostReads() as reads:
        if decoding == "static":
            batch._ids[: batch.rows], batch._positions[: batch.rows] = last, positions
            logits = batch._run(8, batch.capacity)  # the graph's shapes: the whole bucket, every column
        else:
            logits = batch.forward(last, positions)
    if decoding == "static":
        assert reads.seen == [] and logits.shape[0] == 8
    else:
        assert reads.seen  # the check can see a host read


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_fixed_buffers_give_attention_prefix_and_cache_without_a_copy(adapters, decoding):
    """With fixed buffers each row's prefix sits right before its cache, so a decoding step concatenates no keys or
    values: on a GPU such a `cat` copies every row's whole cache in every layer of every step. The dynamic cache
    still concatenates (which shows that the check sees it); tokens stay exact (test_every_row_equals_...)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Cats(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            dim = args[1] if len(args) > 1 else (kwargs or {}).get("dim", 0)
            if func is torch.ops.aten.cat.default and out.dim() == 4 and dim in (2, -2):  # along the sequence
                self.shapes.append(tuple(out.shape))
            return out

    model = MultiAdapterModel(tiny_lm(), adapters)
    engine = GenerationEngine(model, max_rows=4, decoding=decoding, max_context=32)
    for name, prompt in zip(["prefix", "apt", None], PROMPTS):
        engine.submit(prompt, name, SamplingParams(max_new_tokens=8))
    engine.step()
    with torch.inference_mode(), Cats() as cats:
        engine.step()  # one decoding step
    keys_of_layers = [s for s in cats.shapes if s[1] == model.info.num_kv_heads and s[3] == model.info.head_dim]
    assert (keys_of_layers == []) == (decoding == "static")


def test_fixed_buffers_refuse_layers_of_different_shapes_in_one_line():
    """One buffer holds every layer's keys and values, so a model whose layers differ in key/value heads or head
    size gets a one-line error naming the way out (the dynamic cache), before anything is allocated."""
    from types import SimpleNamespace

    from softprompt.multi.static_batch import StaticBatch

    layers = [SimpleNamespace(keys=torch.zeros(1, 2, 3, 8)), SimpleNamespace(keys=torch.zeros(1, 1, 3, 8))]
    batch = StaticBatch(model=None, cache_arg="cache", max_rows=2, capacity=8, cuda_graphs=False)
    with pytest.raises(ConfigError, match=r"same key/value heads and head size in every layer.*decoding='dynamic'"):
        batch.join(SimpleNamespace(layers=layers), torch.ones(1, 3, dtype=torch.bool), None)
    assert batch._kv is None and batch.rows == 0


def test_fixed_buffer_size_check_counts_the_widest_loaded_prefix(adapters, monkeypatch):
    """The buffers hold the widest loaded prefix (5 columns: "prefix") in front of every row's cache, so the memory
    check at construction counts those columns too: with room for the cache columns only, it refuses in one line
    that names them; with room for both, it passes."""
    from softprompt.multi import static_batch

    model = MultiAdapterModel(tiny_lm(), adapters)
    info, rows, columns = model.info, 4, 24
    per_column = 2 * info.num_layers * rows * info.num_kv_heads * info.head_dim * 8  # float64
    monkeypatch.setattr(static_batch, "free_bytes", lambda device: per_column * columns)
    with pytest.raises(ConfigError, match=f"{rows} rows x {columns} columns \\(\\+ 5 prefix columns\\) need"):
        GenerationEngine(model, max_rows=rows, decoding="static", max_context=columns)
    monkeypatch.setattr(static_batch, "free_bytes", lambda device: per_column * (columns + 5))
    GenerationEngine(model, max_rows=rows, decoding="static", max_context=columns)


def test_a_wider_adapter_loaded_later_is_checked_before_its_request_is_queued(adapters, monkeypatch):
    """An adapter added after the engine started, with a wider prefix (5 columns) than those the buffers were sized
    for (2: "prefix_short"), widens the fixed buffers when its first row joins. Its first request checks that
    allocation against the free memory: refused in one line that names the adapter, both widths and the way out,
    nothing queued; with room, accepted, and checked only once."""
    from softprompt.multi import static_batch

    model = MultiAdapterModel(tiny_lm(), {"prefix_short": adapters["prefix_short"]})
    info, rows, columns = model.info, 4, 24
    per_column = 2 * info.num_layers * rows * info.num_kv_heads * info.head_dim * 8  # float64
    free = {"bytes": per_column * (columns + 2)}
    monkeypatch.setattr(static_batch, "free_bytes", lambda device: free["bytes"])
    engine = GenerationEngine(model, max_rows=rows, decoding="static", max_context=columns)
    model.add_adapter("prefix", adapters["prefix"])
    with pytest.raises(ConfigError, match="adapter 'prefix' has 5 prefix columns, more than the 2 .*widening them "
                                          r"does not fit: .*\(\+ 5 prefix columns\) need.*start the engine with"):
        engine.submit([5, 6, 7], "prefix", SamplingParams(max_new_tokens=4))
    assert not engine.waiting
    engine.submit([5, 6, 7], "prefix_short", SamplingParams(max_new_tokens=4))  # fits as before
    free["bytes"] = per_column * (columns + 5)
    engine.submit([5, 6, 7], "prefix", SamplingParams(max_new_tokens=4))
    free["bytes"] = 0  # counted once: the next request of that width is not checked again
    engine.submit([8, 9], "prefix", SamplingParams(max_new_tokens=4))
    assert len(engine.waiting) == 3
    free["bytes"] = per_column * 10**3
    engine.run()
    for request, prompt in zip(engine.requests.values(), ([5, 6, 7], [5, 6, 7], [8, 9])):
        assert request.tokens == alone(adapters[request.adapter], prompt, 4)


def test_fixed_buffers_are_no_wider_than_the_model_has_positions(adapters):
    """No request can use more columns than the model has positions (128 here), so fixed decoding buffers asked for
    a larger ``max_context`` are sized to the positions (and their memory check counts those)."""
    engine = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters), decoding="static", max_context=10**7)
    assert engine.max_context == 128 and engine.batch.capacity == 128


def test_a_longer_and_wider_row_joining_a_fixed_batch_keeps_the_live_rows_exact(adapters):
    """Fixed decoding buffers: a row whose prompt is longer than the columns used so far moves the live rows right
    (the columns they leave are hidden from them), and a prefix wider than any so far widens the buffers (the live
    rows keep their prefix and its visibility). The live row and the new one both equal their adapter alone."""
    engine = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters), max_rows=4, decoding="static", max_context=24)
    short = engine.submit(PROMPTS[2], "prefix_short", SamplingParams(max_new_tokens=8))  # 1 token, 2 prefix columns
    engine.step()
    engine.step()
    assert (engine.batch.col, engine.batch._width) == (2, 2)
    long = engine.submit(PROMPTS[1], "prefix", SamplingParams(max_new_tokens=6))  # 7 tokens, 5 prefix columns
    engine.step()
    assert (engine.batch.col, engine.batch._width) == (7, 5)  # a decoding step (col 3), then moved right by 4
    engine.run()
    assert engine.result(short) == alone(adapters["prefix_short"], PROMPTS[2], 8)
    assert engine.result(long) == alone(adapters["prefix"], PROMPTS[1], 6)
