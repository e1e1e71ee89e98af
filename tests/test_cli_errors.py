"""Bad command lines get one line on stderr, the right exit code, and change nothing on disk."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from softprompt.cli import main


def tree_hash(folder) -> str:
    """A hash of every file's path and bytes under ``folder``."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture
def train_args(tiny_bert_dir, sentiment_csv):
    def make(output, *extra):
        return ["train", "--method", "prefix", "--model", tiny_bert_dir, "--file", sentiment_csv, "--text-column",
                "sentence", "--label-column", "sentiment", "--output", str(output), "--max-steps", "2",
                "--batch-size", "8", *extra]
    return make


@pytest.fixture
def someone_elses_folder(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "adapter_config.json").write_text('{"method": "prompt"}')
    (out / "README.md").write_text("my notes")
    (out / "metrics.json").write_text("{}")
    return out


@pytest.mark.parametrize("extra, needle", [
    ((), "holds checkpoints of another run"),
    (("--overwrite",), "holds checkpoints of another run"),  # --overwrite never deletes another run's checkpoints
])
def test_output_with_another_runs_checkpoints_is_refused(train_args, someone_elses_folder, capsys, extra, needle):
    before = tree_hash(someone_elses_folder)
    code, err = run(train_args(someone_elses_folder, *extra), capsys)
    assert code == 2 and needle in err and "--resume" in err
    assert tree_hash(someone_elses_folder) == before


def test_non_empty_output_needs_overwrite(train_args, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "README.md").write_text("keep me")
    before = tree_hash(out)
    code, err = run(train_args(out), capsys)
    assert code == 2 and "--overwrite" in err and "--resume" in err and "README.md" in err
    assert tree_hash(out) == before
    assert run(train_args(out, "--overwrite"), capsys)[0] == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_resume_names_the_checkpoint_or_says_it_starts_fresh(train_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(out, "--resume", "--save-steps", "1"), capsys)[0] == 0
    code = main(train_args(out, "--resume", "--save-steps", "1", "--max-steps", "3"))
    err = capsys.readouterr().err
    assert code == 0 and "resuming from" in err and "checkpoint-2" in err
    before = tree_hash(out)
    other = train_args(out, "--resume")
    other[other.index("prefix")] = "ptuning"
    code, last = run(other, capsys)
    assert code == 2 and "holds a 'prefix' run" in last and "--method prefix" in last
    assert tree_hash(out) == before
    # A run killed before its end has no adapter at the top: the method is read from its newest checkpoint.
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "README.md"):
        (out / name).unlink(missing_ok=True)
    before = tree_hash(out)
    code, last = run(other, capsys)
    assert code == 2 and "holds a 'prefix' run" in last and "--method prefix" in last
    assert tree_hash(out) == before


def test_ctrl_c_names_the_checkpoint_and_the_command_that_continues(train_args, tmp_path, monkeypatch, capsys):
    """Interrupted: exit 130, one line naming the last checkpoint and the same command with one --resume."""
    import softprompt.train as tr

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "train", interrupted)
    monkeypatch.setattr("softprompt.train.trainer.last_checkpoint", lambda out: f"{out}/checkpoint-1")
    out = tmp_path / "run"
    argv = train_args(out, "--resume", "--save-steps", "1")
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the last checkpoint is {out}/checkpoint-1" in err[0]
    again = err[0].split("Continue with: ")[1]
    assert again.startswith("softprompt train ") and again.count("--resume") == 1 and again.endswith(" --resume")
    assert str(out) in again and "--save-steps 1" in again


@pytest.mark.parametrize("extra, needle", [
    (("--lr", "nan"), "--lr must be a positive finite number"),
    (("--num-virtual-tokens", "0"), "num_virtual_tokens=0 leaves no prefix"),
    (("--num-virtual-tokens", "1000000000"), "positions"),
    (("--batch-size", "0"), "--batch-size must be"),
    # The bounds themselves: a rate of 0 trains nothing, a carve of 1 leaves nothing to train on.
    (("--lr", "0"), "--lr must be a positive finite number"),
    (("--lr", "-0.001"), "--lr must be a positive finite number"),
    (("--carve-dev", "1"), "--carve-dev must be a fraction in [0, 1)"),
    (("--carve-dev", "-0.1"), "--carve-dev must be a fraction in [0, 1)"),
    (("--save-steps", "0"), "--save-steps must be >= 1"),
    (("--max-steps", "-1", "--epochs", "0"), "--epochs must be > 0"),
    (("--max-steps", "-1", "--epochs", "inf"), "--epochs must be > 0"),
])
def test_bad_values_are_one_line_before_anything_is_written(train_args, tmp_path, capsys, extra, needle):
    out = tmp_path / "never"
    code, err = run(train_args(out, *extra), capsys)
    assert code == 2 and needle in err, err
    assert not out.exists()


