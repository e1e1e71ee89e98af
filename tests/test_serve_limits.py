"""Issue 22, server: which folders POST /adapters may load (roots, relative paths, symlinks) and size caps checked
before anything is allocated (the body read timeout and requests that can never fit the queue:
test_serve_limits_requests.py). Each refused request is checked for its status, its one-line message and that the
adapter list did not change."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from test_multi_helpers import ADAPTERS
from test_serve_helpers import (
    AUTH,
    TOKEN,
    ServeProcess,
    adapter_names,
    assert_refused,
    edit_config,
)

pytest.importorskip("fastapi")

from _helpers.serve_limits import add, serve

from softprompt.serve.limits import safetensors_bytes

# one_thread: tiny models, intra-op threads only contend; only_prefix_a (conftest.py): each test starts from, and
# leaves, a model holding prefix_a only
pytestmark = pytest.mark.usefixtures("one_thread", "only_prefix_a")


@pytest.fixture
def load_calls(model, monkeypatch):
    """Every call of the model's loader (which allocates the adapter's tensors): a refused adapter must make none."""
    calls = []
    real = model.load_adapter_modules

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "load_adapter_modules", spy)
    return calls


# ---- paths ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,status,needles", [
    ("../outside/prompt_cls", 403, ["leads outside the adapter root", "--adapter-root"]),
    ("{outside}/prompt_cls", 403, ["leads outside the adapter root"]),
    ("prompt_cls/../../outside/prompt_cls", 403, ["leads outside"]),
    ("/etc", 403, ["leads outside"]),
    ("link_out", 403, ["adapter path 'link_out' leads outside"]),  # the folder itself, before its files
    ("../root_sibling/prompt_cls", 403, ["leads outside the adapter root"]),
    ("{sibling}/prompt_cls", 403, ["leads outside the adapter root"]),
    ("files_out", 403, ["adapter_model.safetensors", "symlink that leads outside"]),
    ("no_weights", 400, ["adapter_model.safetensors is missing"]),
    ("dir_weights", 400, ["adapter_model.safetensors is missing", "not a regular file"]),
    ("no_such_folder", 400, ["does not exist under the adapter root", "relative paths are taken relative to"]),
    ("prompt_cls/adapter_config.json", 400, ["does not exist"]),
    ("prompt_cls\x00", 400, ["NUL"]),
])
def test_paths_outside_the_root_or_unusable_are_refused(tree, model, load_calls, path, status, needles):
    with serve(model, adapter_roots=(str(tree["root"]),)) as url:
        r = add(url, path.format(outside=tree["outside"], sibling=tree["sibling"]))
        assert_refused(r, status, *needles)
        assert adapter_names(url) == ["prefix_a"]
    assert load_calls == []


@pytest.mark.parametrize("path", ["prompt_cls", "./prompt_cls", "link_in", "{root}/prompt_cls"])
def test_paths_inside_the_root_load_relative_to_the_root(tree, model, path):
    assert not os.path.exists("prompt_cls")  # the relative path is not resolved against the working directory
    with serve(model, adapter_roots=(str(tree["root"]),)) as url:
        assert add(url, path.format(root=tree["root"])).status_code == 201
        assert httpx.delete(f"{url}/adapters/added", headers=AUTH, timeout=30).status_code == 200


def test_default_root_is_the_parent_of_the_served_adapters_and_none_without_adapters(tree, model, load_calls):
    with serve(model) as url:  # prefix_a was loaded from root/: root is the default
        assert add(url, "prompt_cls").status_code == 201
        assert httpx.delete(f"{url}/adapters/added", headers=AUTH, timeout=30).status_code == 200
        assert_refused(add(url, "../outside/prompt_cls"), 403, "leads outside")
    with serve(model, adapter_roots=()) as url:  # no root at all: nothing is loadable
        assert_refused(add(url, "prompt_cls"), 403, "no adapter folder is loadable", "--adapter-root")
        assert adapter_names(url) == ["prefix_a"]
    assert len(load_calls) == 1


def test_every_method_loads_through_the_size_checks(tree, model):
    """The size checks build every method's modules on the meta device: none of them may be refused wrongly."""
    with serve(model, adapter_roots=(str(tree["root"]),)) as url:
        for name in ADAPTERS:
            r = add(url, name, name=f"x-{name}")
            assert r.status_code == 201, (name, r.text)
            assert httpx.delete(f"{url}/adapters/x-{name}", headers=AUTH, timeout=30).status_code == 200
        assert adapter_names(url) == ["prefix_a"]


