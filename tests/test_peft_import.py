"""PEFT's own prompt-learning folders load as softprompt adapters and give PEFT's logits (decoders and encoders),
through ``softprompt.load`` and through the multi-adapter model that serving uses."""

import copy
import json

import pytest
import torch
from conftest import tiny
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

import softprompt as sp
from softprompt.errors import AdapterFormatError, SequenceTooLongError
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
    # The real tokens follow PEFT's 5 prefix positions (prefix tuning) or its 4 prompt tokens: both count against
    # the model's 128 positions, so the longest request allowed is 5 + 118 or 5 + 119 tokens.
    most = 128 - len(prompt) - (5 if name == "prefix" else 4)
    with pytest.raises(SequenceTooLongError, match=f"lower max_tokens to at most {most}$"):
        engine.submit(prompt, "peft", SamplingParams(max_new_tokens=most + 1))
    engine.check(prompt, "peft", SamplingParams(max_new_tokens=most))
    rid = engine.submit(prompt, "peft", SamplingParams(max_new_tokens=6))
    none = engine.submit(prompt, None, SamplingParams(max_new_tokens=6))
    engine.run()
    assert engine.result(rid) == tokens[len(prompt):]
    assert engine.result(none) != tokens[len(prompt):]  # the adapter changes the output


def _edited(tmp_path, name, **changes):
    """A decoder PEFT folder of ``name`` saved by PEFT, with fields of its adapter_config.json changed."""
    folder = tmp_path / name
    peft_folder(tiny("llama").double().eval(), DECODER[name], folder, seed=6)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name, changes, message", [
    ("prefix", {"num_transformer_submodules": 2}, "PEFT adapters of encoder-decoder models .* are not supported"),
    ("prefix", {"num_virtual_tokens": 0}, "PEFT field 'num_virtual_tokens' is 0, expected a positive integer"),
    ("prefix", {"num_layers": True}, "PEFT field 'num_layers' is True, expected a positive integer"),
    ("prefix", {"token_dim": "16"}, "PEFT field 'token_dim' is '16', expected a positive integer"),
    ("prefix", {"num_attention_heads": 3}, "token_dim 16 is not a multiple of num_attention_heads 3"),
    ("prefix", {"num_virtual_tokens": 6}, r"prompt_embeddings has shape \(5, 96\), expected \(6, 96\) for this PEFT "),
    ("prefix", {"num_layers": 2}, r"prompt_embeddings has shape \(5, 96\), expected \(5, 64\)"),
    ("prompt", {"num_virtual_tokens": 3}, r"prompt_embeddings has shape \(4, 32\), expected \(3, 32\)"),
    ("prompt", {"token_dim": 16}, r"prompt_embeddings has shape \(4, 32\), expected \(4, 16\)"),
])
def test_peft_fields_that_do_not_describe_the_saved_tensors_are_refused_in_one_line(name, changes, message, tmp_path):
    """A PEFT config softprompt cannot read as PEFT meant it (encoder-decoder, a count that is not a positive
    integer, key/value heads that do not divide the token size, a table whose shape the config does not give) is
    refused with one line naming the file and the values, instead of being reshaped into other numbers."""
    folder = _edited(tmp_path, name, **changes)
    with pytest.raises(AdapterFormatError, match=message) as caught:
        sp.load(tiny("llama"), folder)
    assert "\n" not in str(caught.value) and str(folder / "adapter_config.json") in str(caught.value)


def test_a_peft_folder_reads_as_the_equivalent_softprompt_config(tmp_path):
    """What the converted configs say, field by field: PEFT's prefix table becomes prefix tuning with PEFT's
    position numbering on the key/value shape PEFT stored; a sequence-classification prompt becomes a front prompt
    whose saved head gives the label count (its output rows) and makes it a classifier even without a task type."""
    from softprompt.io import read_adapter_config

    prefix = read_adapter_config(_edited(tmp_path, "prefix"))
    assert (prefix["method"], prefix["config"], prefix["task_kind"], prefix["head_modules"]) == (
        "prefix", {"num_virtual_tokens": 5, "init": "random", "shift_positions": True}, "causal_lm", [])
    assert {k: prefix["base_model"][k] for k in ("architecture", "num_layers", "num_kv_heads", "head_dim")} == {
        "architecture": "ForCausalLM", "num_layers": 3, "num_kv_heads": 2, "head_dim": 8}
    base = tiny("bert", pad_token_id=0).double().eval()  # a head of 3 labels: weight [3, 32]
    peft_folder(base, ENCODER["prompt"], tmp_path / "cls", seed=7)
    prompt = read_adapter_config(tmp_path / "cls")
    assert (prompt["method"], prompt["config"], prompt["base_model"]["hidden_size"]) == (
        "prompt", {"num_virtual_tokens": 4, "init": "random", "position": "front"}, 32)
    assert (prompt["head_modules"], prompt["num_labels"], prompt["task_kind"]) == (["classifier"], 3, "classification")
    config = json.loads((tmp_path / "cls" / "adapter_config.json").read_text())
    del config["task_type"]
    (tmp_path / "cls" / "adapter_config.json").write_text(json.dumps(config))
    assert read_adapter_config(tmp_path / "cls")["task_kind"] == "classification"


class _Canary:
    """Unpickling it writes a file: proof that something unpickled the adapter."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_peft_folder_with_only_pickled_weights_is_refused_without_unpickling(tmp_path):
    """Older PEFT versions save ``adapter_model.bin`` (a pickle). Loading reads safetensors only: such a folder is
    refused in one line, and the pickle is never opened (its canary would create a file)."""
    folder = _edited(tmp_path, "prompt")
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({"prompt_embeddings": _Canary(marker)}, folder / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors is missing") as caught:
        sp.load(tiny("llama"), folder)
    assert "\n" not in str(caught.value) and not marker.exists()
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors is missing"):
        MultiAdapterModel(tiny("llama"), {"peft": str(folder)})
    assert not marker.exists()
