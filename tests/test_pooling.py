"""Pooling of token states by the padding mask (softprompt.pooling): padding never reaches a pooled vector, with left
and right padding alike, and a row without a real token pools to zeros."""

import torch

from softprompt.pooling import first_real, last_real, masked_mean, mean_weights, pool

# Row 0: right-padded (3 real of 5), row 1: left-padded (2 real), row 2: no real token. Padding holds huge values.
MASK = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])


def _hidden() -> torch.Tensor:
    """Distinct values on real tokens, 1e6 on padding."""
    h = torch.arange(3 * 5 * 2, dtype=torch.float64).view(3, 5, 2)
    return torch.where(MASK[..., None].bool(), h, torch.full_like(h, 1e6))


def test_masked_mean_is_the_mean_of_the_real_tokens_only():
    h = _hidden()
    want = torch.stack([h[0, :3].mean(0), h[1, 3:].mean(0), torch.zeros(2, dtype=torch.float64)])
    torch.testing.assert_close(masked_mean(h, MASK), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(pool(h, MASK, "mean"), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(mean_weights(MASK, h.dtype) @ h, want[:, None, :], rtol=0, atol=1e-12)
    torch.testing.assert_close(masked_mean(h[:1, :3], None), h[0, :3].mean(0, keepdim=True))  # no mask: every token


def test_first_and_last_real_token_under_left_and_right_padding():
    h = _hidden()[:2]
    m = MASK[:2]
    torch.testing.assert_close(first_real(h, m), torch.stack([h[0, 0], h[1, 3]]), rtol=0, atol=0)
    torch.testing.assert_close(last_real(h, m), torch.stack([h[0, 2], h[1, 4]]), rtol=0, atol=0)
    torch.testing.assert_close(pool(h, m, "cls"), h[:, 0], rtol=0, atol=0)  # position 0 whatever the padding
