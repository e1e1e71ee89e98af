"""``softprompt dnd generate`` on a user's own prompt file (JSONL, TXT, CSV column): the output loads with plain PEFT,
an existing --out is refused without --overwrite, bad files get one-line errors."""

import csv
import json

import pytest
import torch
from conftest import tiny
from test_dnd_generator import KW, zoo  # noqa: F401  (zoo: the module fixture)

from softprompt.dnd.cli import generate_main
from softprompt.dnd.condition import read_prompts
from softprompt.dnd.export import read_lora_tensors
from softprompt.dnd.generator import train_generator
from softprompt.errors import SoftPromptError

PROMPTS = ["the film was very bad", "not a good movie", "an awful plot"]


@pytest.fixture(scope="module")
def gen(zoo, tiny_bert_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("gen")
    train_generator(zoo, None, out, steps=3, prompts=zoo, encoder=tiny_bert_dir, **KW)
    return out


def _files(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n\n")
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "review"])
        w.writerows([[i, p] for i, p in enumerate(PROMPTS)])
    return tmp_path


def test_read_prompts_formats(tmp_path):
    d = _files(tmp_path)
    assert read_prompts(d / "p.jsonl") == read_prompts(d / "p.txt") == PROMPTS
    assert read_prompts(d / "p.csv", column="review") == PROMPTS
    with pytest.raises(ValueError, match="--column NAME"):
        read_prompts(d / "p.csv")  # no prompt-like header and no --column
    with pytest.raises(ValueError, match=r"applies to \.csv"):
        read_prompts(d / "p.txt", column="review")


def test_generate_from_user_file_loads_with_peft(gen, tmp_path):
    from peft import PeftModel

    d = _files(tmp_path)
    outs = {}
    for name, column in (("p.jsonl", None), ("p.txt", None), ("p.csv", "review")):
        out = tmp_path / f"lora-{name}"
        generate_main(type("A", (), {"generator": str(gen), "prompts": str(d / name), "column": column,
                                     "out": str(out), "seed": 0})())
        outs[name] = read_lora_tensors(out)
    # the same prompts in three formats give the same adapter
    assert all(torch.equal(outs["p.jsonl"][k], outs[n][k]) for n in ("p.txt", "p.csv") for k in outs["p.jsonl"])
    base = tiny("llama").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        y0 = base(ids).logits.clone()
        model = PeftModel.from_pretrained(base, str(tmp_path / "lora-p.jsonl")).eval()
        y1 = model(ids).logits
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_A" in n)
    assert n_lora == 21 and not torch.allclose(y0, y1)


def test_generate_refuses_existing_out(gen, tmp_path):
    d = _files(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("user data")

    def args(**kw):
        return type("A", (), {"generator": str(gen), "prompts": str(d / "p.txt"), "out": str(out), **kw})()

    with pytest.raises(SoftPromptError, match="--overwrite") as e:
        generate_main(args())
    assert "\n" not in str(e.value) and not (out / "adapter_model.safetensors").exists()
    generate_main(args(overwrite=True))
    assert (out / "adapter_model.safetensors").exists() and (out / "keep.txt").exists()
    with pytest.raises(SoftPromptError, match="pass --column NAME"):
        generate_main(args(prompts=str(d / "p.csv"), overwrite=True))
    with pytest.raises(SoftPromptError, match="no such file or dataset"):
        generate_main(type("A", (), {"generator": str(gen), "prompts": str(d / "missing.jsonl"),
                                     "out": str(tmp_path / "x")})())


def test_generated_adapter_runs_in_dnd_eval(gen, tmp_path, capsys):
    from test_dnd_harness import _tok

    from softprompt.dnd.cli import eval_main

    folder = tmp_path / "tiny-llama"
    tiny("llama").save_pretrained(folder)
    _tok(chat=False).save_pretrained(folder)
    d = _files(tmp_path)
    out = tmp_path / "lora"
    generate_main(type("A", (), {"generator": str(gen), "prompts": str(d / "p.txt"), "out": str(out)})())
    args = {"model": str(folder), "dataset": "arc_easy", "limit": 4, "device": "cpu", "out": str(tmp_path / "r.json")}
    bare = eval_main(type("A", (), {**args, "adapter": None})())
    res = eval_main(type("A", (), {**args, "adapter": str(out)})())
    assert res["n"] == bare["n"] == 4 and res["chance"] == 0.25 and res["format"] == "cloze"
    assert json.loads((tmp_path / "r.json").read_text())["acc_norm"] == res["acc_norm"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].split()[-1] == "chance" and lines[-1].split()[-1] == "25.0"
