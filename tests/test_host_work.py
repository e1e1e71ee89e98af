"""Host work per layer call (issue 18, part 2): layers wrapped without module hooks, masks and dummy query rows built
once per forward, the multi-adapter path's index copies and syncs (prefixes cast, expanded and stacked once per
forward: test_host_work_prefixes.py).

Outputs stay exact: every change here is checked against the plain computation (``torch.equal``), and the parity
tests (tests/test_parity_peft.py, tests/test_engine*.py, tests/test_multi.py) run the same paths end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers.host_work import _ids
from conftest import tiny

import softprompt as sp
from softprompt.engine import attention
from softprompt.engine.injector import _LayerCall
from softprompt.engine.state import STATE_KWARG, InjectionState, LayerInjection
from softprompt.multi.batch import row_indices, run_rows, trim_bounds
from softprompt.multi.heads import scatter_rows

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- layer wrappers instead of module hooks ------------------------------------------------------------------------
def test_layers_carry_no_module_hooks_and_detach_restores_their_forward():
    base = tiny("llama")
    own = base.model.layers[1].forward  # an instance forward that was there before (accelerate patches them so)
    base.model.layers[1].forward = own
    model = sp.wrap(base, sp.LatePromptConfig(num_virtual_tokens=2, layer=1))
    ids, mask = _ids(pad_from=4)
    want = model(input_ids=ids, attention_mask=mask).logits
    for block in base.model.layers:
        assert isinstance(block.forward, _LayerCall)
        assert not block._forward_pre_hooks and not block._forward_hooks
    model.injector.detach()
    assert "forward" not in base.model.layers[0].__dict__  # the class's forward again
    assert base.model.layers[1].forward is own
    model.injector.detach()  # twice: nothing left to restore
    # Unwrapped layers run the insertion no more: the model is the bare one again.
    bare = base(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(want, bare)


def test_deepcopy_of_a_wrapped_model_runs_the_copys_own_layers():
    model = sp.wrap(tiny("llama"), sp.APTConfig(num_virtual_tokens=3)).eval()
    twin = copy.deepcopy(model)
    ids, mask = _ids(pad_from=5)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        twin.base_model.model.layers[0].mlp.down_proj.weight.zero_()
        changed = twin(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, again) and not torch.equal(before, changed)
    assert twin.base_model.model.layers[0].forward.forward.__self__ is twin.base_model.model.layers[0]


def test_a_layer_without_a_state_is_called_as_it_is():
    model = sp.wrap(tiny("llama"), sp.PrefixConfig(num_virtual_tokens=2))
    layer = model.base_model.model.layers[0]
    calls = []
    wrapper = _LayerCall(model.injector, 0, lambda *a, **k: calls.append((a, k)) or "out", False)
    assert wrapper("h", x=1) == "out" and wrapper("h", **{STATE_KWARG: None}) == "out"
    assert calls == [(("h",), {"x": 1}), (("h",), {STATE_KWARG: None})]
    assert layer.forward.last is False and model.base_model.model.layers[-1].forward.last is True


# ---- masks and dummy query rows built once per forward ---------------------------------------------------------------
def _run(model, ids, mask):
    inputs, state, _ = model.build_state(ids, mask, None)
    return model.base_model(**inputs, **{STATE_KWARG: state}), state


def _count(monkeypatch, name):
    calls = []
    real = getattr(attention, name)
    monkeypatch.setattr(attention, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_the_padded_prefix_mask_is_built_once_per_forward(monkeypatch):
    calls = _count(monkeypatch, "_prefix_mask")
    model = sp.wrap(tiny("llama"), sp.PrefixConfig(num_virtual_tokens=3)).train()
    ids, mask = _ids(pad_from=4)
    out, state = _run(model, ids, mask)
    out.logits.sum().backward()
    assert len(calls) == 1 and set(state.scratch) == {"mask"}
    # A new source (another mask) replaces the slot; an unchanged one is a hit.
    slot = state.scratch["mask"]
    assert attention._reuse(state, "mask", *slot[:2], lambda: None) is slot[2]
    assert attention._reuse(state, "mask", (mask.clone(), None), slot[1], lambda: "new") == "new"
    assert attention._reuse(state, "mask", (mask.clone(), None), (0,), lambda: "other") == "other"


def test_the_dummy_query_rows_are_allocated_once_per_forward():
    model = sp.wrap(tiny("qwen2"), sp.PrefixConfig(num_virtual_tokens=3)).train()
    ids, _ = _ids()
    _, bare_state = _run(sp.wrap(tiny("qwen2"), sp.PromptTuningConfig(num_virtual_tokens=3)), ids, None)
    out, state = _run(model, ids, None)
    assert set(state.scratch) == {"dummy"} and not bare_state.scratch
    dummy = state.scratch["dummy"][2]
    assert dummy.shape == (2, 4, 3, 8) and not dummy.any() and not dummy.requires_grad
    out.logits.sum().backward()  # the shared rows are a constant: backward needs nothing from them


def test_an_inserted_prompt_grows_the_mask_once_per_forward(monkeypatch):
    calls = _count(monkeypatch, "_grow_mask_for_insertion")
    model = sp.wrap(tiny("bert", task="cls"), sp.LatePromptConfig(num_virtual_tokens=2, layer=1))
    ids, mask = _ids(pad_from=4)
    _, state = _run(model, ids, mask)
    assert len(calls) == 1 and "grown" in state.scratch


def test_a_compiled_forward_keeps_nothing_on_the_state(monkeypatch):
    """Under torch.compile the tensors are built in the graph (a stored one would be an extra graph output)."""
    model = sp.wrap(tiny("qwen2"), sp.PrefixConfig(num_virtual_tokens=3)).eval()
    ids, mask = _ids(pad_from=4)
    with torch.no_grad():
        want = _run(model, ids, mask)[0].logits
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        out, state = _run(model, ids, mask)
    assert not state.scratch and torch.equal(out.logits, want)


def test_engine_code_reads_nothing_back_from_tensors():
    """No host sync in the engine: no .item(), .tolist(), bool() or int() of a tensor in a training step of any
    method (transformers' own mask check may do one; it is the bare model's too)."""
    from torch.overrides import TorchFunctionMode

    reads = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
                import traceback

                frames = [f.filename for f in traceback.extract_stack()[:-1]]
                if any("softprompt/engine" in f for f in frames[-3:]):
                    reads.append((name, frames[-3:]))
            return func(*args, **(kwargs or {}))

    configs = [sp.PrefixConfig(num_virtual_tokens=3), sp.APTConfig(num_virtual_tokens=3),
               sp.LatePromptConfig(num_virtual_tokens=2, layer=1), sp.IDSPAMConfig(num_virtual_tokens=2, layer=1)]
    for kind in ("qwen2", "bert"):
        for config in configs:
            model = sp.wrap(tiny(kind, task="lm" if kind == "qwen2" else "cls"), config).train()
            ids, mask = _ids(pad_from=4)
            labels = ids if kind == "qwen2" else torch.tensor([0, 1])
            with Spy():
                model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert not reads


@pytest.mark.parametrize(("causal", "q_len", "hide"), [(True, 2, False), (True, 5, True), (False, 5, True)],
                         ids=["chunked-prefill", "causal-rows-hide-columns", "bidirectional-rows-hide-columns"])
def test_attention_builds_the_mask_a_call_without_one_needs(causal, q_len, hide):
    """No mask from the model, yet one is needed: a causal chunk shorter than the keys (bottom-right causal, P2) or
    rows that hide some prefix columns. Equal to SDPA with the mask written out."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) for n in (q_len, 5, 5))
    pk, pv = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g)
    visible = torch.tensor([[True, True, True], [True, False, False]]) if hide else None
    state = InjectionState(layers={0: LayerInjection(pk, pv, prefix_mask=visible)})
    module = torch.nn.Module()
    module._softprompt_layer, module.is_causal = 0, causal
    out, _ = attention.softprompt_attention(module, q, k, v, None, **{STATE_KWARG: state}, is_causal=causal)
    real = torch.ones(q_len, 5, dtype=torch.bool).tril(5 - q_len) if causal else torch.ones(q_len, 5, dtype=torch.bool)
    cols = (visible if hide else torch.ones(2, 3, dtype=torch.bool))[:, None, None, :].expand(2, 1, q_len, 3)
    mask = torch.cat([cols, real.expand(2, 1, q_len, 5)], dim=-1)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, torch.cat([pk.expand(2, -1, -1, -1), k], 2), torch.cat([pv.expand(2, -1, -1, -1), v], 2), attn_mask=mask)
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-6, rtol=1e-6)
    assert set(state.scratch) == {"mask"}


