"""torchrun with 2 CPU processes (gloo): same adapter as one process with the same global batch, resume works."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--method", "prefix", "--text-column", "sentence", "--label-column", "sentiment", "--lr", "0.05",
        "--num-virtual-tokens", "4", "--max-length", "16", "--seed", "0", "--option", "dropout=0.0"]


def _free_port() -> int:
    """A port nobody listens on now (a fixed port can still be in TIME_WAIT from the previous launch)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args, nproc, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
    if nproc == 1:
        cmd = [sys.executable, "-m", "softprompt", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), "-m", "softprompt", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def dropout_free_bert(tiny_bert_dir, tmp_path_factory):
    """The tiny encoder without dropout: ranks draw different dropout masks, which would make runs differ."""
    import json

    d = tmp_path_factory.mktemp("nodrop")
    for f in os.listdir(tiny_bert_dir):
        shutil.copy(os.path.join(tiny_bert_dir, f), d / f)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_two_processes_equal_one_process_with_the_same_global_batch(dropout_free_bert, sentiment_csv, tmp_path):
    common = ["--model", dropout_free_bert, "--file", sentiment_csv, *ARGS, "--max-steps", "8"]
    single, double = tmp_path / "single", tmp_path / "double"
    _run(common + ["--output", str(single), "--batch-size", "16"], 1)
    _run(common + ["--output", str(double), "--batch-size", "8"], 2)
    # Exactly one adapter folder, written once (rank 0 only): no per-rank files.
    assert sorted(p.name for p in double.iterdir() if not p.name.startswith("checkpoint")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "metrics.json"]
    a, b = load_file(single / "adapter_model.safetensors"), load_file(double / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("method."):
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_killed_then_resumed_two_process_run_ends_identical(dropout_free_bert, sentiment_csv, tmp_path):
    common = ["--model", dropout_free_bert, "--file", sentiment_csv, *ARGS, "--max-steps", "8", "--batch-size", "8",
              "--save-steps", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(common + ["--output", str(straight)], 2)
    # What a run killed right after its step-4 checkpoint leaves behind:
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    _run(common + ["--output", str(resumed), "--resume"], 2)
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "ptuning", "lpt", "apt", "idspam"])
def test_every_method_trains_under_torchrun(method, dropout_free_bert, sentiment_csv, tmp_path):
    """DDP runs with find_unused_parameters=False, so this also proves that every trainable parameter of each
    method receives a gradient in every step (an unused one would make DDP raise)."""
    out = tmp_path / method
    extra = ["--layer", "1"] if method in ("lpt", "idspam") else []
    args = ["--model", dropout_free_bert, "--file", sentiment_csv, "--method", method, "--text-column", "sentence",
            "--label-column", "sentiment", "--num-virtual-tokens", "3", "--max-length", "16", "--max-steps", "3",
            "--batch-size", "8", "--output", str(out), *extra]
    _run(args, 2)
    assert (out / "adapter_model.safetensors").exists() and (out / "metrics.json").exists()


def test_accelerate_launch_works(dropout_free_bert, sentiment_csv, tmp_path):
    out = tmp_path / "acc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--main_process_port",
           str(_free_port()), "-m", "softprompt", "train", "--model", dropout_free_bert, "--file",
           sentiment_csv, *ARGS, "--max-steps", "3", "--batch-size", "8", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "adapter_model.safetensors").exists()
