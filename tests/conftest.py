"""Tiny randomly initialised models (shapes only matter for engine tests; quality claims use real models)."""

import csv
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(2)


def tiny(kind: str, task: str = "lm", **kw):
    """A tiny model of family ``kind`` with a fixed seed."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    if kind in ("llama", "qwen2", "qwen3", "mistral", "gpt2"):
        # Positions and attention patterns must matter, or a test could pass with a position or mask bug: at the
        # default init (std 0.02) every attention score is ~0 and attention is nearly uniform, so weights of std 0.3
        # and (rotary families) a fast rotary base, with which every rotary pair turns within a few positions.
        kw.setdefault("initializer_range", 0.3)
        if kind != "gpt2":
            kw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10.0})
    if kind == "llama":
        cfg = tf.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, **kw)
        return (tf.LlamaForSequenceClassification if task == "cls" else tf.LlamaForCausalLM)(cfg)
    if kind == "qwen2":
        cfg = tf.Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, **kw)
        return tf.Qwen2ForCausalLM(cfg)
    if kind == "qwen3":  # head_dim deliberately != hidden / heads (as in real Qwen3): shapes come from the probe
        cfg = tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                             pad_token_id=0, **kw)
        return tf.Qwen3ForCausalLM(cfg)
    if kind == "mistral":
        cfg = tf.MistralConfig(**common, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, **kw)
        return tf.MistralForCausalLM(cfg)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=128, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
        return tf.GPT2LMHeadModel(cfg)
    if kind == "xlm-roberta":
        kw.setdefault("pad_token_id", 1)
        cfg = tf.XLMRobertaConfig(**common, num_labels=3, **kw)
        return tf.XLMRobertaForSequenceClassification(cfg)
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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a busy 2-core machine spinning OpenMP threads made such
    tests up to 30-100x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on row 0
    return ids, mask


def save_tiny_bert(directory, words: list[str]) -> str:
    """Save a tiny bare BERT + a word-level tokenizer over ``words`` like a pretrained checkpoint folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + list(dict.fromkeys(words)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    # initializer_range 0.3: at the default 0.02 a tiny random encoder passes almost no signal through.
    tiny("bert", pad_token_id=0, initializer_range=0.3).bert.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny BERT + a word-level tokenizer over a small vocabulary, saved like any HF model folder."""
    words = ["good", "great", "fine", "bad", "awful", "poor", "movie", "film", "the", "a", "is", "was", "very", "not"]
    return save_tiny_bert(tmp_path_factory.mktemp("tinybert"), words)


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = []
    g = torch.Generator().manual_seed(0)
    for i in range(160):
        pos = i % 2 == 0
        word = ["good", "great", "fine"][i % 3] if pos else ["bad", "awful", "poor"][i % 3]
        noun = ["movie", "film"][int(torch.randint(0, 2, (1,), generator=g))]
        rows.append({"sentence": f"the {noun} was very {word}", "sentiment": "pos" if pos else "neg"})
    path = d / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sentence", "sentiment"])
        w.writeheader()
        w.writerows(rows)
    return str(path)


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (benchmarks/ is not a package), registered in ``sys.modules``
    (dataclasses defined in it need that)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"softprompt_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module



@pytest.fixture
def mix_order_on():
    """Inductor's mix-order reduction switched on for one test (its default on a GPU; softprompt.inductor turns it
    off), restored afterwards with Inductor's own patching (pytest's monkeypatch cannot restore config entries)."""
    from torch._inductor import config

    with config.patch({"triton.mix_order_reduction": True}):
        yield config


class OpRecorder(TorchDispatchMode):
    """Records the aten ops dispatched while active (``ops``: their names, in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# ---- fixtures of test modules split along themes (their other builders are in _helpers/) ---------------------------
@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """test_generation*.py: an adapter of every method (``_helpers.generation.CONFIGS``) saved once per module."""
    from _helpers.generation import CONFIGS, tiny_lm

    import softprompt as sp

    root = tmp_path_factory.mktemp("gen_adapters")
    paths = {}
    for name, config in CONFIGS.items():
        model = sp.wrap(tiny_lm(), config)
        if name == "lpt_npg":  # the generator starts near zero: give it weight so it matters
            with torch.no_grad():
                for p in model.method.parameters():
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(11))
        model.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.fixture
