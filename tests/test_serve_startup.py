"""Adapters given at startup pass the same byte cap as adapters added at run time, checked before the model loads."""

from conftest import tiny
from test_serve_helpers import run_serve

import softprompt as sp


def test_startup_adapter_over_the_byte_cap_is_one_line(tmp_path):
    folder = tmp_path / "big"
    sp.wrap(tiny("llama"), sp.PrefixConfig(num_virtual_tokens=8)).save_pretrained(folder)
    result = run_serve(["--model", str(tmp_path / "no-model-needed"), "--adapter", f"big={folder}",
                        "--max-adapter-bytes", "1000"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-500:]  # a refused configuration, like every command's
    assert len(lines) == 1 and "over --max-adapter-bytes 1,000" in lines[0] and "'big'" in lines[0]


def test_serving_without_fastapi_is_one_returned_line(monkeypatch, capsys):
    """Without the serving extra, ``main`` returns 1 with the install command (it raised ``SystemExit`` before)."""
    import sys

    from softprompt.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` now raises ModuleNotFoundError
    assert main(["serve", "--model", "no-such-model"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["softprompt serve: error: serving needs fastapi: pip install 'softprompt[serve]' (fastapi, "
                     "uvicorn)"], lines
