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
    assert result.returncode == 1, result.stderr[-500:]  # serve reports startup refusals as SystemExit(message)
    assert len(lines) == 1 and "over --max-adapter-bytes 1,000" in lines[0] and "'big'" in lines[0]
