"""Tiny randomly initialised models (shapes only matter for engine tests; quality claims use real models)."""

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(2)


def tiny(kind: str, task: str = "lm", **kw):
    """A tiny model of family ``kind`` with a fixed seed."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    if kind == "llama":
        cfg = tf.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, **kw)
        return (tf.LlamaForSequenceClassification if task == "cls" else tf.LlamaForCausalLM)(cfg)
    if kind == "qwen2":
        cfg = tf.Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, **kw)
        return tf.Qwen2ForCausalLM(cfg)
    if kind == "mistral":
        cfg = tf.MistralConfig(**common, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, **kw)
        return tf.MistralForCausalLM(cfg)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=128, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
        return tf.GPT2LMHeadModel(cfg)
    if kind in ("bert", "roberta"):
        cls = tf.BertConfig if kind == "bert" else tf.RobertaConfig
        kw.setdefault("pad_token_id", 1)
        cfg = cls(**common, **kw)
        mod = tf.BertForSequenceClassification if kind == "bert" else tf.RobertaForSequenceClassification
        if task == "tok":
            mod = tf.BertForTokenClassification if kind == "bert" else tf.RobertaForTokenClassification
        cfg.num_labels = kw.get("num_labels", 3)
        return mod(cfg)
    raise ValueError(kind)


@pytest.fixture
def batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on row 0
    return ids, mask
