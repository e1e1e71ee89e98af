"""Issue 10, fuzzing bullet: config parsing, adapter loading from corrupted bytes and the data readers raise only
our own error types (or succeed) on arbitrary input, and never hang."""

import contextlib
import json
import shutil
import warnings

import pytest
import torch
from conftest import tiny
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import softprompt as sp
from softprompt.methods import METHODS
from softprompt.tasks import TaskError, load_file

METHOD_NAMES = sorted(METHODS)


def fuzz(n=60):
    """Deterministic (derandomized, no example database), bounded and with a per-example deadline (no hang)."""
    return settings(max_examples=n, deadline=2000, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------- config parsing

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(), st.floats(allow_nan=True),
    st.text(max_size=8), st.sampled_from(["vocab", "random", "text", "front", "after_cls", "mlp", "lstm", "kv"]),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4),
                                                                                          inner, max_size=3),
                       max_leaves=6)


def _option_names(method):
    import dataclasses

    return [f.name for f in dataclasses.fields(METHODS[method][0])]


@st.composite
def _config_dicts(draw, method):
    """Mostly known option names (so validation is reached) with random values, sometimes unknown keys."""
    names = _option_names(method)
    known = draw(st.dictionaries(st.sampled_from(names), _values, max_size=len(names)))
    unknown = draw(st.dictionaries(st.text(max_size=6), _values, max_size=2))
    return {**unknown, **known} if draw(st.booleans()) else known


def _parse_config(method, options):
    try:
        cfg = sp.config_from_dict(method, options)
    except sp.ConfigError:
        return None
    assert isinstance(cfg, sp.MethodConfig)
    return cfg


@pytest.mark.parametrize("method", METHOD_NAMES)
@fuzz()
@given(data=st.data())
def test_config_from_dict_wellformed_types_raise_only_config_error(method, data):
    """Values of the declared types (ints/floats/strings/lists of ints, None) but random magnitudes/choices."""
    import dataclasses

    fields = {f.name: f.type for f in dataclasses.fields(METHODS[method][0])}
    strat = {}
    for name, typ in fields.items():
        s = {"int": st.integers(-5, 5000), "float": st.floats(-10, 10), "bool": st.booleans(),
             "str": st.text(max_size=10) | st.sampled_from(["vocab", "random", "text", "front", "after_cls", "mlp",
                                                            "lstm", "static", "kv", "mean"])}
        base = typ.replace(" | None", "")
        if base == "list[int]":
            v = st.lists(st.integers(-3, 50), max_size=5)
        else:
            v = s.get(base, st.none())
        strat[name] = (v | st.none()) if "None" in typ else v
    options = data.draw(st.fixed_dictionaries({}, optional=strat))
    _parse_config(method, options)


@pytest.mark.parametrize("method", METHOD_NAMES)
@fuzz()
@given(options=st.dictionaries(st.text(max_size=8), _values, max_size=4))
def test_config_from_dict_unknown_keys_raise_config_error(method, options):
    known = set(_option_names(method))
    if set(options) - known:
        with pytest.raises(sp.ConfigError, match="unknown option"):
            sp.config_from_dict(method, options)
    else:
        _parse_config(method, options)


@fuzz()
@given(name=st.text(max_size=12))
def test_unknown_method_name_raises_config_error(name):
    if name in METHODS:
        return
    with pytest.raises(sp.ConfigError, match="unknown method"):
        sp.config_from_dict(name, {})


@pytest.mark.parametrize("method", METHOD_NAMES)
@fuzz(60)
@given(data=st.data())
def test_config_from_dict_arbitrary_values_raise_only_config_error(method, data):
    _parse_config(method, data.draw(_config_dicts(method)))


# ----------------------------------------------------------------------------------- adapter loading (bytes)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    base = tiny("llama")
    model = sp.wrap(base, sp.PrefixConfig(num_virtual_tokens=3))
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return base, folder, (folder / WEIGHTS).read_bytes(), (folder / CONFIG).read_bytes()


def _mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for kind, pos, val in ops:
        if not buf:
            buf = bytearray([val])
            continue
        i = pos % len(buf)
        if kind == "flip":
            buf[i] ^= (val or 1)
        elif kind == "set":
            buf[i] = val
        elif kind == "insert":
            buf[i:i] = bytes([val]) * (1 + val % 4)
        elif kind == "delete":
            del buf[i:i + 1 + val % 8]
        elif kind == "truncate":
            del buf[i:]
    return bytes(buf)


_ops = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                          st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)
# Bias toward the safetensors header (first 8 length bytes + JSON header) where corruption is most interesting.
_header_ops = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                                 st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=3)


def _try_load(base, folder):
    with contextlib.suppress(sp.SoftPromptError):
        sp.load(base, folder)


def _fresh_copy(tmp_path_factory, folder):
    target = tmp_path_factory.mktemp("corrupt")
    for name in (WEIGHTS, CONFIG):
        shutil.copy(folder / name, target / name)
    return target


@fuzz(80)
@given(ops=st.one_of(_ops, _header_ops))
def test_corrupted_weights_raise_only_our_errors(saved_adapter, tmp_path_factory, ops):
    base, folder, weights, _ = saved_adapter
    target = _fresh_copy(tmp_path_factory, folder)
    (target / WEIGHTS).write_bytes(_mutate(weights, ops))
    _try_load(base, target)


@fuzz(100)
@given(ops=_ops)
@example(ops=[("truncate", 0, 0)])
def test_corrupted_config_bytes_raise_only_our_errors(saved_adapter, tmp_path_factory, ops):
    base, folder, _, config = saved_adapter
    target = _fresh_copy(tmp_path_factory, folder)
    (target / CONFIG).write_bytes(_mutate(config, ops))
    _try_load(base, target)