def test_hidden_states_by_keyword_and_every_output_form_of_the_last_layer():
    """An insertion reaches a block whose hidden states come as a keyword, and is cut from the last block's output
    whether it is a tensor, a tuple or a ModelOutput."""
    from transformers.modeling_outputs import BaseModelOutput

    from softprompt.engine.state import Insertion

    model = sp.wrap(tiny("bert", task="cls"), sp.PrefixConfig(num_virtual_tokens=2))
    injector = model.injector
    h = torch.randn(2, 5, 32)
    state = InjectionState(insertion=Insertion(0, torch.randn(1, 3, 32), at=1))
    args, kwargs = injector._before_layer(0, state, (), {"hidden_states": h, STATE_KWARG: state})
    assert args == () and kwargs["hidden_states"].shape == (2, 8, 32)
    grown = kwargs["hidden_states"]
    assert torch.equal(grown[:, :1], h[:, :1]) and torch.equal(grown[:, 4:], h[:, 1:])
    for out in (grown, (grown, "extra"), BaseModelOutput(last_hidden_state=grown)):
        cut = injector._after_last_layer(state, out)
        first = cut if isinstance(cut, torch.Tensor) else cut[0]
        assert torch.equal(first, h)
    assert injector._after_last_layer(InjectionState(), grown) is grown


