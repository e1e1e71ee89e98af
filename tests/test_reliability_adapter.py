"""Issue 10, validation bullet: adapter folders with wrong dtypes or ill-typed config fields raise our own errors
(regression examples found by tests/test_reliability_fuzz.py), never a raw TypeError/KeyError."""

import json

import pytest
import torch
from conftest import tiny

import softprompt as sp
from softprompt.io import CONFIG_NAME, WEIGHTS_NAME


@pytest.fixture
def saved(tmp_path):
    base = tiny("llama")
    sp.wrap(base, sp.PrefixConfig(num_virtual_tokens=3)).save_pretrained(tmp_path)
    return base, tmp_path


def test_integer_tensor_is_refused_naming_the_dtype(saved):
    from safetensors.torch import load_file, save_file

    base, path = saved
    tensors = load_file(path / WEIGHTS_NAME)
    key = next(k for k in tensors if k.startswith("method."))
    tensors[key] = torch.zeros(tensors[key].shape, dtype=torch.int32)
    save_file(tensors, path / WEIGHTS_NAME)
    with pytest.raises(sp.AdapterFormatError, match=r"dtype torch.int32, expected a floating-point tensor"):
        sp.load(base, path)


def _rewrite(path, **changes):
    cfg = json.loads((path / CONFIG_NAME).read_text())
    for key, value in changes.items():
        if key.startswith("config."):
            cfg["config"][key[len("config."):]] = value
        else:
            cfg[key] = value
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,match", [
    ({"config": [1, 2]}, r"field 'config' is \[1, 2\] \(list\), expected dict"),
    ({"base_model": ["llama"]}, r"field 'base_model' .* expected dict"),
    ({"method": 7}, r"field 'method' is 7 \(int\), expected str"),
    ({"head_modules": "score"}, r"field 'head_modules' .* expected list"),
    ({"head_modules": [1]}, r"'head_modules' must list module names"),
])
def test_ill_typed_config_fields_raise_format_error(saved, changes, match):
    base, path = saved
    _rewrite(path, **changes)
    with pytest.raises(sp.AdapterFormatError, match=match):
        sp.load(base, path)


@pytest.mark.parametrize("value", [None, "3", 2.5, True])
def test_ill_typed_option_in_adapter_raises_config_error_naming_it(saved, value):
    base, path = saved
    _rewrite(path, **{"config.num_virtual_tokens": value})
    with pytest.raises(sp.ConfigError, match=r"option num_virtual_tokens=.* has the wrong type: expected int"):
        sp.load(base, path)


def test_unknown_method_in_adapter_raises_config_error(saved):
    base, path = saved
    _rewrite(path, method="nosuch")
    with pytest.raises(sp.ConfigError, match=r"unknown method 'nosuch'; known methods"):
        sp.load(base, path)


def test_config_not_utf8_or_too_deep_raises_format_error(saved):
    base, path = saved
    (path / CONFIG_NAME).write_bytes(b'{"method": "caf\xe9"}')
    with pytest.raises(sp.AdapterFormatError, match="not valid JSON"):
        sp.load(base, path)
    (path / CONFIG_NAME).write_bytes(b"[" * 100_000)
    with pytest.raises(sp.AdapterFormatError, match="not valid JSON"):
        sp.load(base, path)
