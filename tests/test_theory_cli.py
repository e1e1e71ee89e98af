"""``softprompt theory`` command line: curves, JSON, PNG, user configs, errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from softprompt.theory.cli import add_theory_parser, main
from softprompt.theory.closed_form import closed_form
from softprompt.theory.config import preset

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only contend


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_curves_writes_json_and_png(tmp_path, capsys) -> None:
    out_json, out_png = tmp_path / "z.json", tmp_path / "z.png"
    rc = main(
        ["curves", "--config", "zero_cov_12", "--n", "1,10,20", "--json", str(out_json), "--plot", str(out_png),
         "--mc", "--mc-draws", "3000", "--quiet"]
    )
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert data["n"] == [1, 10, 20] and data["norm"] == pytest.approx(25.4)
    np.testing.assert_allclose(data["theory"]["jt"], closed_form(preset("zero_cov_12"), [1, 10, 20], "jt", True).loss)
    assert set(data["mc"]) == {"pt", "ft", "jt", "dec"}
    assert all(abs(z) < 5 for r in data["mc"] for z in data["mc"][r]["z"])
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    text = capsys.readouterr().out
    assert "0.4736" in text and "theory" in text


def test_curves_with_training_and_user_config(tmp_path) -> None:
    cfg = {
        "name": "mine",
        "d": 3,
        "mus": [[1.0, 0.0, -1.0], -0.5, 0.25],
        "cs": [1.0, [0.5, 1.0, 1.5], [[1.0, 0.2, 0.0], [0.2, 1.0, 0.1], [0.0, 0.1, 0.5]]],
        "pis": [0.2, 0.5, 0.3],
        "sigma": [0.1, 0.0, 0.2],
        "sigma_x": [1.0, 2.0, 0.5],
    }
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(cfg))
    out_json, out_png = tmp_path / "m.json", tmp_path / "m.png"
    rc = main(
        ["curves", "--config", str(path), "--n", "2,5", "--regimes", "pt,ft,jt,dec,oracle", "--train", "--steps", "20",
         "--runs", "2", "--batch", "64", "--eval-batches", "2", "--json", str(out_json), "--plot", str(out_png),
         "--layout", "overlay", "--quiet"]
    )
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert data["config"]["name"] == "mine" and data["config"]["d"] == 3
    assert set(data["train"]) == {"pt", "ft", "jt", "dec"} and "oracle" in data["theory"]
    assert len(data["train"]["dec"]["runs"]) == 2 and len(data["train"]["dec"]["runs"][0]) == 2
    assert data["train"]["ft"]["config"]["pretrain_steps"] == 20
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    # Redraw the figure from the JSON alone.
    again = tmp_path / "again.png"
    assert main(["plot", str(out_json), str(again)]) == 0
    assert again.read_bytes()[:8] == PNG_MAGIC


def test_bad_config_exit_code_and_message(tmp_path, capsys) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"d": 2, "mus": [1, 1], "cs": [1, [[1, 3], [3, 1]]], "pis": [0.5, 0.5]}))
    assert main(["curves", "--config", str(path), "--quiet"]) == 2
    assert "'cs[1]'" in capsys.readouterr().err
    assert main(["curves", "--config", "not_a_preset"]) == 2
    with pytest.raises(SystemExit):
        main(["curves", "--n", "1,x"])


def test_yaml_config(tmp_path) -> None:
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"d": 2, "mus": [1.0, -1.0], "cs": [1.0, 1.0], "pis": [0.5, 0.5], "sigma": 0.1}))
    out = tmp_path / "c.json"
    assert main(["curves", "--config", str(path), "--n", "1,3", "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["config"]["name"] == "c"


def test_add_theory_parser_registers_subcommand(capsys) -> None:
    parser = argparse.ArgumentParser(prog="softprompt")
    subs = parser.add_subparsers(dest="command")
    add_theory_parser(subs)
    args = parser.parse_args(["theory", "curves", "--config", "nonzero_cov_11", "--n", "1,10"])
    assert callable(args.func)
    assert args.func(args) == 0
    assert "0.4258" in capsys.readouterr().out
    args = parser.parse_args(["theory", "configs"])
    assert args.func(args) == 0
    assert "zero_cov_12" in capsys.readouterr().out
    args = parser.parse_args(["theory", "configs", "--show", "noisy_zero_cov_11"])
    assert args.func(args) == 0 and '"sigma": 0.3' in capsys.readouterr().out
    args = parser.parse_args(["theory"])
    assert args.func(args) == 2
