"""``softprompt theory`` on bad sizes and bad files: one-line errors before anything is allocated or written."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path

import pytest

from softprompt.errors import ConfigError
from softprompt.theory import limits
from softprompt.theory.cli import curves, main
from softprompt.theory.config import TaskMixture, preset
from softprompt.theory.montecarlo import monte_carlo

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only contend


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes: equal before and after means nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("softprompt theory: error: ")
    return lines[0]


def test_huge_d_in_a_config_file_is_refused_before_allocation(tmp_path, capsys) -> None:
    cfg = tmp_path / "big.json"
    cfg.write_text(json.dumps({"d": 100_000, "mus": [1, -1], "cs": [1, 1], "pis": [0.5, 0.5]}))
    before = _tree(tmp_path)
    rc, out, err = _run(["curves", "--config", str(cfg), "--json", str(tmp_path / "o.json"),
                         "--plot", str(tmp_path / "o.png")], capsys)
    line = _one_error_line(err)
    assert rc == 2 and out == ""
    assert str(cfg) in line and "'d' = 100000" in line and "over the limit of" in line and "use d <= " in line
    assert limits.ENV_VAR in line  # how to change the limit
    assert _tree(tmp_path) == before
    # The Python API: refused with ConfigError (a ValueError) and without allocating the 74.5 GiB matrices.
    tracemalloc.start()
    with pytest.raises(ConfigError, match=r"'d' = 100000: needs about 1\.6 TiB"):
        TaskMixture(100_000, [1.0, -1.0], [1.0, 1.0], [0.5, 0.5])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2**20, peak


def test_limit_and_the_suggested_d_follow_the_estimate(monkeypatch) -> None:
    monkeypatch.setenv(limits.ENV_VAR, "64MiB")
    assert limits.memory_limit().bytes == 64 * 2**20
    with pytest.raises(ConfigError) as err:
        preset("zero_cov_12", d=2000)
    best = int(str(err.value).rsplit("use d <= ", 1)[1])
    # The suggested d is the largest that fits, and it does build.
    assert limits.mixture_bytes(best, 2) <= 64 * 2**20 < limits.mixture_bytes(best + 1, 2)
    assert preset("zero_cov_12", d=best).d == best
    monkeypatch.setenv(limits.ENV_VAR, "lots")
    with pytest.raises(ConfigError, match=f"{limits.ENV_VAR}='lots' is not a size"):
        limits.memory_limit()


def test_too_many_context_lengths_name_the_flag(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv(limits.ENV_VAR, "1MiB")
    ns = ",".join(str(i) for i in range(2000))
    rc, out, err = _run(["curves", "--config", "zero_cov_12", "--n", ns, "--json", str(tmp_path / "o.json")], capsys)
    line = _one_error_line(err)
    assert rc == 2 and out == "" and "(--n) = 2000" in line
    assert "give at most " in line and "values of --n per run" in line
    assert list(tmp_path.iterdir()) == []


def test_monte_carlo_draws_in_smaller_chunks_instead_of_failing(monkeypatch) -> None:
    mix = preset("noisy_nonzero_cov_11")
    monkeypatch.setenv(limits.ENV_VAR, "4MiB")
    chunk = limits.fit_mc_chunk(mix.d, 50, 100_000)
    assert 1 <= chunk < 100_000 and chunk * limits.mc_draw_bytes(mix.d, 50) <= 4 * 2**20
    res = monte_carlo(mix, 50, "pt", draws=3000)  # the default chunk of 100000 would need 135 MiB here
    assert res.draws == 3000 and res.se > 0
    # One draw that can never fit is refused, naming n and the largest n that fits.
    with pytest.raises(ConfigError, match=r"context length n = 10000000: .* use n <= \d+"):
        monte_carlo(mix, 10_000_000, "pt", draws=10)


def test_huge_training_batch_refused_before_any_work(tmp_path, capsys) -> None:
    rc, out, err = _run(["curves", "--config", "zero_cov_12", "--n", "1,10", "--mc", "--train", "--steps", "1",
                         "--batch", "1000000000", "--json", str(tmp_path / "o.json")], capsys)
    line = _one_error_line(err)
    assert rc == 2 and out == ""  # no table: nothing was computed before the refusal
    assert "training batch (--batch) = 1000000000" in line and "use --batch <= " in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("flag", "value", "expect"), [
    ("--mc-draws", "0", "must be >= 2"), ("--mc-draws", "-5", "must be >= 2"), ("--mc-draws", "1", "must be >= 2"),
    ("--batch", "0", "must be >= 1"), ("--runs", "0", "must be >= 1"), ("--steps", "-1", "must be >= 1"),
    ("--lr", "nan", "finite number > 0"), ("--n", "-3", "must be >= 0"),
])
def test_counts_below_their_minimum_are_usage_errors(flag, value, expect, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as ex:
        main(["curves", "--config", "zero_cov_12", "--mc", flag, value, "--json", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and f"argument {flag}: " in err and expect in err
    assert list(tmp_path.iterdir()) == []
    if flag == "--mc-draws":  # the Python API refuses too (0 means "no Monte-Carlo" there)
        with pytest.raises(ValueError, match="mc_draws must be 0"):
            curves(preset("zero_cov_12"), [1], mc_draws=int(value) if value != "0" else -1)


@pytest.mark.parametrize(("content", "expect"), [
    (None, "file not found"),
    ("{", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, found a JSON list"),
    ('{"theory": {"pt": [1.0]}}', "key 'n' must be a non-empty list"),
    ('{"n": [1, 2], "theory": {"pt": [1.0]}}', "theory['pt'] must be a list of 2 numbers"),
    ('{"n": [1], "theory": {"bogus": [1.0]}}', "key 'theory' must map at least one regime"),
    ('{"n": [1], "theory": {"pt": [1.0]}, "mc": {"pt": {"normalised": [1]}}}', "mc['pt'] must hold"),
])
def test_plot_on_a_bad_file_names_the_file_and_the_problem(content, expect, tmp_path, capsys) -> None:
    src = tmp_path / "curves.json"
    if content is not None:
        src.write_text(content)
    before = _tree(tmp_path)
    rc, _, err = _run(["plot", str(src), str(tmp_path / "out.png")], capsys)
    line = _one_error_line(err)
    assert rc == 2 and f"{src}: " in line and expect in line and "theory curves --json" in line
    assert _tree(tmp_path) == before  # no PNG written


def test_output_paths_that_are_folders_are_refused_before_the_run(tmp_path, capsys) -> None:
    rc, out, err = _run(["curves", "--config", "zero_cov_12", "--n", "1", "--json", str(tmp_path)], capsys)
    assert rc == 2 and out == "" and f"--json {tmp_path} is a directory" in _one_error_line(err)
    (tmp_path / "good.json").write_text(json.dumps({"n": [1], "theory": {"pt": [0.9]}}))
    before = _tree(tmp_path)
    rc, _, err = _run(["plot", str(tmp_path / "good.json"), str(tmp_path)], capsys)
    assert rc == 2 and "is a directory; give a file name" in _one_error_line(err)
    assert _tree(tmp_path) == before


def test_unreadable_configs_name_the_file(tmp_path, capsys) -> None:
    bad = tmp_path / "cfg.json"
    bad.write_bytes(b"\xff\xfe not utf-8")
    rc, _, err = _run(["curves", "--config", str(bad)], capsys)
    assert rc == 2 and f"{bad}: cannot read the theory config" in _one_error_line(err)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    rc, _, err = _run(["curves", "--config", str(deep)], capsys)
    assert rc == 2 and f"{deep}: not valid JSON" in _one_error_line(err)
