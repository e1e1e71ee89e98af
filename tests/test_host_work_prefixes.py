"""Host work per forward (issue 18, part 2): prefixes cast, expanded and stacked into one buffer once per forward."""

from __future__ import annotations

import pytest
import torch
from _helpers.host_work import _ids
from conftest import tiny

import softprompt as sp
from softprompt.engine import compose
from softprompt.engine.compose import Contribution, Part
from softprompt.engine.state import STATE_KWARG

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- prefixes cast and expanded once per forward ---------------------------------------------------------------------
def _tables(n_layers=3, p=4, batch=1, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {i: (torch.randn(batch, heads, p, dim, generator=g), torch.randn(batch, heads, p, dim, generator=g))
            for i in range(n_layers)}


def test_one_method_prefixes_are_expanded_to_the_batch_in_one_operation():
    prefixes = _tables()
    state = compose.compose([Part(Contribution(prefixes=prefixes))], 3)
    storages = {inj.key.untyped_storage().data_ptr() for inj in state.layers.values()}
    assert len(storages) == 1  # every layer's key and value are views of one tensor
    for i, (k, v) in prefixes.items():
        inj = state.layers[i]
        assert inj.key.shape == (3, 2, 4, 8) and inj.key.stride(0) == 0
        assert torch.equal(inj.key, k.expand(3, -1, -1, -1)) and torch.equal(inj.value, v.expand(3, -1, -1, -1))


@pytest.mark.parametrize("prefixes", [{}, _tables(batch=3), {0: _tables()[0], 1: _tables(p=2)[1]}],
                         ids=["none", "per-row", "lengths-differ"])
def test_other_prefixes_pass_through_unchanged(prefixes):
    state = compose.compose([Part(Contribution(prefixes=prefixes))], 3)
    assert {i: (inj.key, inj.value) for i, inj in state.layers.items()} == prefixes


def test_prefixes_take_autocasts_dtype_once_and_attention_casts_what_still_differs():
    prefixes = _tables()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = compose.compose([Part(Contribution(prefixes=prefixes))], 2)
    assert all(inj.key.dtype == torch.bfloat16 for inj in state.layers.values())
    assert compose.compute_dtype(prefixes[0][0]) == torch.float32
    # A model loaded in bf16 with fp32 prefixes (no autocast): attention casts them, exactly as a pre-cast prefix.
    base = tiny("llama").to(torch.bfloat16)
    model = sp.wrap(base, sp.PrefixConfig(num_virtual_tokens=3))
    ids, mask = _ids(pad_from=4)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        cast = {i: (t[0][None].to(torch.bfloat16), t[1][None].to(torch.bfloat16))
                for i, t in model.method.layer_tables().items()}
        state = compose.compose([Part(Contribution(prefixes=cast))], 2, mask)
        want = model.base_model(input_ids=ids, attention_mask=mask, **{STATE_KWARG: state}).logits
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


# ---- several parts: every layer's prefix in one buffer ---------------------------------------------------------------
def _expected(parts, g, width):
    """Row r, layer i: its part's table in the first P columns, zeros after; visible [G, width]."""
    key = {i: torch.zeros(g, 2, width, 8) for i in range(3)}
    visible = torch.zeros(g, width, dtype=torch.bool)
    for p in parts:
        for i, (k, _) in p.contribution.prefixes.items():
            key[i][p.rows, :, : k.shape[-2]] = k.expand(len(p.rows), -1, -1, -1)
            visible[p.rows, : k.shape[-2]] = True
    return key, visible


def test_mixed_parts_share_one_buffer_and_one_visibility_mask():
    a = Part(Contribution(prefixes=_tables(p=2, seed=1)), torch.tensor([0, 2]))
    b = Part(Contribution(prefixes=_tables(p=4, batch=1, seed=2)), torch.tensor([1]))
    state = compose.compose([a, b], 4)  # row 3 runs bare
    key, visible = _expected([a, b], 4, 4)
    masks = {id(inj.prefix_mask) for inj in state.layers.values()}
    assert len(masks) == 1 and torch.equal(state.layers[0].prefix_mask, visible)
    for i in range(3):
        assert torch.equal(state.layers[i].key, key[i])
    # Every row covered, one length: no mask at all (the fused attention paths stay usable).
    c = Part(Contribution(prefixes=_tables(p=2, batch=2, seed=3)), torch.tensor([1, 3]))
    a2 = Part(a.contribution, torch.tensor([0, 2]))
    full = compose.compose([a2, c], 4)
    assert all(inj.prefix_mask is None for inj in full.layers.values())
    assert torch.equal(full.layers[2].value[3], c.contribution.prefixes[2][1][1])


def test_mixed_prefixes_are_stacked_in_the_models_dtype_once():
    """fp32 adapters on a bf16 model: several parts' prefixes go into the model's dtype while they are stacked (one
    cast per part for every layer, or one per layer for the small stacked tables), so attention casts nothing; the
    values are the fp32 tables rounded once, as attention's own cast would."""
    a = Part(Contribution(prefixes=_tables(p=2, seed=1)), torch.tensor([0, 2]))
    b = Part(Contribution(prefixes=_tables(p=4, batch=1, seed=2)), torch.tensor([1]))
    key, _ = _expected([a, b], 4, 4)
    state = compose.compose([a, b], 4, dtype=torch.bfloat16)
    for i in range(3):
        assert state.layers[i].key.dtype == torch.bfloat16 and torch.equal(state.layers[i].key, key[i].bfloat16())
    assert compose.compose([a, b], 4).layers[0].key.dtype == torch.float32  # no dtype: the tables' own
    # Layer by layer (a part's lengths differ across layers), one table per part, every row covered: the stacked
    # tables are cast before each row picks its own.
    tables = {i: _tables(p=3 if i < 2 else 2, seed=7 + i)[i] for i in range(3)}
    c, d = (Part(Contribution(prefixes=tables), torch.tensor([r])) for r in (0, 1))
    per_layer = compose.compose([c, d], 2, dtype=torch.bfloat16)
    for i in range(3):
        assert torch.equal(per_layer.layers[i].key, tables[i][0].expand(2, -1, -1, -1).bfloat16())
    # The padded path (two lengths in one layer, and lengths that change across layers): one buffer per layer, made
    # in the model's dtype, the padding zero and masked.
    short = {i: _tables(p=3 if i < 2 else 2, seed=11 + i)[i] for i in range(3)}
    e, f = Part(Contribution(prefixes=short), torch.tensor([0])), Part(Contribution(prefixes=_tables(p=4, seed=5)),
                                                                      torch.tensor([1]))
    padded = compose.compose([e, f], 2, dtype=torch.bfloat16)
    for i in range(3):
        inj, n = padded.layers[i], short[i][0].shape[-2]
        assert inj.key.dtype == inj.value.dtype == torch.bfloat16 and inj.key.shape[-2] == 4
        assert torch.equal(inj.key[0, :, :n], short[i][0][0].bfloat16()) and not inj.key[0, :, n:].any()
        assert torch.equal(inj.value[1], f.contribution.prefixes[i][1][0].bfloat16())
        assert inj.prefix_mask.tolist() == [[True] * n + [False] * (4 - n), [True] * 4]
    assert compose.compose([e, f], 2).layers[0].key.dtype == torch.float32


@pytest.mark.parametrize("irregular", ["missing-layer", "lengths-per-layer"])
def test_irregular_parts_go_layer_by_layer(irregular):
    tables = _tables(p=3, seed=4)
    if irregular == "missing-layer":
        del tables[1]
    else:
        tables[2] = _tables(p=2, seed=5)[2]
    a = Part(Contribution(prefixes=tables), torch.tensor([0]))
    b = Part(Contribution(prefixes=_tables(p=3, seed=6)), torch.tensor([1]))
    state = compose.compose([a, b], 2)
    key, _ = _expected([a, b], 2, 3)
    for i in range(3):
        assert torch.equal(state.layers[i].key, key[i])
    assert len({inj.key.untyped_storage().data_ptr() for inj in state.layers.values()}) == 3  # one per layer


def test_parts_without_prefixes_stack_nothing():
    embeds = torch.randn(1, 2, 32)
    a = Part(Contribution(input_prompt=embeds), torch.tensor([0]))
    assert compose.compose([a, Part(Contribution(input_prompt=embeds), torch.tensor([1]))], 2).layers == {}
