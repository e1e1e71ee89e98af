"""Builders of test_engine_branches*.py: seeded float64 random tensors."""

import torch

F64 = torch.float64


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
