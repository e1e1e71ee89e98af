"""Builders of the APT tests (test_apt*.py): tiny BERT and Llama models, APT with random gates, padded batches."""

import torch
from conftest import tiny

import softprompt as sp

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# With the default init (std 0.02) attention barely moves a tiny random BERT; std 0.2 makes gate effects visible.
SENSITIVE = dict(initializer_range=0.2)


def bert(**kw):
    return tiny("bert", "cls", **NO_DROPOUT, **SENSITIVE, **kw).eval()


def llama_lm(**kw):
    return tiny("llama", **kw).eval()


# For comparisons of generated tokens: at the default init std of 0.02 attention is nearly uniform and a decoding step
# that loses the prefix gives the same tokens; std 0.3 and a fast rotary base make attention (and positions) matter.
SHARP_LM = dict(initializer_range=0.3, rope_parameters={"rope_type": "default", "rope_theta": 10.0})


def apt(base, p=4, randomize=True, **cfg):
    """Wrap ``base`` with APT; with ``randomize`` the gates are far from their init so that they matter."""
    model = sp.wrap(base, sp.APTConfig(num_virtual_tokens=p, **cfg))
    if randomize:
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for lin in model.method.gate_proj.values():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen))
                if lin.bias is not None:
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen))
            for lam in model.method.gate_lambda.values():
                lam.copy_(0.3 + torch.rand((), generator=gen) * 1.5)
    return model


def right_padded():
    """BERT-style batch: row 1 right-padded."""
    torch.manual_seed(3)
    ids = torch.randint(3, 100, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 1  # pad id of the tiny BERT
    return ids, mask


def left_padded():
    torch.manual_seed(4)
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0
    return ids, mask


def last_hidden(model, **inputs):
    """Final hidden states (the tiny heads' logits are ~1e-2, too small to show differences)."""
    return model(**inputs, output_hidden_states=True).hidden_states[-1]
