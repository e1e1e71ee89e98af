"""The composer's less common layouts (engine/compose.py), each checked against the same rows run alone with their
own contribution, in float64: per-layer stacking when parts differ from layer to layer, per-row prefix tables,
static insertions of several parts, gates of different head layouts merged into one, an additive float mask with
per-row prefix lengths, and the resolved prefixes that generation reuses."""

import pytest
import torch
from conftest import tiny

from softprompt.engine.compose import Contribution, HookShape, Part, compose, resolved_prefixes
from softprompt.engine.injector import attach
from softprompt.engine.state import InjectionState, Insertion, LayerInjection

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _tables(rows: int, length: int, seed: int, heads: int = 2):
    return _randn(rows, heads, length, 8, seed=seed), _randn(rows, heads, length, 8, seed=seed + 1000)


def _model(kind: str):
    base = tiny(kind).double().eval()
    attach(base)
    return base


def _batch(kind: str, rows: int):
    """Token ids and a padding mask: left padding for the decoder, right padding for the encoder."""
    ids = torch.randint(3, 100, (rows, 7), generator=torch.Generator().manual_seed(rows))
    mask = torch.ones_like(ids)
    if kind == "llama":
        mask[0, :2] = 0
        mask[-1, :1] = 0
    else:
        mask[0, 5:] = 0
        mask[-1, 6:] = 0
    return ids, mask


def _run(base, ids, mask, state):
    """One forward; decoder positions count real tokens only (as generation and the multi-adapter model do)."""
    kw = {"input_ids": ids, "attention_mask": mask, "softprompt_state": state}
    if base.config.model_type == "llama":
        kw["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return base(**kw).logits


def _check_rows(base, ids, mask, together, alone_state):
    """Each row of ``together`` equals that row run alone (unpadded) with ``alone_state(row)``."""
    for r in range(ids.shape[0]):
        real = mask[r].bool()
        alone = base(input_ids=ids[r][real][None], softprompt_state=alone_state(r)).logits[0]
        got = together[r][real] if together.dim() == 3 else together[r]
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-10, msg=f"row {r}")


