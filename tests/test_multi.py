"""Mixed-adapter batches: every row of a batch under its own adapter equals that adapter run alone on that row.

The references are :class:`softprompt.SoftPromptModel` instances loaded from the same folders onto fresh copies of
the base model and run on one unpadded row at a time, so the test also checks padding, prompt slots, per-row heads
and the grouping of rows into backbone passes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny
from test_multi_helpers import ADAPTERS, make_adapters, make_tiny_base_dir, texts

import softprompt as sp
from softprompt.errors import AdapterMismatchError, ConfigError, SequenceTooLongError
from softprompt.loading import HeadSpec, load_base
from softprompt.multi import ENGINE_PREFIX_MASK, MultiAdapterModel, UnknownAdapterError

TOL = dict(atol=1e-5, rtol=1e-5)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only contend


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_tiny_base_dir(tmp_path_factory.mktemp("multi") / "base")


@pytest.fixture(scope="module")
def adapter_dirs(base_dir, tmp_path_factory):
    return make_adapters(base_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def fresh_base(base_dir):
    """The base model the adapters were made on (same seeded head), built once and copied per use."""
    base, _ = load_base(base_dir, HeadSpec("classification", ["neg", "pos"]))
    return lambda: copy.deepcopy(base)


@pytest.fixture(scope="module")
def multi(base_dir, adapter_dirs, fresh_base):
    from softprompt.loading import load_tokenizer

    return MultiAdapterModel(fresh_base(), adapter_dirs, tokenizer=load_tokenizer(base_dir))


@pytest.fixture(scope="module")
def reference(adapter_dirs, fresh_base, base_dir):
    """reference(name, ids_row) -> logits of that adapter alone on one unpadded row (None: the bare base)."""
    cache: dict = {}
    bare = fresh_base().eval()

    def run(name, ids, token_types=None):
        if name is None:
            model = bare
        else:
            if name not in cache:
                kind = ADAPTERS[name][3]
                base, _ = load_base(base_dir, HeadSpec(kind, ADAPTERS[name][2]))
                cache[name] = sp.load(base, adapter_dirs[name]).eval()
            model = cache[name]
        with torch.no_grad():
            kw = {"token_type_ids": token_types[None]} if token_types is not None else {}
            return model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], **kw).logits[0]

    return run


def count_backbone_passes(model: MultiAdapterModel):
    calls = []
    handle = model.injector.backbone.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def check_rows_equal_alone(multi, reference, names, seed=0, pairs=False):
    """Run one mixed batch; compare every row with its adapter alone; return the number of backbone passes."""
    tx = texts(len(names), seed)
    tp = texts(len(names), seed + 1) if pairs else None
    batch = multi.encode(tx, names, tp)
    calls, handle = count_backbone_passes(multi)
    before = multi.stats.backbone_passes
    try:
        out = multi(batch["input_ids"], batch["attention_mask"], names, batch.get("token_type_ids"))
    finally:
        handle.remove()
    assert out.shape[0] == len(names)
    for i, name in enumerate(names):
        keep = batch["attention_mask"][i].bool()
        tt = batch["token_type_ids"][i][keep] if "token_type_ids" in batch else None
        ref = reference(name, batch["input_ids"][i][keep], tt)
        torch.testing.assert_close(out[i, : ref.shape[-1]], ref, **TOL,
                                   msg=lambda m, i=i, name=name: f"row {i} ({name}): {m}")
        assert torch.isinf(out[i, ref.shape[-1]:]).all()  # columns of wider heads: -inf
    assert len(calls) == multi.stats.backbone_passes - before  # the model's own counter agrees
    return len(calls)


@pytest.mark.parametrize("group", [
    ["prefix_a", "prefix_b", "apt", "score"],          # deep prefixes of the same length (APT gates mixed in)
    ["prompt_front", "prompt_cls", "ptuning", None],  # input prompts of 3, 5, 4 tokens (two positions) + bare rows
    ["lpt", "lpt_npg", "idspam"],                     # insertions at the same layer: static, generated, ID-SPAM
])
def test_compatible_adapters_share_one_backbone_pass(multi, reference, group):
    names = [group[i % len(group)] for i in range(3 * len(group))]
    names = names[1:] + names[:1]  # not sorted by adapter
    assert check_rows_equal_alone(multi, reference, names, seed=len(group)) == 1


def test_every_method_and_length_mixed_equals_alone(multi, reference):
    names = [*ADAPTERS, None] * 2
    gen = torch.Generator().manual_seed(3)
    names = [names[int(i)] for i in torch.randperm(len(names), generator=gen)]
    passes = check_rows_equal_alone(multi, reference, names, seed=7)
    # Without a per-row prefix mask in the engine: same-length prefixes | other prefix lengths | prompts and bare
    # rows | insertions. With it, prefixes, prompts and bare rows share one pass.
    assert passes == (2 if ENGINE_PREFIX_MASK else 4)
    assert passes == len(multi.plan(names))


def test_text_pairs_and_token_types(multi, reference):
    names = ["prefix_a", "prompt_cls", "lpt", None, "prefix_long", "ptuning"]
    batch = multi.encode(texts(2, 1), names[:2], texts(2, 2))
    assert batch["token_type_ids"].max() == 1  # second segments are typed, prompts get type 0 inside
    check_rows_equal_alone(multi, reference, names, seed=11, pairs=True)


def test_all_adapters_equals_separate_runs(multi):
    tx = texts(5, 21)
    batch = multi.encode(tx, None)  # one tokenisation (no adapter's max_length is below these lengths)
    calls_before = multi.stats.forward_calls
    every = multi.all_adapters(batch["input_ids"], batch["attention_mask"])
    assert multi.stats.forward_calls == calls_before + 1
    assert set(every) == set(multi.adapter_names)
    for name, logits in every.items():
        alone = multi(batch["input_ids"], batch["attention_mask"], name)
        width = multi.adapter(name).num_labels
        assert logits.shape == (5, width)
        torch.testing.assert_close(logits, alone[:, :width], **TOL)


def test_predict_matches_the_single_adapter_predict(multi, adapter_dirs):
    from softprompt.train import predict

    tx = texts(6, 5)
    names = ["prefix_b", "prompt_front", "idspam", "score", "prefix_b", "apt"]
    rows = multi.predict(tx, names)
    for text, name, row in zip(tx, names, rows):
        ref = predict(adapter_dirs[name], [text])[0]
        assert row["adapter"] == name
        assert row["score"] == pytest.approx(ref["score"], abs=1e-5)
        if name != "score":
            assert row["label"] == ref["label"]
            assert list(row["scores"]) == ADAPTERS[name][2]


def test_add_remove_and_errors(base_dir, adapter_dirs, fresh_base, tmp_path):
    model = MultiAdapterModel(fresh_base(), {"a": adapter_dirs["prefix_a"]})
    ids = torch.randint(4, 20, (2, 5))
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'b'"):
        model(ids, adapter_names=["a", "b"])
    model.add_adapter("b", adapter_dirs["prompt_front"])
    assert model.adapter_names == ["a", "b"]
    out = model(ids, adapter_names=["a", "b"])
    torch.testing.assert_close(out[1], model(ids[1:], adapter_names="b")[0], **TOL)
    with pytest.raises(ConfigError, match="already loaded"):
        model.add_adapter("a", adapter_dirs["prefix_b"])
    model.remove_adapter("a")
    with pytest.raises(UnknownAdapterError):
        model(ids, adapter_names="a")
    with pytest.raises(UnknownAdapterError):
        model.remove_adapter("a")
    with pytest.raises(ConfigError, match="2 entries for a batch of 3"):
        model(torch.randint(4, 20, (3, 5)), adapter_names=["b", "b"])
    # An adapter made for another base model (hidden size 48) is refused with both values named.
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=40, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, num_labels=2)
    other = sp.wrap(tf.BertForSequenceClassification(cfg), sp.PrefixConfig(num_virtual_tokens=2))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterMismatchError, match="hidden_size: adapter 48 vs model 32"):
        model.add_adapter("other", tmp_path / "other")
    assert model.adapter_names == ["b"]
    # Too long: 60 tokens + 3 prompt tokens > 64 positions.
    with pytest.raises(SequenceTooLongError, match="exceeds the position limit 64"):
        model(torch.randint(4, 20, (1, 62)), adapter_names="b")


def test_rows_that_would_pass_the_position_limit_run_apart(multi, reference):
    """A 60-token bare row and a 5-token prompt row fit alone (64 positions) but not padded together."""
    ids = torch.randint(4, 20, (2, 60))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    out = multi(ids, mask, [None, "prompt_cls"])
    torch.testing.assert_close(out[0, :2], reference(None, ids[0]), **TOL)
    torch.testing.assert_close(out[1, :3], reference("prompt_cls", ids[1, :10]), **TOL)


def _saved(model_fn, config, path, **meta):
    model = sp.wrap(model_fn(), config)
    gen = torch.Generator().manual_seed(len(str(path)))
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(path, **meta)
    return str(path)


@pytest.mark.parametrize("family", ["llama_cls", "bert_tok"])
def test_decoders_and_token_level_heads(family, tmp_path):
    """Causal decoders (left padding, slots in front, last-token pooling) and per-token outputs (slots stripped)."""
    if family == "llama_cls":
        make = lambda: tiny("llama", task="cls")
        pad_left = True
    else:
        make = lambda: tiny("bert", task="tok")
        pad_left = False
    configs = {
        "p2": sp.PromptTuningConfig(num_virtual_tokens=2),
        "p5": sp.PromptTuningConfig(num_virtual_tokens=5),
        "prefix": sp.PrefixConfig(num_virtual_tokens=3),
        "lpt": sp.LatePromptConfig(num_virtual_tokens=2, layer=1),
    }
    dirs = {n: _saved(make, c, tmp_path / n) for n, c in configs.items()}
    model = MultiAdapterModel(make(), dirs)
    refs = {n: sp.load(make(), d).eval() for n, d in dirs.items()}
    refs[None] = make().eval()
    names = ["p2", "prefix", "p5", None, "lpt", "p2", "p5", "prefix"]
    lengths = [3, 7, 5, 6, 4, 7, 2, 5]
    gen = torch.Generator().manual_seed(0)
    ids = torch.full((len(names), 7), 0)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        row = torch.randint(3, 100, (n,), generator=gen)
        if pad_left:
            ids[i, 7 - n:], mask[i, 7 - n:] = row, 1
        else:
            ids[i, :n], mask[i, :n] = row, 1
    out = model(ids, mask, names)
    for i, name in enumerate(names):
        keep = mask[i].bool()
        with torch.no_grad():
            ref = refs[name](input_ids=ids[i][keep][None]).logits[0]
        got = out[i][keep] if out.dim() == 3 else out[i]
        torch.testing.assert_close(got, ref, **TOL, msg=lambda m, i=i, name=name: f"row {i} ({name}): {m}")


def test_unsupported_heads_are_refused():
    import transformers as tf

    from softprompt.errors import UnsupportedModelError

    cfg = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    with pytest.raises(UnsupportedModelError, match="question answering"):
        MultiAdapterModel(tf.BertForQuestionAnswering(cfg), {})


def test_unpadded_decoder_batch_of_prefix_and_bare_rows(tmp_path):
    """No padding at all (transformers then hands attention no mask): prefixes of two lengths and bare rows on a
    causal decoder. One pass when the engine has a per-row prefix mask, three otherwise; the same numbers."""
    make = lambda: tiny("llama")
    dirs = {
        "p3": _saved(make, sp.PrefixConfig(num_virtual_tokens=3), tmp_path / "p3"),
        "p5": _saved(make, sp.PrefixConfig(num_virtual_tokens=5), tmp_path / "p5"),
    }
    model = MultiAdapterModel(make(), dirs)
    refs = {n: sp.load(make(), d).eval() for n, d in dirs.items()}
    refs[None] = make().eval()
    names = ["p3", None, "p5", "p3", None]
    ids = torch.randint(3, 100, (len(names), 6), generator=torch.Generator().manual_seed(4))
    calls, handle = count_backbone_passes(model)
    try:
        out = model(ids, adapter_names=names)
    finally:
        handle.remove()
    assert len(calls) == (1 if ENGINE_PREFIX_MASK else 3)
    for i, name in enumerate(names):
        with torch.no_grad():
            ref = refs[name](input_ids=ids[i][None]).logits[0]
        torch.testing.assert_close(out[i], ref, **TOL, msg=lambda m, i=i, name=name: f"row {i} ({name}): {m}")


def test_a_frozen_adapter_that_reads_no_inputs_is_computed_once(multi, reference):
    """Prompt tables and static prefixes (``reads_inputs = False``) are the same in every pass of a frozen adapter:
    the model computes them once, and again only when the parameters move to new storage; methods that read their
    inputs (ID-SPAM) run in every pass. Rows stay equal to each adapter alone either way."""
    names = ["prefix_a", "idspam", "prompt_front", "prefix_a"]
    calls: list[str] = []
    for name in set(names):
        multi.adapter(name)._fixed = None  # as just loaded (earlier tests of this module used the adapters)
        method = multi.adapter(name).method
        method.forward = lambda inputs, m=method, n=name: (calls.append(n), type(m).forward(m, inputs))[1]
    try:
        for seed in (0, 1):
            check_rows_equal_alone(multi, reference, names, seed=seed)
        assert sorted(calls) == ["idspam", "idspam", "prefix_a", "prompt_front"]
        for p in multi.adapter("prefix_a").method.parameters():
            p.data = p.data.clone()  # new storage (as after a move to another device or dtype)
        check_rows_equal_alone(multi, reference, names, seed=2)
        assert calls.count("prefix_a") == 2 and calls.count("prompt_front") == 1
    finally:
        for name in set(names):
            del multi.adapter(name).method.forward


def test_methods_that_declare_they_read_no_inputs_give_one_contribution_for_any_inputs(multi):
    """What ``reads_inputs = False`` promises, checked on every such adapter: other tokens, another batch size, same
    contribution (the cache above would otherwise serve one input's contribution to another)."""
    from softprompt.methods import MethodInputs

    embed = multi.base_model.get_input_embeddings()
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(5, 90, (2, 6), generator=gen)
    b = torch.randint(5, 90, (3, 9), generator=gen)
    checked = []
    for name in multi.adapter_names:
        method = multi.adapter(name).method
        if method.reads_inputs:
            continue
        with torch.no_grad():
            one = method(MethodInputs(a, torch.ones_like(a), embed, 2))
            two = method(MethodInputs(b, torch.ones_like(b), embed, 3))
        tensors = lambda c: [c.input_prompt] + [t for kv in c.prefixes.values() for t in kv]
        assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(tensors(one), tensors(two))), name
        assert one.prompt_at == two.prompt_at and one.insertion is None and one.layer_hook is None
        checked.append(method.config.method)
    assert {"prompt", "ptuning", "prefix"} <= set(checked)


def test_encode_truncates_each_row_to_its_own_adapters_limit(base_dir, adapter_dirs, fresh_base):
    """``encode`` truncates every row to its own adapter's ``max_length`` (the bare model's: 128), and never past
    the model's 64 positions less those the adapter adds (prompt_cls: 5 prompt tokens, lpt: 2 inserted vectors):
    rows of one batch get different lengths."""
    from softprompt.loading import load_tokenizer

    names = ("prefix_a", "prompt_cls", "lpt")
    model = MultiAdapterModel(fresh_base(), {n: adapter_dirs[n] for n in names}, tokenizer=load_tokenizer(base_dir))
    model.adapter("prefix_a").meta["max_length"] = 5
    model.adapter("prompt_cls").meta["max_length"] = 100
    assert model.adapter("lpt").max_length == 12  # as saved
    batch = model.encode([" ".join(["good"] * 80)] * 4, [*names, None])
    assert batch["attention_mask"].sum(1).tolist() == [5, 59, 12, 64]
