"""A generator training split over several calls (stop_after / max_seconds) ends bit-identical to one run."""

import pytest
import torch
from safetensors.torch import load_file
from test_dnd_generator import KW, zoo  # noqa: F401  (zoo: the module fixture)

from softprompt.dnd.generator import generate, train_generator


def test_interrupted_training_resumes_exactly(zoo, tiny_bert_dir, tmp_path):  # noqa: F811
    kw = {**KW, "prompts": zoo, "encoder": tiny_bert_dir, "keep_steps": (3,)}
    full = train_generator(zoo, None, tmp_path / "full", steps=7, **kw)
    assert full["complete"] and (tmp_path / "full" / "generator_step000003.safetensors").exists()
    part = train_generator(zoo, None, tmp_path / "split", steps=7, stop_after=2, **kw)
    assert not part["complete"] and part["step"] == 2 and (tmp_path / "split" / "train_state.pt").exists()
    assert not (tmp_path / "split" / "generator.safetensors").exists()
    part = train_generator(zoo, None, tmp_path / "split", steps=7, stop_after=3, **kw)
    assert part["step"] == 5 and len(part["losses"]) == 5
    done = train_generator(zoo, None, tmp_path / "split", steps=7, **kw)
    assert done["complete"] and done["losses"] == full["losses"]
    assert not (tmp_path / "split" / "train_state.pt").exists()
    a, b = (load_file(str(tmp_path / d / "generator.safetensors")) for d in ("full", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a kept step is a usable generator of its own, different from the final one
    s3, _ = generate(tmp_path / "split", ["the film was bad"], weights="generator_step000003.safetensors")
    s7, _ = generate(tmp_path / "split", ["the film was bad"])
    assert s3.keys() == s7.keys() and any(not torch.equal(s3[k], s7[k]) for k in s3)
    with pytest.raises(ValueError, match="another training"):
        train_generator(zoo, None, tmp_path / "split2", steps=7, stop_after=1, **kw)
        train_generator(zoo, None, tmp_path / "split2", steps=9, **kw)
    assert train_generator(zoo, None, tmp_path / "t", steps=7, max_seconds=0, **kw)["step"] == 0
