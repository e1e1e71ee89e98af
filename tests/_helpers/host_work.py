"""Builders of test_host_work*.py: a seeded batch of token ids, its last row optionally right-padded."""

from __future__ import annotations

import torch


def _ids(batch=2, n=7, pad_from=None):
    ids = torch.randint(3, 100, (batch, n), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
    return ids, mask
