"""Prefix tuning hands attention every layer's key and value through one stack and one unbind: same values and
gradients as slicing each table, with a number of ops that does not grow with the layers."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from softprompt.methods.prefix_tuning.module import key_value_pairs


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _tables(shapes):
    gen = torch.Generator().manual_seed(0)
    return {i: torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for i, s in enumerate(shapes)}


def _run(tables, pairs):
    """A loss that weighs every key and value differently, and its gradients."""
    loss = sum((k * (2 * i + 1)).sum() + (v * (2 * i + 2)).pow(2).sum() for i, (k, v) in pairs.items())
    return torch.autograd.grad(loss, list(tables.values()))


def test_same_values_and_gradients_as_slicing_each_table():
    for shapes in ([(2, 3, 4, 5)] * 6, [(2, 3, 4, 5), (2, 3, 2, 5), (2, 3, 4, 5)]):  # one shape; lengths differ
        tables = _tables(shapes)
        pairs = key_value_pairs(tables)
        sliced = {i: (t[:1], t[1:]) for i, t in tables.items()}
        assert list(pairs) == list(sliced)
        for i in tables:
            assert pairs[i][0].shape == (1, *shapes[i][1:])
            assert torch.equal(pairs[i][0], sliced[i][0]) and torch.equal(pairs[i][1], sliced[i][1])
        for a, b in zip(_run(tables, pairs), _run(tables, sliced)):
            assert torch.equal(a, b)


def test_ops_do_not_grow_with_the_layers():
    counts = {}
    for layers in (4, 24):
        tables = _tables([(2, 3, 4, 5)] * layers)
        counter = _Count()
        with counter:
            key_value_pairs(tables)
        counts[layers] = counter.n
    assert counts[4] == counts[24] <= 5  # slicing: 2 ops per layer
