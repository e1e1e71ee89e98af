"""Hypothesis over command lines: whatever the flags and values, the CLI ends with a usage message (exit 2) or one
line naming the problem (exit 1 or 2), never a traceback. Subcommands and values are drawn so that no draw can start
real work (no valid method name, no existing adapter, bank or model path): every run ends within a second."""

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from softprompt.cli import main  # noqa: E402

# Heads that get past argparse to the commands themselves (a model path that does not exist stops training before any
# weights load; the random flags after the head may override any of it).
COMMANDS = [["train"], ["eval"], ["predict"], ["gates"], ["prune"], ["explain"], ["represent"], ["probe"],
            ["probe-predict"],
            ["train", "--method", "prefix", "--model", "/nonexistent/m", "--task", "glue/sst2", "--output", "o"],
            ["train", "--method", "apt", "--model", "/nonexistent/m", "--file", "/nonexistent/f.csv", "--output", "o"],
            ["eval", "--adapter", "/nonexistent/a", "--task", "glue/sst2"],
            ["predict", "--adapter", "/nonexistent/a", "--text", "hi"],
            ["prune", "--adapter", "/nonexistent/a", "--budget", "3"],
            ["explain", "--adapter", "/nonexistent/a", "--text", "hi"]]
FLAGS = ["--method", "--model", "--task", "--file", "--output", "--adapter", "--lr", "--num-virtual-tokens",
         "--batch-size", "--max-length", "--layer", "--layer-lengths", "--option", "--label-map", "--text", "--budget",
         "--bank", "--probe", "--input", "--out", "--split", "--limit", "--carve-dev", "--readout", "--resume",
         "--overwrite", "--epochs", "--max-steps", "--seed"]
VALUES = ["nan", "inf", "-1", "0", "1e9", "prefixx", "glue/nope", "/nonexistent/x", "x=y", "", "{}", "[1]", "mean",
          "0.5", "ümlaut", "a" * 300, "--", "-"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(COMMANDS), st.lists(st.sampled_from(FLAGS + VALUES), max_size=8))
def test_any_command_line_ends_in_one_line(tmp_path, capsys, monkeypatch, command, rest):
    monkeypatch.chdir(tmp_path)
    argv = command + rest  # the drawn part never names a real method or model: nothing can start real work
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        code = exc.code if isinstance(exc.code, int) else 2
    err = capsys.readouterr().err
    assert code in (0, 1, 2), (argv, code, err[-300:])
    assert "Traceback" not in err, (argv, err[-500:])
    if code == 1 or (code == 2 and "usage:" not in err):
        lines = [line for line in err.strip().splitlines() if line.startswith("softprompt")]
        assert len(lines) == 1 and "error" in lines[0], (argv, err[-500:])
