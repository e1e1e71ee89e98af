"""Crash and resume: an interrupted or SIGKILLed run resumes to the uninterrupted adapter; NaN losses stop training
with the step named and the last good checkpoint kept (tiny model, real CLI)."""

import torch

from softprompt.cli import main


def test_resume_after_interruption_gives_the_same_adapter(tiny_bert_dir, sentiment_csv, tmp_path):
    """Train 12 steps straight, or 6 steps + resume to 12 from the step-6 checkpoint: identical tensors."""
    from safetensors.torch import load_file

    common = ["train", "--method", "prefix", "--model", tiny_bert_dir, "--file", sentiment_csv, "--text-column",
              "sentence", "--label-column", "sentiment", "--batch-size", "16", "--lr", "0.05",
              "--num-virtual-tokens", "4", "--max-length", "16", "--seed", "0", "--save-steps", "6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(common + ["--output", str(straight), "--max-steps", "12"]) == 0
    # A run killed right after its step-6 checkpoint leaves exactly this folder behind.
    import shutil

    assert (straight / "checkpoint-6" / "adapter_model.safetensors").exists()
    shutil.copytree(straight / "checkpoint-6", resumed / "checkpoint-6")
    assert main(common + ["--output", str(resumed), "--max-steps", "12", "--resume"]) == 0
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_sigkill_then_resume_ends_with_the_uninterrupted_adapter(tiny_bert_dir, sentiment_csv, tmp_path):
    """A real SIGKILL at an arbitrary moment (possibly while a checkpoint is being written), then --resume."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    args = ["train", "--method", "prefix", "--model", tiny_bert_dir, "--file", sentiment_csv, "--text-column",
            "sentence", "--label-column", "sentiment", "--batch-size", "16", "--lr", "0.05", "--num-virtual-tokens",
            "4", "--max-length", "16", "--seed", "0", "--max-steps", "60", "--save-steps", "5", "--option",
            "dropout=0.0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(args + ["--output", str(straight)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "softprompt", *args, "--output", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(killed.glob("checkpoint-1[05]/trainer_state.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before the kill"
    assert main(args + ["--output", str(killed), "--resume"]) == 0
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_bert_dir, sentiment_csv, tmp_path, capsys):
    out = tmp_path / "nan"
    rc = main(["train", "--method", "prefix", "--model", tiny_bert_dir, "--file", sentiment_csv, "--text-column",
               "sentence", "--label-column", "sentiment", "--batch-size", "16", "--lr", "1e38", "--max-steps", "20",
               "--save-steps", "1", "--num-virtual-tokens", "4", "--max-length", "16", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 1  # a runtime error (usage errors exit 2)
    assert "loss became nan at step" in err or "loss became inf at step" in err, err[-500:]
    step = int(err.split(" at step ")[1].split(";")[0])
    assert (out / f"checkpoint-{step - 1}" / "adapter_model.safetensors").exists()
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a diverged run


def _run(tiny_bert_dir, sentiment_csv, output, max_steps, resume=False, save_steps=3):
    from softprompt.train import TrainConfig, train

    return train(TrainConfig(
        method="prefix", model=tiny_bert_dir, file=sentiment_csv, text_column="sentence", label_column="sentiment",
        output=str(output), max_steps=max_steps, save_steps=save_steps, batch_size=16, lr=0.05, max_length=16,
        seed=0, logging_steps=1, resume=resume, method_options={"num_virtual_tokens": 4}))


def test_resume_runs_only_the_remaining_steps_and_uses_the_checkpoint(tiny_bert_dir, sentiment_csv, tmp_path):
    """The claims behind bit-exact resume, each able to fail: the resumed run trains only steps 4-6 (a restart from
    scratch would log steps 1-3 too), its adapter equals the straight run's (torch.equal), and a perturbed checkpoint
    changes the result (so the checkpoint's tensors are really what training continues from)."""
    import shutil

    from safetensors.torch import load_file, save_file

    straight = tmp_path / "straight"
    _run(tiny_bert_dir, sentiment_csv, straight, 6)
    for name, perturb in (("resumed", False), ("perturbed", True)):
        out = tmp_path / name
        shutil.copytree(straight / "checkpoint-3", out / "checkpoint-3")
        if perturb:
            file = out / "checkpoint-3" / "adapter_model.safetensors"
            tensors = load_file(file)
            key = next(k for k in tensors if k.startswith("method."))
            tensors[key] = tensors[key] + 0.5
            save_file(tensors, file)
        metrics = _run(tiny_bert_dir, sentiment_csv, out, 6, resume=True)
        trained = sorted({h["step"] for h in metrics["loss_history"] if "loss" in h})
        assert trained == [4, 5, 6], trained
        a, b = load_file(straight / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
        same = all(torch.equal(a[k], b[k]) for k in a)
        assert same != perturb, name


def test_an_incomplete_checkpoint_is_skipped(tiny_bert_dir, sentiment_csv, tmp_path, capsys):
    """A checkpoint missing its optimizer state (a process killed while writing it) is passed over for the one
    before it."""
    import shutil

    straight = tmp_path / "straight"
    _run(tiny_bert_dir, sentiment_csv, straight, 6, save_steps=2)  # keeps checkpoint-4 and checkpoint-6
    out = tmp_path / "out"
    shutil.copytree(straight / "checkpoint-4", out / "checkpoint-4")
    shutil.copytree(straight / "checkpoint-6", out / "checkpoint-6")
    (out / "checkpoint-6" / "optimizer.pt").unlink()
    capsys.readouterr()
    metrics = _run(tiny_bert_dir, sentiment_csv, out, 8, resume=True, save_steps=2)
    err = capsys.readouterr().err
    assert "resuming from" in err and "checkpoint-4" in err and "checkpoint-6" not in err
    assert sorted({h["step"] for h in metrics["loss_history"] if "loss" in h}) == [5, 6, 7, 8]
