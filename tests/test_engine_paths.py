"""Every branch of the attention function on the decoding paths that generate() and serving take, compared with a
plain full forward of the same adapter: unpadded batch-1 decoding (no mask at all), chunked prefill (a cached prefix
of the sequence, then several new tokens without a mask), and a greedy loop of full forwards."""

import pytest
import torch
from conftest import tiny

import softprompt as sp

PROMPT = [5, 17, 33, 8, 60, 41, 9, 77, 12, 3]


# Positions and attention patterns must matter, or a wrong decode step would give the same tokens: weights large
# enough that attention is far from uniform (at the default init std of 0.02 every score is ~0) and a fast rotary base.
SHARP = dict(initializer_range=0.3, rope_parameters={"rope_type": "default", "rope_theta": 10.0})


def adapted(config=None, **base_kw):
    base = tiny("llama", **base_kw).double().eval()
    return sp.wrap(base, config or sp.PrefixConfig(num_virtual_tokens=4, init="random", init_std=1.0, seed=3)).eval()


def generate_and_greedy_loop(model, steps: int) -> tuple[list[int], list[int]]:
    """(generate()'s new tokens for the unpadded PROMPT, the same count from a greedy loop of full forwards)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=steps, do_sample=False, pad_token_id=0)
        tokens = list(PROMPT)
        for _ in range(steps):
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    return out[0, len(PROMPT):].tolist(), tokens[len(PROMPT):]


def test_unpadded_batch_one_generate_equals_a_greedy_loop_of_full_forwards():
    """No mask anywhere (the fused prefill with dummy query rows, then single-query decode steps): generate()'s
    tokens are the argmax of full forwards, and the prefix changes them."""
    out, loop = generate_and_greedy_loop(adapted(), 8)
    assert out == loop
    with torch.no_grad():
        bare = tiny("llama").double().eval().generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                                                      pad_token_id=0)
    assert out != bare[0, len(PROMPT):].tolist()


def test_chunked_prefill_without_a_mask_equals_the_full_forward():
    """A cache holding the first 6 tokens, then 4 tokens at once with no attention mask: the causal alignment of the
    prefix + cached keys must be bottom-right (pitfall P2), giving the full forward's logits."""
    from transformers import DynamicCache

    model = adapted()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = DynamicCache()
        first = model(input_ids=ids[:, :6], past_key_values=cache, use_cache=True).logits
        second = model(input_ids=ids[:, 6:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(first, full[:, :6], rtol=0, atol=1e-10)
    torch.testing.assert_close(second, full[:, 6:], rtol=0, atol=1e-10)


def test_apt_gated_decode_steps_equal_full_forwards():
    """Gates are computed at prefill and reused by decode steps; with no padding this equals the full forward when
    the gate pools the first token (the strictly causal choice), whatever the steps that follow."""
    model = adapted(sp.APTConfig(num_virtual_tokens=3, init="random", init_std=1.0, gate_init_std=1.0,
                                 gate_pool="first", seed=4), **SHARP)
    out, loop = generate_and_greedy_loop(model, 6)
    assert out == loop


def test_checkpointing_recomputes_every_block_on_every_step():
    """Equal gradients cannot show that checkpointing is on; counting block calls can: with checkpointing, each
    block runs twice per training step (forward, then the recomputation in backward), on the second step too."""
    from softprompt.engine.injector import attach

    for method in (sp.PrefixConfig(num_virtual_tokens=3), sp.IDSPAMConfig(num_virtual_tokens=2, layer=1)):
        model = sp.wrap(tiny("llama", "cls", num_labels=2), method)
        model.gradient_checkpointing_enable()
        model.train()
        blocks = attach(model.base_model).blocks
        calls = [0] * len(blocks)
        for i, block in enumerate(blocks):
            # The block's own hooks may sit outside the checkpointed call (transformers >= 5.24); a submodule's run
            # again with the recomputation.
            block.self_attn.register_forward_pre_hook(lambda m, a, i=i, c=calls: c.__setitem__(i, c[i] + 1))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        ids = torch.tensor([PROMPT, PROMPT[::-1]])
        for step in (1, 2):
            model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
            opt.step()
            opt.zero_grad()
            # Layers from ID-SPAM's insertion layer on also run the prompt alone once per step (its key/value
            # prefixes; again on the replay where transformers checkpoints hooks too): at least twice either way.
            assert calls[0] == 2 * step and min(calls) >= 2 * step, (type(method).__name__, step, calls)


def test_prompt_generate_returns_the_prompt_and_new_tokens_in_every_output_form():
    """Input-layer prompts generate from embeddings, for which transformers returns only the new tokens: the
    prompt ids are put back in front for a plain tensor, for ``return_dict_in_generate`` (its ``sequences``) and
    for several rows per example (beams with ``num_return_sequences``), each row after its own example's ids."""
    model = adapted(sp.PromptTuningConfig(num_virtual_tokens=3, init="random", init_range=1.0, seed=2), **SHARP)
    ids = torch.tensor([PROMPT[:6], PROMPT[4:]])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        rich = model.generate(ids, return_dict_in_generate=True, output_scores=True, **kw)
        beams = model.generate(ids, num_beams=2, num_return_sequences=2, **kw)
    assert plain.shape == (2, 10) and torch.equal(plain[:, :6], ids)
    assert torch.equal(rich.sequences, plain) and len(rich.scores) == 4
    assert beams.shape == (4, 10) and torch.equal(beams[:, :6], ids.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("target", ["kv", "v"])
def test_beam_search_gates_each_row_as_it_gates_that_example_alone(target):
    """generate() with beams repeats each example: APT's gate then has the repeated rows and the prefixes the
    prompt's (this crashed: shapes [2] against [4]). Two examples in one call give the beams each gives alone."""
    from _helpers.apt import apt, llama_lm

    model = apt(llama_lm(), gate_target=target)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    with torch.no_grad():
        both = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        alone = [model.generate(ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), **kw) for i in range(2)]
    assert both.shape == (4, 10)
    assert torch.equal(both, torch.cat(alone))
