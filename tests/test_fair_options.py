"""Issue 23's options: prefix tuning's fixed-scale control (= APT with its gate held at 0.5) and the mean readout."""

import json

import pytest
import torch

import softprompt as sp
from softprompt.loading import HeadSpec, load_base, load_for_inference, load_tokenizer
from softprompt.methods.base import MethodInputs

SPEC = HeadSpec("classification", ["neg", "pos"])


def ids_and_mask(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_scale_multiplies_prefix_keys_and_values(tiny_bert_dir):
    base, _ = load_base(tiny_bert_dir, SPEC)
    full = sp.wrap(base, sp.PrefixConfig(num_virtual_tokens=3, init="random"))
    half = sp.PrefixConfig(num_virtual_tokens=3, init="random", scale=0.5)
    half_model = sp.wrap(load_base(tiny_bert_dir, SPEC)[0], half)
    inputs = MethodInputs(None, torch.ones(1, 4, dtype=torch.long), base.get_input_embeddings(), 1)
    a, b = full.method(inputs).prefixes, half_model.method(inputs).prefixes
    for layer in a:
        assert torch.equal(b[layer][0], 0.5 * a[layer][0]) and torch.equal(b[layer][1], 0.5 * a[layer][1])
    # The saved tables are the parameters, not the scaled prefixes.
    assert torch.equal(full.method.tables["0"], half_model.method.tables["0"])


def test_fixed_scale_control_equals_apt_with_gate_at_half(tiny_bert_dir):
    """APT with zero gate weights and lambda 1 scales its prefix by exactly 0.5: the control must match it."""
    tok = load_tokenizer(tiny_bert_dir)
    ids, mask = ids_and_mask(tok, ["the film was very good", "bad"])
    control = sp.wrap(load_base(tiny_bert_dir, SPEC)[0], sp.PrefixConfig(num_virtual_tokens=3, scale=0.5))
    apt = sp.wrap(load_base(tiny_bert_dir, SPEC)[0], sp.APTConfig(num_virtual_tokens=3, gate_init="zeros"))
    control.eval()
    apt.eval()
    with torch.no_grad():
        torch.testing.assert_close(control(input_ids=ids, attention_mask=mask).logits,
                                   apt(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-6)


def test_scale_is_validated():
    with pytest.raises(sp.ConfigError, match="scale"):
        sp.PrefixConfig(scale=0.0)
    with pytest.raises(sp.ConfigError, match="scale"):
        sp.APTConfig(scale=0.5)


def test_mean_readout_reads_the_masked_mean(tiny_bert_dir):
    tok = load_tokenizer(tiny_bert_dir)
    base, _ = load_base(tiny_bert_dir, SPEC, readout="mean", head_seed=3)
    model = sp.wrap(base, sp.PromptTuningConfig(num_virtual_tokens=2))
    model.eval()
    ids, mask = ids_and_mask(tok, ["the film was very good", "bad"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :3], attention_mask=mask[1:, :3]).logits
        # By hand: the classifier on the mean of the last hidden states over the real (and prompt) positions.
        inputs, state, _ = model.build_state(ids, mask, None)
        hidden = base.bert(**inputs, softprompt_state=state).last_hidden_state
        m = inputs["attention_mask"][..., None].float()
        by_hand = base.classifier((hidden * m).sum(1) / m.sum(1))
    torch.testing.assert_close(logits, by_hand)
    torch.testing.assert_close(logits[1:], alone, rtol=1e-5, atol=1e-6)  # padding does not change a row


def test_readout_is_validated(tiny_bert_dir):
    with pytest.raises(sp.ConfigError, match="readout"):
        load_base(tiny_bert_dir, SPEC, readout="cls")


@pytest.mark.parametrize("method,options", [("idspam", {"num_virtual_tokens": 2, "bottleneck": 4}),
                                            ("prefix", {"num_virtual_tokens": 2})])
def test_mean_readout_round_trip_is_exact(method, options, tiny_bert_dir, sentiment_csv, tmp_path):
    from softprompt.train import TrainConfig, train

    out = tmp_path / "run"
    train(TrainConfig(method=method, model=tiny_bert_dir, output=str(out), file=sentiment_csv,
                      text_column="sentence", label_column="sentiment", max_steps=3, batch_size=8, max_length=16,
                      seed=2, readout="mean", method_options=options))
    assert json.loads((out / "adapter_config.json").read_text())["readout"] == "mean"
    model, tok, _ = load_for_inference(out)
    assert type(model.base_model.bert.pooler).__name__ == "MeanPoolReadout"
    ids, mask = ids_and_mask(tok, ["the film was very good", "bad"])
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).logits
    again, _, _ = load_for_inference(out)
    with torch.no_grad():
        assert torch.equal(first, again(input_ids=ids, attention_mask=mask).logits)
    saved = sp.load(load_base(tiny_bert_dir, SPEC, readout="mean")[0], out)
    with torch.no_grad():
        assert torch.equal(first, saved(input_ids=ids, attention_mask=mask).logits)


def test_mean_readout_follows_the_adapter_into_load_and_serving(tiny_bert_dir, sentiment_csv, tmp_path):
    """``sp.load`` onto a plain (pooler) base and the multi-adapter model serving it read what training read."""
    from softprompt.errors import AdapterMismatchError
    from softprompt.multi import MultiAdapterModel
    from softprompt.train import TrainConfig, train

    out = tmp_path / "mean"
    train(TrainConfig(method="prefix", model=tiny_bert_dir, output=str(out), file=sentiment_csv,
                      text_column="sentence", label_column="sentiment", max_steps=2, batch_size=8, max_length=16,
                      readout="mean", method_options={"num_virtual_tokens": 2}))
    reference, tok, _ = load_for_inference(out)
    ids, mask = ids_and_mask(tok, ["the film was very good", "bad"])
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits
        plain = sp.load(load_base(tiny_bert_dir, SPEC)[0], out)  # the base reads its pooler until the adapter says
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, want)
    served = MultiAdapterModel(tiny_bert_dir, {"m": str(out)})
    assert torch.equal(served(ids, mask, "m"), want)
    with pytest.raises(AdapterMismatchError, match="readout 'mean'"):
        MultiAdapterModel(load_base(tiny_bert_dir, SPEC)[0], {"m": str(out)})