# ---- the multi-adapter path: one index copy, one read of the trim bounds, no sync to scatter -------------------------
def test_row_indices_come_from_one_copy():
    first, second = row_indices([[2, 0], [1]], torch.device("cpu"))
    assert first.tolist() == [2, 0] and second.tolist() == [1]
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()


@pytest.mark.parametrize(("mask", "bounds"), [([[0, 1, 1, 0], [0, 0, 1, 0]], (1, 3)), ([[1, 1, 1]], (0, 3)),
                                              ([[0, 0], [0, 0]], (0, 2))])
def test_trim_bounds(mask, bounds):
    assert trim_bounds(torch.tensor(mask)) == bounds


def test_scatter_rows_returns_an_ordered_single_part_as_it_is():
    logits = torch.randn(3, 2)
    assert scatter_rows([(torch.tensor([0, 1, 2]), logits)], 3, in_order=True) is logits
    out = scatter_rows([(torch.tensor([2, 0, 1]), logits)], 3)
    assert torch.equal(out, logits[[1, 2, 0]])


def test_multi_rows_trim_from_the_device_mask_when_no_host_copy_exists(tmp_path):
    from softprompt.multi import MultiAdapterModel

    base = tiny("bert", task="cls")
    sp.wrap(copy.deepcopy(base), sp.PrefixConfig(num_virtual_tokens=2)).save_pretrained(str(tmp_path / "a"))
    multi = MultiAdapterModel(base, {"a": str(tmp_path / "a")})
    ids, mask = _ids(pad_from=4)
    with torch.inference_mode():
        want = multi(ids, mask, ["a", None])
        idx = torch.tensor([0, 1])
        (rows, got), = run_rows(multi, idx, ["a", None], ids, mask, None)
    assert torch.equal(rows, idx) and torch.equal(got, want)
    with torch.inference_mode():
        swapped = multi(ids[[1, 0]], mask[[1, 0]], [None, "a"])
    torch.testing.assert_close(swapped, want[[1, 0]], atol=1e-6, rtol=1e-5)


def test_state_scratch_is_per_forward():
    assert InjectionState().scratch == {} and InjectionState().scratch is not InjectionState().scratch
    assert LayerInjection().prefix_length == 0


@pytest.mark.parametrize("config", [sp.PrefixConfig(num_virtual_tokens=3), sp.APTConfig(num_virtual_tokens=3)],
                         ids=lambda c: c.method)
def test_one_graph_under_autocast_with_and_without_a_mask(config):
    """compose's autocast cast and the per-forward reuse (bypassed while compiling) keep the step one graph."""
    model = sp.wrap(tiny("qwen2"), config).train()
    ids, mask = _ids(pad_from=4)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for kwargs in ({"attention_mask": mask}, {}):
            explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids, **kwargs)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()


def test_stacking_in_the_models_dtype_changes_no_output(tmp_path, monkeypatch):
    """A bf16 model serving fp32 prefix adapters of two lengths in one batch: the outputs with the prefixes stacked
    in bf16 (what ``multi`` now asks compose for) equal, bit for bit, those with fp32 prefixes that attention casts
    layer by layer (the previous path): the rounding happens once either way."""
    from softprompt.multi import MultiAdapterModel, batch

    base = tiny("bert", task="cls")
    for name, n in (("a", 2), ("b", 3)):
        sp.wrap(copy.deepcopy(base), sp.PrefixConfig(num_virtual_tokens=n, init="random", init_std=1.0,
                                                     seed=n)).save_pretrained(str(tmp_path / name))
    multi = MultiAdapterModel(base.to(torch.bfloat16), {n: str(tmp_path / n) for n in "ab"})
    assert next(multi.adapter("a").modules.parameters()).dtype == torch.float32
    ids, mask = _ids(batch=3, pad_from=5)
    seen, plain = [], batch.compose

    def watched(*args, keep_dtype=True, **kwargs):
        if not keep_dtype:  # the previous call: no dtype, attention casts layer by layer
            kwargs.pop("dtype", None)
        state = plain(*args, **kwargs)
        seen.append(state.layers[0].key.dtype)
        return state

    with torch.inference_mode():
        monkeypatch.setattr(batch, "compose", watched)
        now = multi(ids, mask, ["a", "b", None])
        monkeypatch.setattr(batch, "compose", lambda *a, **k: watched(*a, keep_dtype=False, **k))
        then = multi(ids, mask, ["a", "b", None])
    assert seen == [torch.bfloat16, torch.float32] and now.dtype == torch.bfloat16 and torch.equal(now, then)
