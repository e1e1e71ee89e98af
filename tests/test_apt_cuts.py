"""APT's per-layer cuts (issue 18, session 16), each checked against the computation it replaced.

* Key and value gated in one multiply of compose's joint [2, B, H, P, D] view: the same products as two multiplies
  (outputs and the tables' gradients bit for bit); the gate's gradient is one reduction over key and value instead
  of two and a sum, exact where every partial sum is (dyadic values), within float rounding otherwise.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from softprompt.engine import attention
from softprompt.engine.compose import Contribution, Part, compose
from softprompt.engine.state import LayerInjection

B, H, P, D = 3, 2, 4, 5


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _leaves(seed: int, gate_shape: tuple, dyadic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's table [2, 1, H, P, D] (key, value) and a gate, float64 leaves. Dyadic: multiples of 1/4 in [-2, 2],
    whose products and sums of a few dozen terms are exact in float64, so any summation order gives one result."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        if dyadic:
            return torch.randint(-8, 9, shape, generator=gen).double() / 4
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return draw(2, 1, H, P, D).requires_grad_(), draw(*gate_shape).requires_grad_()


def _loss(pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """Weighs keys and values differently (the gate's gradient sums both); dyadic weights (see ``_leaves``)."""
    w = (torch.arange(pk.numel(), dtype=pk.dtype).view(pk.shape) % 9 - 4) / 4
    return (pk * w).sum() + (pv * (1 - w)).pow(2).sum()


def _plain(table: torch.Tensor, gate: torch.Tensor, values_only: bool):
    """The reference: expand, then one multiply per gated tensor."""
    g = gate.reshape(gate.shape[0], -1 if gate.dim() > 2 else 1, gate.shape[-1], 1)
    k, v = table.expand(-1, B, -1, -1, -1).unbind(0)
    return (k if values_only else k * g), v * g


def _engine(table: torch.Tensor, gate: torch.Tensor, values_only: bool, joint: bool):
    """compose (a contribution with a layer hook: the joint view is made) and attention's gate application."""
    hook = (lambda *_: None) if joint else None
    key, value = table.unbind(0)
    state = compose([Part(Contribution(prefixes={0: (key, value)}, layer_hook=hook))], B)
    inj = state.layers[0]
    assert (inj.key_value is not None) == joint
    inj.gate, inj.gate_values_only = gate, values_only
    counter = _Ops()
    with counter:
        pk, pv = attention._compute_gated_prefix(inj, B, torch.float64, table.device)
    return pk, pv, counter.ops


def _run(fn, table, gate):
    pk, pv, *_ = fn(table, gate)
    grads = torch.autograd.grad(_loss(pk, pv), [table, gate])
    return pk.detach(), pv.detach(), grads


@pytest.mark.parametrize("gate_shape", [(B, P), (B, H, P)], ids=["per-row", "per-head"])
@pytest.mark.parametrize("dyadic", [True, False], ids=["dyadic", "random"])
def test_joint_gate_is_one_multiply_with_the_two_multiplies_numbers(gate_shape, dyadic):
    table, gate = _leaves(0, gate_shape, dyadic)
    want_k, want_v, (want_table, want_gate) = _run(lambda t, g: _plain(t, g, False), table, gate)
    for joint in (True, False):
        got_k, got_v, (got_table, got_gate) = _run(lambda t, g, j=joint: _engine(t, g, False, j), table, gate)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        assert torch.equal(got_table, want_table)
        if dyadic or not joint:
            assert torch.equal(got_gate, want_gate)
        else:  # one reduction over key and value: another summation order
            torch.testing.assert_close(got_gate, want_gate, rtol=1e-14, atol=1e-14)
    ops = _engine(table, gate, False, True)[2]
    assert ops == ["aten.view.default", "aten.mul.Tensor", "aten.unbind.int"]  # was a view and two multiplies


def test_values_only_gating_keeps_its_single_multiply():
    table, gate = _leaves(1, (B, P), False)
    want_k, want_v, want = _run(lambda t, g: _plain(t, g, True), table, gate)
    got_k, got_v, got = _run(lambda t, g: _engine(t, g, True, True), table, gate)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert _engine(table, gate, True, True)[2] == ["aten.view.default", "aten.mul.Tensor"]


def test_joint_view_only_for_contributions_with_a_layer_hook():
    """Prefix tuning (no hook) keeps its ops; an injection without a joint view gates key and value separately."""
    table, _ = _leaves(2, (B, P), False)
    key, value = table.detach().unbind(0)
    plain = compose([Part(Contribution(prefixes={0: (key, value), 1: (key, value)}))], B)
    assert all(inj.key_value is None for inj in plain.layers.values())
    hooked = compose([Part(Contribution(prefixes={0: (key, value), 1: (key, value)}, layer_hook=lambda *_: None))],
                     B)
    for inj in hooked.layers.values():
        assert inj.key_value.shape == (2, B, H, P, D)
        assert torch.equal(inj.key_value[0], inj.key) and torch.equal(inj.key_value[1], inj.value)
    assert LayerInjection().key_value is None