def test_output_that_is_a_file_and_layer_lengths_that_are_not_json(train_args, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    code, err = run(train_args(f), capsys)
    assert code == 2 and "is a file" in err and f.read_text() == "x"
    csv = tmp_path / "lengths.csv"
    csv.write_text("a,b\n1,2\n")
    code, err = run(train_args(tmp_path / "o", "--layer-lengths", str(csv)), capsys)
    assert code == 2 and "not a readable JSON file" in err and str(csv) in err


def test_unknown_model_is_one_line_and_does_not_wait_for_the_hub(sentiment_csv, tmp_path, capsys, monkeypatch):
    """A user file, not a registry task: the data is read before the model, and must be found wherever the tests run
    (a checkout without ../shared/data failed here on the data, not on the model)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    args = ["train", "--method", "prefix", "--model", "nosuchmodel-xyz", "--file", sentiment_csv, "--text-column",
            "sentence", "--label-column", "sentiment", "--output", str(tmp_path / "o")]
    code, err = run(args, capsys)
    assert code == 2 and "cannot load model 'nosuchmodel-xyz'" in err
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    import softprompt.cli.train as cli_train

    def boom(args):
        raise RuntimeError("deep\ninside")

    monkeypatch.setattr(cli_train, "cmd_tasks", boom)
    code, err = run(["tasks"], capsys)
    assert code == 1
    assert err == "softprompt tasks: error: RuntimeError: deep inside (run with --debug for the traceback)"
    with pytest.raises(RuntimeError):
        main(["--debug", "tasks"])


def test_eval_on_a_task_with_other_labels_or_kind_is_refused(train_args, tmp_path, capsys):
    out = tmp_path / "sentiment"
    assert main(train_args(out)) == 0
    capsys.readouterr()
    code, err = run(["eval", "--adapter", str(out), "--task", "superglue/cb"], capsys)
    assert code == 2 and "predicts labels ['neg', 'pos']" in err and "superglue/cb has labels" in err
    code, err = run(["eval", "--adapter", str(out), "--task", "glue/stsb"], capsys)
    assert code == 2 and "is a classification adapter and glue/stsb is a regression task" in err
    # As many labels, other names: ids would be read as the wrong classes.
    code, err = run(["eval", "--adapter", str(out), "--task", "glue/sst2"], capsys)
    assert code == 2 and "predicts labels ['neg', 'pos'] but glue/sst2 has labels ['negative', 'positive']" in err


def test_carve_dev_is_checked(train_args, tmp_path, capsys):
    code, err = run(train_args(tmp_path / "o", "--carve-dev", "1.5"), capsys)
    assert code == 2 and "--carve-dev must be a fraction" in err
    code, err = run(train_args(tmp_path / "o", "--carve-dev", "0.1"), capsys)
    assert code == 2 and "--eval-file" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["predict", "--adapter", "nan"], "softprompt predict: error: no texts: give --text"),
    (["train", "--method", "prefix", "--model", "m", "--output", "o"], "softprompt train: error: no training data"),
    (["probe", "--output", "o"], "softprompt probe: error: no training data"),
    (["probe-predict", "--probe", "p", "--text", "a", "--text", "b", "--text-pair", "c"],
     "softprompt probe-predict: error: 1 --text-pair for 2 --text"),
])
def test_missing_inputs_are_a_returned_usage_error_not_an_exit(argv, message, tmp_path, monkeypatch, capsys):
    """Commands that lack their inputs return exit 2 with the one-line error (main() raised SystemExit with a bare
    message before, which printed no "error" line and skipped main's handler when called from Python)."""
    monkeypatch.chdir(tmp_path)
    code, err = run(argv, capsys)
    assert code == 2 and err.startswith(message), err
    assert not any(tmp_path.iterdir())  # nothing written


def test_gates_without_a_task_is_refused_before_the_model_loads(tmp_path, capsys):
    """An adapter that records no registry task, with neither --task nor --file: the one-line usage error comes from
    the adapter's config alone (its base model here does not exist, so loading it would fail otherwise)."""
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"method": "apt", "config": {}, "base_model": {"name_or_path": str(tmp_path / "no-model")}}))
    code, err = run(["gates", "--adapter", str(adapter)], capsys)
    assert code == 2 and err.startswith("softprompt gates: error: give --task NAME or --file F"), err
