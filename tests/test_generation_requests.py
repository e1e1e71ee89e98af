"""Mixed-adapter generation requests: prefill passes, seeded sampling, stop tokens and strings, bad requests."""

import pytest
import torch
from _helpers.generation import PROMPTS, alone, tiny_lm
from conftest import tiny

from softprompt.errors import ConfigError, SequenceTooLongError
from softprompt.multi import MultiAdapterModel
from softprompt.multi.generation import GenerationEngine, SamplingParams


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


def test_a_prefill_pass_counts_the_longest_prompt_plus_the_longest_input_prompt(adapters):
    """A pass's width is the longest prompt plus the longest input-layer prompt (``insert_row_prompts``), even when
    no single row is that long: a bare 8-token row and a 4-token row of a 4-token prompt adapter are 8 columns each
    but 12 columns together, so a budget of 20 tokens prefills them apart and one of 24 together."""
    multi = MultiAdapterModel(tiny_lm(), adapters)
    for budget, want in ((20, [[None], ["prompt"]]), (24, [[None, "prompt"]])):
        engine = GenerationEngine(multi, max_prefill_tokens=budget, max_prefill_padding=0.9)
        requests = [engine.requests[engine.submit(p, name)] for p, name in (([1] * 8, None), ([2] * 4, "prompt"))]
        assert [[r.adapter for r in g] for g in engine._prefill_groups(requests)] == want, budget