# ---- caps -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,options,status,needles", [
    ("huge_tokens", {}, 413, ["num_virtual_tokens = 100000 is over 64", "position limit"]),
    ("huge_tokens", {"max_virtual_tokens": 3}, 413, ["num_virtual_tokens = 100000 is over 3", "--max-virtual-tokens"]),
    ("prefix_a", {"max_virtual_tokens": 3}, 413, ["num_virtual_tokens = 4 is over 3"]),
    ("float_tokens", {}, 400, ["num_virtual_tokens", "wrong type"]),
    ("many_layers", {}, 400, ["layer_lengths has 1000 entries but the model has 3 layers"]),
    ("layer_out", {}, 400, ["layers [99] out of range 0..2"]),
    ("huge_mlp", {}, 413, ["would build modules of", "--max-adapter-bytes"]),
    ("prefix_a", {"max_adapter_bytes": 1000}, 413, ["holds 0.0 MiB of tensors", "over this server's limit"]),
    ("big_config", {}, 413, ["adapter_config.json is over 1048576 bytes"]),
])
def test_oversized_adapters_are_refused_before_loading(tree, model, load_calls, path, options, status, needles):
    with serve(model, adapter_roots=(str(tree["root"]),), **options) as url:
        assert_refused(add(url, path), status, *needles)
        assert adapter_names(url) == ["prefix_a"]
    assert load_calls == []  # refused before the loader allocated anything


