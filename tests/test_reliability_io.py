"""Adapters are data: safetensors + JSON, validated on load, written atomically, never unpickled."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny

import softprompt as sp
from softprompt.io import CONFIG_NAME, WEIGHTS_NAME


@pytest.fixture
def saved(tmp_path, batch):
    model = sp.wrap(tiny("llama"), sp.PrefixConfig(num_virtual_tokens=4, projection=True,
                                                   projection_hidden_size=16)).eval()
    model.save_pretrained(tmp_path / "a")
    return model, tmp_path / "a"


class Bomb:
    def __reduce__(self):
        return (os.system, ("touch /tmp/softprompt-pickle-bomb-went-off",))


def test_pickle_files_in_the_adapter_folder_are_never_opened(saved, batch, monkeypatch):
    model, path = saved
    for name in ("adapter_model.bin", "pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        with open(path / name, "wb") as f:
            pickle.dump(Bomb(), f)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("torch.load was called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load was called"))
    if os.path.exists("/tmp/softprompt-pickle-bomb-went-off"):
        os.unlink("/tmp/softprompt-pickle-bomb-went-off")
    loaded = sp.load(tiny("llama"), path)
    ids, mask = batch
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    assert not loads and not os.path.exists("/tmp/softprompt-pickle-bomb-went-off")


def test_projection_adapter_holds_projected_tables_and_loads_folded(saved, batch):
    from safetensors.torch import load_file

    model, path = saved
    tensors = load_file(path / WEIGHTS_NAME)
    assert any(k.startswith("method.tables.") for k in tensors)
    assert any(k.startswith("method.mlp_state.") for k in tensors)
    # An adapter with only the projected tables (what a user ships for inference) loads and agrees exactly.
    from safetensors.torch import save_file

    save_file({k: v for k, v in tensors.items() if "mlp_state" not in k}, path / WEIGHTS_NAME)
    loaded = sp.load(tiny("llama"), path)
    assert loaded.method.mlp is None
    ids, mask = batch
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=1e-6)


def test_adapter_for_another_base_model_is_refused_naming_both(saved):
    _, path = saved
    import transformers as tf

    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=64,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(sp.AdapterMismatchError, match=r"hidden_size: adapter 32 vs model 48"):
        sp.load(other, path)
    with pytest.raises(sp.AdapterMismatchError, match="model_type: adapter 'llama' vs model 'gpt2'"):
        sp.load(tiny("gpt2"), path)


@pytest.mark.parametrize("field", ["model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"])
def test_each_recorded_base_model_shape_is_checked(saved, field):
    """Every shape field of ``base_model`` is compared on load: an adapter whose record differs from the model in any
    one of them is refused in one line naming that field and both values."""
    _, path = saved
    config = json.loads((path / CONFIG_NAME).read_text())
    value = config["base_model"][field]
    config["base_model"][field] = "other" if isinstance(value, str) else value + 1
    (path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(sp.AdapterMismatchError) as err:
        sp.load(tiny("llama"), path)
    assert f"{field}: adapter {config['base_model'][field]!r} vs model {value!r}" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("trainable", [False, True])
def test_loaded_adapter_is_frozen_for_inference_unless_trainable(saved, trainable):
    """``sp.load`` gives an eval-mode model whose method parameters do not train; ``is_trainable=True`` keeps them
    trainable. The base model stays frozen either way."""
    _, path = saved
    loaded = sp.load(tiny("llama"), path, is_trainable=trainable)
    method = list(loaded.method.parameters())
    assert method and all(p.requires_grad == trainable for p in method)
    assert loaded.training is trainable
    assert not any(p.requires_grad for p in loaded.base_model.parameters())


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_missing_or_corrupt_weights(saved, damage):
    _, path = saved
    f = path / WEIGHTS_NAME
    if damage == "missing":
        f.unlink()
    elif damage == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    else:
        f.write_bytes(b"\x00" * 64)
    with pytest.raises(sp.AdapterFormatError, match=WEIGHTS_NAME):
        sp.load(tiny("llama"), path)


def test_wrong_shape_and_nan_tensors(saved):
    from safetensors.torch import load_file, save_file

    _, path = saved
    tensors = load_file(path / WEIGHTS_NAME)
    key = next(k for k in tensors if k.startswith("method.tables."))
    bad = dict(tensors)
    bad[key] = torch.zeros(3, 3)
    save_file(bad, path / WEIGHTS_NAME)
    with pytest.raises(sp.AdapterFormatError, match=r"shape \(3, 3\)"):
        sp.load(tiny("llama"), path)
    bad[key] = torch.full_like(tensors[key], float("nan"))
    save_file(bad, path / WEIGHTS_NAME)
    with pytest.raises(sp.AdapterFormatError, match="NaN"):
        sp.load(tiny("llama"), path)


def test_bad_config_json(saved):
    _, path = saved
    cfg = path / CONFIG_NAME
    good = json.loads(cfg.read_text())
    cfg.write_text("{not json")
    with pytest.raises(sp.AdapterFormatError, match="not valid JSON"):
        sp.load(tiny("llama"), path)
    cfg.write_text(json.dumps({**good, "format_version": 99, "library_version": "9.0"}))
    with pytest.raises(sp.AdapterFormatError, match="Upgrade softprompt"):
        sp.load(tiny("llama"), path)
    cfg.write_text(json.dumps({**good, "config": {**good["config"], "bogus": 1}}))
    with pytest.raises(sp.ConfigError, match="bogus"):
        sp.load(tiny("llama"), path)


def test_invalid_configs_name_the_field():
    with pytest.raises(sp.ConfigError, match="num_virtual_tokens"):
        sp.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(sp.ConfigError, match="layer_lengths has 2 entries but the model has 3 layers"):
        sp.wrap(tiny("llama"), sp.PrefixConfig(layer_lengths=[1, 2]))
    with pytest.raises(sp.ConfigError, match=r"layer must be in 0\.\.2"):
        sp.wrap(tiny("llama"), sp.LatePromptConfig(layer=7))


def test_sequence_beyond_position_limit():
    model = sp.wrap(tiny("gpt2"), sp.PromptTuningConfig(num_virtual_tokens=10))
    with pytest.raises(sp.SequenceTooLongError, match="at most 118 tokens"):
        model(input_ids=torch.randint(3, 100, (1, 125)))


def test_killed_save_leaves_old_or_new_file_never_half(tmp_path):
    """SIGKILL a process in the middle of writing a large adapter: the file on disk stays loadable."""
    target = tmp_path / "adapter_model.safetensors"
    from softprompt.io import atomic_save_tensors

    atomic_save_tensors(target, {"x": torch.zeros(10)})
    script = textwrap.dedent(f"""
        import torch
        from softprompt import io
        big = {{"x": torch.ones(96, 1024, 1024)}}  # 384 MiB: serialising + writing takes well over the kill delay
        print("ready", flush=True)
        io.atomic_save_tensors({str(target)!r}, big)
        print("done", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    import time

    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait()
    assert "done" not in rest, "the save finished before the kill; the test did not interrupt it"
    from safetensors.torch import load_file

    x = load_file(target)["x"]  # the old file, complete: the half-written new one never took its name
    torch.testing.assert_close(x, torch.zeros(10))


OPTION_CASES = [
    sp.PromptTuningConfig(num_virtual_tokens=3, init="random", init_range=0.3, position="after_cls", seed=7),
    sp.PrefixConfig(num_virtual_tokens=2, layers=[1], init="random", init_std=0.3, dropout=0.1, shift_positions=True,
                    scale=0.5, seed=7),
    sp.LatePromptConfig(num_virtual_tokens=2, layer=1, dropout=0.1, init_std=0.3, seed=7),
    sp.APTConfig(num_virtual_tokens=2, init="random", init_std=0.3, gate_pool="last", gate_target="v",
                 lambda_init=1.5, gate_init="zeros", gate_init_std=0.1, gate_bias=False, seed=7),
]


@pytest.mark.parametrize("config", OPTION_CASES, ids=[c.method for c in OPTION_CASES])
def test_every_option_round_trips_through_the_adapter_json(tmp_path, config):
    """Every option of the method config is written to adapter_config.json (also those that only shape the init or
    the output, e.g. position, init_std, scale) and comes back on load: loaded config == saved config."""
    defaults = type(config)().to_dict()
    changed = {k for k, v in config.to_dict().items() if v != defaults[k]}
    assert changed >= {"seed"} and len(changed) >= 4  # the case exercises non-default values
    model = sp.wrap(tiny("bert", "cls"), config)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["config"] == config.to_dict()
    assert sp.load(tiny("bert", "cls"), tmp_path).method_config == config
