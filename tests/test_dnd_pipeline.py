"""Drag-and-Drop end to end on CPU: zoo of 2 real datasets on a tiny Llama, generator, zero-shot adapter, eval."""

import json
import time
from argparse import Namespace

from conftest import tiny
from test_dnd_harness import _tok

from softprompt.dnd.cli import generate_main, train_main
from softprompt.dnd.harness import evaluate
from softprompt.dnd.zoo import build_zoo


def test_zoo_train_generate_eval_under_two_minutes(tiny_bert_dir, tmp_path):
    from peft import PeftModel

    start = time.time()
    tok = _tok()
    datasets = ["commonsense/arc_easy", "superglue/boolq"]
    zoo = tmp_path / "zoo"
    build_zoo("tiny", datasets, rank=2, targets="all", warmup_steps=2, checkpoints=3, out=zoo, lr=1e-2,
              batch_size=4, max_length=64, train_limit=8, dev_limit=0, device="cpu", model=tiny("llama"),
              tokenizer=tok, progress=False)
    gen = tmp_path / "gen"
    # Hold BoolQ out: the generator sees only ARC-Easy checkpoints and BoolQ's unlabeled prompts at generation.
    train_main(Namespace(zoo=str(zoo), holdout="superglue/boolq", out=str(gen), steps=5, encoder=tiny_bert_dir,
                         n_prompts=4, batch_size=2, width=8, n_layers=2, kernel=3, chunk=16, max_length=32,
                         device="cpu", log_every=100))
    adapter = tmp_path / "boolq-adapter"
    report = generate_main(Namespace(generator=str(gen), prompts="superglue/boolq", out=str(adapter)))
    assert report["finite"] and "nearest" in report
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    base = tiny("llama").eval()
    model = PeftModel.from_pretrained(tiny("llama"), str(adapter)).eval()
    with_adapter = evaluate(model, tok, "superglue/boolq", "dnd:test", limit=4, batch_size=4, progress=False)
    bare = evaluate(base, tok, "superglue/boolq", "dnd:test", limit=4, batch_size=4, progress=False)
    assert with_adapter["n"] == bare["n"] == 4
    assert time.time() - start < 120