def test_safetensors_header_is_summed_and_checked(tree, model, load_calls, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = tree["root"] / "prefix_a" / "adapter_model.safetensors"
    assert safetensors_bytes(str(weights)) == sum(t.numel() * t.element_size() for t in load_file(weights).values())
    # A small config with a large extra tensor in the file: only the header sum can see it.
    padded = tree["root"] / "padded"
    shutil.copytree(tree["root"] / "prefix_a", padded)
    save_file({**load_file(weights), "extra": torch.zeros(64, 1024)}, str(padded / "adapter_model.safetensors"))
    # A header that claims more bytes than the file holds, and one that claims 4 GB.
    lying = tree["root"] / "lying"
    shutil.copytree(tree["root"] / "prefix_a", lying)
    header = json.dumps({"t": {"dtype": "F32", "shape": [2**20, 1024], "data_offsets": [0, 2**32]}}).encode()
    (lying / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with serve(model, adapter_roots=(str(tree["root"]),), max_adapter_bytes=100_000) as url:
        assert_refused(add(url, "padded"), 413, "adapter_model.safetensors holds 0.3 MiB", "--max-adapter-bytes")
        assert_refused(add(url, "lying"), 400, "truncated")
        assert adapter_names(url) == ["prefix_a"]
    assert load_calls == []


def test_adapter_count_is_capped(tree, model, load_calls):
    with serve(model, adapter_roots=(str(tree["root"]),), max_adapters=2) as url:
        assert add(url, "prompt_cls", name="second").status_code == 201
        assert_refused(add(url, "prefix_b", name="third"), 409, "holds 2 adapters", "--max-adapters 2")
        assert adapter_names(url) == ["prefix_a", "second"]
        assert httpx.delete(f"{url}/adapters/second", headers=AUTH, timeout=30).status_code == 200
        assert add(url, "prefix_b", name="third").status_code == 201  # room again
        assert httpx.delete(f"{url}/adapters/third", headers=AUTH, timeout=30).status_code == 200
    assert len(load_calls) == 2


def test_concurrent_adds_cannot_pass_the_count_together(tree, model):
    """The count check and the registration happen under one lock: 8 simultaneous adds with room for 1 load 1."""
    with serve(model, adapter_roots=(str(tree["root"]),), max_adapters=2) as url:
        barrier = threading.Barrier(8)

        def one(i):
            barrier.wait()
            return add(url, "prompt_cls", name=f"c{i}").status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = sorted(pool.map(one, range(8)))
        assert statuses == [201] + [409] * 7
        (added,) = [n for n in adapter_names(url) if n != "prefix_a"]
        assert httpx.delete(f"{url}/adapters/{added}", headers=AUTH, timeout=30).status_code == 200


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_refused_oversized_adapter_does_not_grow_the_server(tree, tmp_path):
    """A real server process: its peak RSS (VmHWM, which a freed allocation cannot hide) does not grow when an
    adapter of 300,000 virtual tokens (230 MB of prefix tables if built) is refused. Either check alone (the
    position limit, or --max-adapter-bytes) prevents the allocation."""
    huge = tree["root"] / "huge_rss"
    shutil.copytree(tree["root"] / "prefix_a", huge)
    edit_config(huge, num_virtual_tokens=300_000)
    args = ["--model", tree["base"], "--adapter", f"prefix_a={tree['root'] / 'prefix_a'}",
            "--max-adapter-bytes", str(10 * 2**20)]
    server = ServeProcess(args, tmp_path, env={"SOFTPROMPT_ADMIN_TOKEN": TOKEN})
    with server as url:
        # Warm up every code path the refused request takes (imports, a real load) before the baseline.
        assert httpx.post(f"{url}/predict", json={"adapter": "prefix_a", "inputs": ["good film"]}).status_code == 200
        assert add(url, "prompt_cls").status_code == 201
        assert httpx.delete(f"{url}/adapters/added", headers=AUTH, timeout=30).status_code == 200
        before = _peak_rss_kib(server.proc.pid)
        answers = [add(url, "huge_rss") for _ in range(3)]
        grown_mib = (_peak_rss_kib(server.proc.pid) - before) / 1024
        assert grown_mib < 40, grown_mib  # first: without the checks the answer is a 400 after the allocation
        for r in answers:
            assert_refused(r, 413)
        assert adapter_names(url) == ["prefix_a"]


def test_peft_folders_load_and_are_size_checked_without_reading_their_tensors(tree, model, load_calls):
    """A PEFT prompt-tuning folder loads over HTTP; with num_virtual_tokens 100000 it is refused from its config."""
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification.from_pretrained(tree["base"], num_labels=2)
    pm = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    pm.save_pretrained(tree["root"] / "peft_prompt")
    shutil.copytree(tree["root"] / "peft_prompt", tree["root"] / "peft_huge")
    config = json.loads((tree["root"] / "peft_huge" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING"
    config["num_virtual_tokens"] = 100_000
    (tree["root"] / "peft_huge" / "adapter_config.json").write_text(json.dumps(config))
    with serve(model, adapter_roots=(str(tree["root"]),)) as url:
        assert_refused(add(url, "peft_huge"), 413, "num_virtual_tokens = 100000")
        assert adapter_names(url) == ["prefix_a"]
        assert load_calls == []
        r = add(url, "peft_prompt")
        assert r.status_code == 201, r.text
        assert r.json()["prompt_length"] == 4


def test_limits_admit_an_adapter_exactly_at_them(tree, model):
    """--max-virtual-tokens and --max-adapter-bytes are the largest values allowed: prefix_a (4 virtual tokens) loads
    with both limits exactly at its size, and one token or one byte less refuses it."""
    from softprompt.serve.limits import _read_config, module_bytes

    folder = tree["root"] / "prefix_a"
    meta = _read_config(str(folder))
    size = max(safetensors_bytes(str(folder / "adapter_model.safetensors")),
               module_bytes(meta["method"], meta["config"], model.info))
    with serve(model, adapter_roots=(str(tree["root"]),), max_virtual_tokens=4, max_adapter_bytes=size) as url:
        assert add(url, "prefix_a", name="exact").status_code == 201
        assert httpx.delete(f"{url}/adapters/exact", headers=AUTH, timeout=30).status_code == 200
    with serve(model, adapter_roots=(str(tree["root"]),), max_virtual_tokens=3) as url:
        assert_refused(add(url, "prefix_a", name="exact"), 413, "num_virtual_tokens = 4 is over 3")
    with serve(model, adapter_roots=(str(tree["root"]),), max_adapter_bytes=size - 1) as url:
        assert_refused(add(url, "prefix_a", name="exact"), 413, "--max-adapter-bytes")
        assert adapter_names(url) == ["prefix_a"]