def _json_values():
    return st.recursive(st.none() | st.booleans() | st.integers(-10**4, 10**4) | st.floats() | st.text(max_size=6),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                    max_size=3), max_leaves=5)


@fuzz(100)
@given(path=st.lists(st.sampled_from(["method", "config", "base_model", "head_modules", "format_version",
                                      "num_labels", "num_virtual_tokens", "hidden_size", "num_layers",
                                      "model_type", "layers", "projection"]), min_size=1, max_size=2),
       value=_json_values())
def test_corrupted_config_values_raise_only_our_errors(saved_adapter, tmp_path_factory, path, value):
    """Valid JSON with one field (top-level or nested) replaced by an arbitrary JSON value."""
    base, folder, _, config = saved_adapter
    obj = json.loads(config)
    node = obj
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        node = obj
    node[path[-1]] = value
    target = _fresh_copy(tmp_path_factory, folder)
    (target / CONFIG).write_text(json.dumps(obj))
    _try_load(base, target)


def test_intact_adapter_still_loads(saved_adapter, tmp_path_factory):
    base, folder, _, _ = saved_adapter
    model = sp.load(base, _fresh_copy(tmp_path_factory, folder))
    assert isinstance(model, sp.SoftPromptModel)


# --------------------------------------------------------------------------------------------- data readers

_csvish = st.text(alphabet=st.sampled_from(list('abc,"\t\n\r ;{}[]:1\\é\ufeff\x00')), max_size=120)


def _write_and_load(tmp_path_factory, suffix, data: bytes, **kw):
    f = tmp_path_factory.mktemp("fuzzdata") / f"f{suffix}"
    f.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for strict in (False, True):
            try:
                records, _ = load_file(f, strict=strict, **kw)
            except TaskError:
                continue
            assert isinstance(records, list)


def _reader_kwargs(suffix, with_label):
    if suffix == ".txt":
        return {}
    return {"label_column": "label"} if with_label else {}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".txt"])
@fuzz(60)
@given(data=st.binary(max_size=200), with_label=st.booleans())
def test_reader_random_bytes_raise_only_task_errors(tmp_path_factory, suffix, data, with_label):
    _write_and_load(tmp_path_factory, suffix, data, **_reader_kwargs(suffix, with_label))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".txt"])
@fuzz(60)
@given(body=_csvish, with_label=st.booleans(), header=st.sampled_from(["text,label\n", "text\tlabel\n", ""]),
       label_names=st.none() | st.just(["a", "b"]))
def test_reader_csvish_text_raise_only_task_errors(tmp_path_factory, suffix, body, with_label, header, label_names):
    kw = _reader_kwargs(suffix, with_label)
    if kw and label_names:
        kw["label_names"] = label_names
    _write_and_load(tmp_path_factory, suffix, (header + body).encode("utf-8"), **kw)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@fuzz(60)
@given(rows=st.lists(_json_values(), max_size=5), with_label=st.booleans())
def test_reader_random_json_rows_raise_only_task_errors(tmp_path_factory, suffix, rows, with_label):
    if suffix == ".json":
        data = json.dumps(rows)
    else:
        data = "\n".join(json.dumps(r) for r in rows)
    _write_and_load(tmp_path_factory, suffix, data.encode(), **_reader_kwargs(suffix, with_label))


# Regression examples found while writing these tests (kept explicit).

def test_jsonl_deeply_nested_line_is_a_malformed_row(tmp_path):
    f = tmp_path / "deep.jsonl"
    f.write_bytes(b'{"text": "ok"}\n' + b"[" * 100_000 + b"\n")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        records, _ = load_file(f)
    assert len(records) == 1


def test_jsonl_huge_integer_is_a_malformed_row(tmp_path):
    f = tmp_path / "bigint.jsonl"
    f.write_bytes(b'{"text": "ok", "label": 1}\n{"text": "no", "label": 0}\n{"text": "x", "label": '
                  + b"9" * 5000 + b"}\n")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        records, _ = load_file(f, label_column="label")
    assert len(records) == 2


def test_json_array_deeply_nested_raises_malformed_row(tmp_path):
    from softprompt.tasks.errors import MalformedRowError

    f = tmp_path / "deep.json"
    f.write_bytes(b"[" * 100_000)
    with pytest.raises(MalformedRowError):
        load_file(f)


def test_adapter_config_deeply_nested_raises_format_error(saved_adapter, tmp_path_factory):
    base, folder, _, _ = saved_adapter
    target = _fresh_copy(tmp_path_factory, folder)
    (target / CONFIG).write_bytes(b"[" * 100_000)
    with pytest.raises(sp.AdapterFormatError):
        sp.load(base, target)


def test_saved_adapter_holds_float_tensors(saved_adapter):
    # sanity: the saved adapter holds float tensors only (so dtype corruption is what the loader must catch)
    from safetensors.torch import load

    assert all(t.is_floating_point() for t in load(saved_adapter[2]).values())
    assert torch.is_tensor(next(iter(load(saved_adapter[2]).values())))


# Found by the fuzz test above: validation compared None with an int (a raw TypeError) before options were
# type-checked in MethodConfig.from_dict.
def test_config_option_of_wrong_type_raises_config_error():
    with pytest.raises(sp.ConfigError, match="num_virtual_tokens"):
        sp.config_from_dict("prompt", {"num_virtual_tokens": None})