def padded(batch):
    """test_id_spam*.py: ``batch`` (3 x 9 ids, row 0 left-padded) with row 2 right-padded too."""
    ids, mask = batch
    mask = mask.clone()
    mask[2, 7:] = 0  # right padding on row 2
    return ids, mask


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """test_serve_limits*.py: base/, root/ (every kind of adapter, plus hostile ones), outside/ (a valid adapter
    outside the root) and root_sibling/ (one beside the root whose name starts with the root's: outside it all the
    same)."""
    import shutil

    from test_serve_helpers import adapter_tree, edit_config

    base, root, outside = adapter_tree(tmp_path_factory.mktemp("serve_limits"))
    sibling = root.parent / f"{root.name}_sibling"
    shutil.copytree(root / "prompt_cls", sibling / "prompt_cls")
    (root / "no_weights").mkdir()
    shutil.copy(root / "prompt_cls" / "adapter_config.json", root / "no_weights")
    (root / "dir_weights").mkdir()  # adapter_model.safetensors is a folder, not a file
    shutil.copy(root / "prompt_cls" / "adapter_config.json", root / "dir_weights")
    (root / "dir_weights" / "adapter_model.safetensors").mkdir()
    shutil.copytree(root / "prefix_a", root / "big_config")  # a valid config padded with spaces to over 1 MiB
    text = (root / "big_config" / "adapter_config.json").read_text()
    (root / "big_config" / "adapter_config.json").write_text(text + " " * 2**20)
    for name, options in {"float_tokens": {"num_virtual_tokens": 1e9},
                          "huge_mlp": {"projection": True, "projection_hidden_size": 10**7},
                          "many_layers": {"layer_lengths": [4] * 1000}, "layer_out": {"layers": [0, 99]}}.items():
        shutil.copytree(root / "prefix_a", root / name)
        edit_config(root / name, **options)
    return {"base": base, "root": root, "outside": outside, "sibling": sibling}


@pytest.fixture(scope="module")
def model(tree):
    """test_serve_limits*.py: a model serving prefix_a of ``tree``."""
    from softprompt.multi import MultiAdapterModel

    return MultiAdapterModel(tree["base"], {"prefix_a": tree["root"] / "prefix_a"})


@pytest.fixture
def only_prefix_a(model):
    """Each test starts from, and leaves, a model holding prefix_a only (a failed test must not fail the next):
    test_serve_limits*.py use it for every test (``pytestmark``)."""
    yield
    for name in model.adapter_names:
        if name != "prefix_a":
            model.remove_adapter(name)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """test_openai_server*.py: the tiny LM with its tokenizer, and its adapters (``_helpers.openai_server``)."""
    from _helpers.openai_server import ADAPTERS, lm, tokenizer

    import softprompt as sp

    root = tmp_path_factory.mktemp("openai")
    base = root / "base"
    lm().save_pretrained(base)
    tokenizer().save_pretrained(base)
    paths = {}
    for name, config in ADAPTERS.items():
        sp.wrap(lm(), config).save_pretrained(root / name)
        paths[name] = str(root / name)
    return str(base), paths


@pytest.fixture
def varied_csv(tmp_path):
    """test_compile_*.py: 64 sentences of 2-30 words (labels at random): batches of two fall into several length
    buckets."""
    import csv
    import random

    rng = random.Random(0)
    words = ["good", "bad", "movie", "the", "was", "very", "not"]
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sentence", "sentiment"])
        w.writeheader()
        w.writerows({"sentence": " ".join(rng.choice(words) for _ in range(rng.randint(2, 30))),
                     "sentiment": rng.choice(["pos", "neg"])} for _ in range(64))
    return str(path)