@pytest.mark.parametrize("per_row", [False, True], ids=["static-tables", "per-row-tables"])
def test_parts_that_differ_by_layer_are_stacked_layer_by_layer(per_row):
    """Part A has prefixes in layers 0-2 (layer 2 longer), part B in layers 0-1 only, so they cannot be stacked all
    at once. Layers 0 and 1 (one length, every row covered) carry no ``prefix_mask`` and the fused kernels stay
    usable; layer 2 hides its columns from B's rows. Every row equals the row alone with its own prefixes, for
    static [1, ...] tables and for per-row [rows, ...] tables alike."""
    base = _model("llama")
    ids, mask = _batch("llama", 4)
    n = 2 if per_row else 1
    a = {0: _tables(n, 3, 1), 1: _tables(n, 3, 2), 2: _tables(n, 5, 3)}
    b = {0: _tables(n, 3, 4), 1: _tables(n, 3, 5)}
    rows = {"a": torch.tensor([0, 2]), "b": torch.tensor([1, 3])}
    state = compose([Part(Contribution(prefixes=a), rows["a"]), Part(Contribution(prefixes=b), rows["b"])], 4, mask)
    assert state.layers[0].prefix_mask is None and state.layers[1].prefix_mask is None
    assert state.layers[2].prefix_mask.tolist() == [[True] * 5, [False] * 5, [True] * 5, [False] * 5]

    def alone(r):
        own, j = (a, r // 2) if r in (0, 2) else (b, r // 2)
        j = j if per_row else 0
        return InjectionState(layers={i: LayerInjection(k[j:j + 1], v[j:j + 1]) for i, (k, v) in own.items()})

    with torch.no_grad():
        _check_rows(base, ids, mask, _run(base, ids, mask, state), alone)


@pytest.mark.parametrize("layer_by_layer", [False, True], ids=["all-layers", "layer-by-layer"])
def test_parts_in_another_dtype_are_stacked_in_the_models(layer_by_layer):
    """fp32 tables for a float64 model: with ``dtype`` the composer stacks them in float64 (attention then casts
    nothing), on the all-layers path and on the layer-by-layer one, and every row still equals the row alone, whose
    fp32 prefix attention casts itself."""
    base = _model("llama")
    ids, mask = _batch("llama", 4)

    def f32(length, seed):
        return tuple(t.float() for t in _tables(1, length, seed))

    a = {0: f32(3, 1), 1: f32(3, 2)} | ({2: f32(5, 3)} if layer_by_layer else {2: f32(3, 3)})
    b = {0: f32(3, 4), 1: f32(3, 5)} | ({} if layer_by_layer else {2: f32(3, 6)})
    rows = {"a": torch.tensor([0, 2]), "b": torch.tensor([1, 3])}
    parts = [Part(Contribution(prefixes=a), rows["a"]), Part(Contribution(prefixes=b), rows["b"])]
    state = compose(parts, 4, mask, dtype=F64)
    # Layer by layer, layers 0-1 take the uniform path (cast while stacked) and layer 2, which only A's rows see,
    # the padded one, whose buffer is made in the model's dtype: attention casts nothing on either.
    assert [(state.layers[i].key.dtype, state.layers[i].value.dtype) for i in range(3)] == [(F64, F64)] * 3
    assert (state.layers[2].prefix_mask is not None) == layer_by_layer

    def alone(r):
        own = a if r in (0, 2) else b
        return InjectionState(layers={i: LayerInjection(k, v) for i, (k, v) in own.items()})

    with torch.no_grad():
        _check_rows(base, ids, mask, _run(base, ids, mask, state), alone)


@pytest.mark.parametrize("kind,at", [("bert", 1), ("llama", 0)])
def test_static_insertions_of_several_parts_reach_their_own_rows(kind, at):
    """Two parts insert their own vectors before layer 1 and no part has a layer hook: the insertion is stacked row
    by row at compose time. Encoder rows get them as hidden rows, decoder rows as the prefixes they turn into; each
    row equals the row alone with its own insertion."""
    base = _model(kind)
    ids, mask = _batch(kind, 3)
    vectors = {0: _randn(1, 2, 32, seed=6), 1: _randn(1, 2, 32, seed=7)}
    rows = [torch.tensor([0, 2]), torch.tensor([1])]
    parts = [Part(Contribution(insertion=Insertion(1, vectors[i], at=at)), rows[i]) for i in (0, 1)]
    state = compose(parts, 3, mask)
    assert state.layer_hook is None and state.insertion.vectors.shape == (3, 2, 32)

    def alone(r):
        return InjectionState(insertion=Insertion(1, vectors[1 if r == 1 else 0], at=at))

    with torch.no_grad():
        together = _run(base, ids, mask, state)
        _check_rows(base, ids, mask, together, alone)
        bare = _run(base, ids, mask, None)
    assert (together - bare).abs().max() > 1e-6


@pytest.mark.parametrize("order", ["ab", "ba"])
@pytest.mark.parametrize("mode", ["kv", "v"])
def test_gates_of_one_and_of_several_heads_merge_row_by_row(mode, order):
    """Layer hooks run on their own rows: part A gates its prefix with one gate per column ([b, P]), part B with
    one per kv head ([b, H, P]), part C has no hook (gate 1). The merged gate [G, H, P] gives every row the result
    of its own gate alone, on keys and values ("kv") or on values only ("v"), whichever gate is merged first."""
    base = _model("llama")
    ids, mask = _batch("llama", 4)
    gates = {"a": _randn(1, 3, seed=8).sigmoid(), "b": _randn(2, 2, 3, seed=9).sigmoid()}
    prefixes = {name: {i: _tables(1, 3, 10 + 3 * i + j) for i in range(3)} for j, name in enumerate("abc")}
    seen = []

    def gate_hook(name):
        def hook(index, hidden, own):
            seen.append((name, index, hidden.shape[0]))
            own.layer(index).gate = gates[name]
        return hook

    rows = {"a": torch.tensor([0]), "b": torch.tensor([1, 2]), "c": torch.tensor([3])}
    parts = [Part(Contribution(prefixes=prefixes[n], layer_hook=gate_hook(n)), rows[n], HookShape(gate=mode))
             for n in order] + [Part(Contribution(prefixes=prefixes["c"]), rows["c"])]
    state = compose(parts, 4, mask)

    def alone(r):
        name = "a" if r == 0 else "c" if r == 3 else "b"
        gate = None if name == "c" else gates[name][r - 1:r] if name == "b" else gates[name]
        return InjectionState(layers={i: LayerInjection(k, v, gate=gate, gate_values_only=mode == "v")
                                      for i, (k, v) in prefixes[name].items()})

    with torch.no_grad():
        together = _run(base, ids, mask, state)
        _check_rows(base, ids, mask, together, alone)
    assert seen == [(n, i, len(rows[n])) for i in range(3) for n in order]
    assert state.layers[0].gate.shape == (4, 2, 3) and state.layers[0].gate_values_only == (mode == "v")


def test_additive_float_mask_hides_shorter_prefixes_like_a_2d_mask():
    """Prefixes of 4 and 2 columns in one encoder batch (the shorter padded and hidden per row) under a caller's
    additive float mask [B, 1, 1, N] (0 / dtype min): the same logits as with the 2D padding mask, and each row
    equals the row alone with its own prefix."""
    base = _model("bert")
    ids, mask = _batch("bert", 3)
    long, short = ({i: _tables(1, p, 20 + 10 * p + i, heads=4) for i in range(3)} for p in (4, 2))
    rows = [torch.tensor([0, 2]), torch.tensor([1])]
    parts = [Part(Contribution(prefixes=long), rows[0]), Part(Contribution(prefixes=short), rows[1])]
    additive = torch.zeros(3, 1, 1, 7, dtype=F64).masked_fill(mask[:, None, None, :] == 0, torch.finfo(F64).min)

    def alone(r):
        own = short if r == 1 else long
        return InjectionState(layers={i: LayerInjection(k, v) for i, (k, v) in own.items()})

    with torch.no_grad():
        with_float = base(input_ids=ids, attention_mask=additive, softprompt_state=compose(parts, 3, mask)).logits
        with_2d = base(input_ids=ids, attention_mask=mask, softprompt_state=compose(parts, 3, mask)).logits
        _check_rows(base, ids, mask, with_float, alone)
    torch.testing.assert_close(with_float, with_2d, rtol=0, atol=1e-12)


@pytest.mark.parametrize("with_other", [False, True], ids=["alone", "beside-another-part"])
def test_a_contribution_s_own_prefix_mask_hides_columns_row_by_row(with_other):
    """A contribution whose rows see different numbers of its prefix columns (``prefix_mask``, as a decoding batch's
    stacked prefixes do): covering the batch alone, its masks become the layers' masks as they are; beside another
    part they are merged into the batch's mask. Each row equals the row alone with only the columns it sees."""
    base = _model("llama")
    rows = 3 if with_other else 2
    ids, mask = _batch("llama", rows)
    own = {0: _tables(2, 4, 40), 2: _tables(2, 4, 41)}
    seen = torch.tensor([[True] * 4, [True, True, False, False]])
    other = {0: _tables(1, 3, 42), 2: _tables(1, 3, 43)}
    parts = [Part(Contribution(prefixes=own, prefix_mask={0: seen, 2: seen}), torch.tensor([0, 1]))]
    if with_other:
        parts.append(Part(Contribution(prefixes=other), torch.tensor([2])))
    state = compose(parts, rows, mask)
    if with_other:
        assert state.layers[0].prefix_mask.tolist() == [[True] * 4, [True, True, False, False], [True] * 3 + [False]]
        assert state.layers[2].prefix_mask is state.layers[0].prefix_mask  # equal visibility: one mask, built once
    else:
        assert state.layers[0].prefix_mask is seen and state.layers[2].prefix_mask is seen

    def alone(r):
        if r == 2:
            return InjectionState(layers={i: LayerInjection(k, v) for i, (k, v) in other.items()})
        n = 4 if r == 0 else 2
        return InjectionState(layers={i: LayerInjection(k[r:r + 1, :, :n], v[r:r + 1, :, :n])
                                      for i, (k, v) in own.items()})

    with torch.no_grad():
        _check_rows(base, ids, mask, _run(base, ids, mask, state), alone)


def test_resolved_prefixes_replay_a_finished_forward_without_hooks():
    """After a no-grad forward, ``resolved_prefixes`` gives each layer's prefix as attention used it: the gate
    applied, an insertion turned into prefixes, zero-length layers left out. A state made of those plain prefixes
    gives exactly the same logits, with no hook and no insertion."""
    base = _model("llama")
    ids = torch.tensor([[5, 17, 33, 8, 60]])
    k, v = _tables(1, 3, 30)
    gate = _randn(1, 3, seed=31).sigmoid()
    empty = torch.zeros(1, 2, 0, 8, dtype=F64)
    state = InjectionState(layers={0: LayerInjection(empty, empty), 1: LayerInjection(k, v, gate=gate)},
                           insertion=Insertion(2, _randn(1, 2, 32, seed=32)))
    with torch.no_grad():
        first = base(input_ids=ids, softprompt_state=state).logits
        resolved = resolved_prefixes(state, F64, torch.device("cpu"))
        replay = InjectionState(layers={i: LayerInjection(pk, pv) for i, (pk, pv) in resolved.items()})
        again = base(input_ids=ids, softprompt_state=replay).logits
        bare = base(input_ids=ids).logits
    assert sorted(resolved) == [1, 2] and resolved[2][0].shape == (1, 2, 2, 8)
    torch.testing.assert_close(resolved[1][1], v * gate[:, None, :, None], rtol=0, atol=0)
    assert torch.equal(again, first) and (first - bare).abs().max() > 1e-6
