"""Builders of test_generation*.py: the methods' configs, the prompts, the tiny LM and the one-row reference."""

import torch
from conftest import tiny

import softprompt as sp

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
