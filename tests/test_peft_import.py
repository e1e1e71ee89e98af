"""PEFT's own prompt-learning folders load as softprompt adapters and give PEFT's logits (decoders and encoders),
through ``softprompt.load`` and through the multi-adapter model that serving uses."""

import copy
import json

import pytest
import torch
from conftest import tiny
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

import softprompt as sp
from softprompt.errors import AdapterFormatError
from softprompt.multi import MultiAdapterModel

DECODER = {
    "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "ptuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
}
# PEFT's prefix tuning refuses BERT under transformers 5 ("Model does not support past key values"), so PEFT has no
# encoder prefix logits to compare with; our reading of the prefix layout is covered by the decoder cases.
ENCODER = {
    "prompt": PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
    "ptuning": PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3, encoder_hidden_size=16),
}


def peft_folder(base, config, path, seed, std=0.5):
    """A PEFT model with non-trivial prompt values (and a changed head), saved by PEFT itself."""
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:  # the prompt encoder, and the head copy of modules_to_save
                p.normal_(0, std if "prompt_encoder" in name else 0.2)
    pm.eval()
    pm.save_pretrained(path)
    return pm


@pytest.mark.parametrize("name", sorted(DECODER))
@pytest.mark.parametrize("padded", [False, True])
def test_decoder_logits_equal_peft(name, padded, batch, tmp_path):
    ids, mask = batch
    if not padded:
        mask = torch.ones_like(ids)
    base = tiny("llama").double().eval()
    pm = peft_folder(base, DECODER[name], tmp_path, seed=3)
    ours = sp.load(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids, attention_mask=mask).logits
        bare = base(input_ids=ids, attention_mask=mask).logits
    ref = ref[:, -ids.shape[1]:]  # PEFT's prompt tuning returns logits for its virtual tokens too
    real = mask.bool()
    assert (out - ref)[real].abs().max().item() <= 1e-12
    assert (bare - ref)[real].abs().max().item() > 1e-3  # the adapter matters: the comparison is not vacuous


@pytest.mark.parametrize("name", sorted(ENCODER))
def test_encoder_logits_equal_peft_with_its_head(name, batch, tmp_path):
    ids, mask = batch
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding, as encoders are padded
    base = tiny("bert", pad_token_id=0).double().eval()
    pm = peft_folder(base, ENCODER[name], tmp_path, seed=4)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] in ("PROMPT_TUNING", "P_TUNING")
    ours = sp.load(copy.deepcopy(base), tmp_path)
    assert ours.head_names == ["classifier"]
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids, attention_mask=mask).logits
    assert (out - ref).abs().max().item() <= 1e-12
    multi = MultiAdapterModel(copy.deepcopy(base), {"peft": str(tmp_path)})
    served = multi(ids, mask, ["peft", None, "peft"])
    assert (served[0] - ref[0]).abs().max().item() <= 1e-12
    assert (served[2] - ref[2]).abs().max().item() <= 1e-12


def test_other_peft_types_get_a_clear_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterFormatError, match="'LORA' is not a prompt-learning type"):
        sp.load(tiny("llama"), tmp_path)


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_generation_from_a_peft_folder_equals_peft_greedy(name, tmp_path):
    """Reference: greedy decoding by full forwards of PEFT's own model. (PEFT 0.21's ``generate()`` under
    transformers 5.25 disagrees with its own forward from the first or fourth token on, so it is not the
    reference: the greedy loop of its forward is what the adapter means.)"""
    from softprompt.multi.generation import GenerationEngine, SamplingParams

    # Positions must matter, or a row decoded at a wrong position (or without PEFT's shift of the real tokens by P)
    # would give the same tokens: weights large enough that attention is far from uniform (at the default init std
    # of 0.02 every score is ~0) and a fast rotary base, so that every rotary pair turns within a few positions.
    base = tiny("llama", initializer_range=0.3, rope_parameters={"rope_type": "default", "rope_theta": 10.0})
    base = base.double().eval()
    # Prompt values of std 1 (0.5 is weak beside these weights: decoding without the prefix went unnoticed).
    pm = peft_folder(base, DECODER[name], tmp_path, seed=5, std=1.0)
    prompt = [5, 17, 33, 8, 60]
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            x = torch.tensor([tokens])
            tokens.append(int(pm(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax()))
    engine = GenerationEngine(MultiAdapterModel(copy.deepcopy(base), {"peft": str(tmp_path)}))
    rid = engine.submit(prompt, "peft", SamplingParams(max_new_tokens=6))
    none = engine.submit(prompt, None, SamplingParams(max_new_tokens=6))
    engine.run()
    assert engine.result(rid) == tokens[len(prompt):]
    assert engine.result(none) != tokens[len(prompt):]  # the adapter changes the output
