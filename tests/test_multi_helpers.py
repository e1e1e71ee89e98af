"""Builders shared by the multi-adapter and serving tests (no tests here): a tiny BERT with a word-level tokenizer
saved like any HF folder, and randomly initialised adapters of several methods saved with training metadata."""

from __future__ import annotations

from pathlib import Path

import torch

import softprompt as sp
from softprompt.loading import HeadSpec, load_base

WORDS = "good great fine bad awful poor movie film the a is was very not plot actors".split()

# name -> (method, options, label names, task kind); chosen to cover every way adapters enter the forward pass.
ADAPTERS = {
    "prefix_a": ("prefix", {"num_virtual_tokens": 4}, ["neg", "pos"], "classification"),
    "prefix_b": ("prefix", {"num_virtual_tokens": 4, "seed": 1}, ["no", "yes", "maybe"], "classification"),
    "apt": ("apt", {"num_virtual_tokens": 4}, ["neg", "pos"], "classification"),
    "prefix_long": ("prefix", {"layer_lengths": [6, 0, 3]}, ["neg", "pos"], "classification"),
    "prompt_front": ("prompt", {"num_virtual_tokens": 3}, ["neg", "pos"], "classification"),
    "prompt_cls": ("prompt", {"num_virtual_tokens": 5, "position": "after_cls"}, ["a", "b", "c"], "classification"),
    "ptuning": ("ptuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}, ["neg", "pos"], "classification"),
    "lpt": ("lpt", {"num_virtual_tokens": 2, "layer": 1}, ["neg", "pos"], "classification"),
    "lpt_npg": ("lpt", {"num_virtual_tokens": 2, "layer": 1, "generator": "npg", "bottleneck": 8}, ["neg", "pos"],
                "classification"),
    "idspam": ("idspam", {"num_virtual_tokens": 2, "layer": 1, "bottleneck": 8}, ["neg", "pos"], "classification"),
    "score": ("prefix", {"num_virtual_tokens": 4, "seed": 2}, [], "regression"),
}


def make_tiny_base_dir(root: Path) -> str:
    """A tiny BERT (3 layers, hidden 32) + word-level tokenizer; the bare encoder is saved, as checkpoints are."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]",
                                  model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, initializer_range=0.3)
    root.mkdir(parents=True, exist_ok=True)
    BertModel(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return str(root)


def make_adapter(base_dir: str, out: Path, method: str, options: dict, labels: list[str], kind: str,
                 seed: int) -> str:
    """Wrap the base with ``method``, randomise every trainable tensor (values do not matter) and save it."""
    spec = HeadSpec(kind, labels)
    base, _ = load_base(base_dir, spec)
    model = sp.wrap(base, sp.config_from_dict(method, dict(options)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(out, label_names=labels, task_kind=kind, max_length=12, model_name=base_dir, task=None)
    return str(out)


def make_adapters(base_dir: str, root: Path, names=None) -> dict[str, str]:
    """Every adapter of :data:`ADAPTERS` (or the named ones) under ``root``."""
    out = {}
    for i, (name, (method, opts, labels, kind)) in enumerate(ADAPTERS.items()):
        if names is None or name in names:
            out[name] = make_adapter(base_dir, root / name, method, opts, labels, kind, seed=100 + i)
    return out


def texts(n: int, seed: int = 0) -> list[str]:
    """Sentences of different lengths from the tiny vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 9, (1,), generator=gen))
        out.append(" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=gen)))
    return out
