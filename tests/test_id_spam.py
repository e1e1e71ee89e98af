"""ID-SPAM: insertion against manual layer-by-layer references (encoders and decoders), generation, gradients (also
checkpointed), save/load, bf16 and explanations; the generator alone is in test_id_spam_generator.py. Tiny random
models only; the whole file runs in well under a minute on 2 CPU cores."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers.id_spam import info
from conftest import tiny
from torch import nn

import softprompt as sp
from softprompt.errors import ConfigError, SequenceTooLongError
from softprompt.methods import config_from_dict
from softprompt.methods.id_spam import IDSPAM, IDSPAMConfig
from softprompt.methods.id_spam import explain as id_spam_explain

ENCODERS = ("bert", "roberta")
DECODERS = ("llama", "gpt2")


# ---- builders -----------------------------------------------------------------------------------------------------
def no_dropout(model: nn.Module) -> nn.Module:
    """Zero every dropout of a base model so train-mode runs are deterministic (checkpointing comparisons)."""
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return model


def rescaled(model: nn.Module) -> nn.Module:
    """Re-initialise weights at unit scale (linear std 1/sqrt(fan_in), embeddings std 1; fixed seed).

    With the tiny models' default std 0.02 the logits are ~1e-2 and a prompt changes them by ~1e-4, so an absolute
    tolerance of 1e-5 would prove little; at unit scale the same tolerance is a relative check."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's projections: weight [in, out]

    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) / math.sqrt(mod.in_features))
            elif isinstance(mod, Conv1D):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) / math.sqrt(mod.weight.shape[0]))
            elif isinstance(mod, nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen))
    return model


def base_model(kind: str, task: str | None = None) -> nn.Module:
    return rescaled(tiny(kind, task or ("cls" if kind in ENCODERS else "lm")))


def wrapped(kind: str, task: str | None = None, randomize: bool = True, **cfg) -> sp.SoftPromptModel:
    """A tiny unit-scale model wrapped with ID-SPAM (dropout 0). ``randomize`` gives the generator unit-scale
    weights so that the prompt is as large as the hidden states (every comparison below is sensitive to it)."""
    cfg.setdefault("dropout", 0.0)
    cfg.setdefault("layer", 1)
    model = sp.wrap(no_dropout(base_model(kind, task)), IDSPAMConfig(**cfg))
    if randomize:
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.method.parameters():
                fan_in = p.shape[-1] if p.dim() == 2 else 1
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model


def prompt_of(model: sp.SoftPromptModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.method.generate_prompt(model.base_model.get_input_embeddings()(ids), mask)


def layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ---- config and registry ------------------------------------------------------------------------------------------
def test_registry_and_validation():
    assert sp.IDSPAMConfig is IDSPAMConfig
    cfg = config_from_dict("idspam", {"num_virtual_tokens": 4, "up_activation": "none"})
    assert isinstance(cfg, IDSPAMConfig) and cfg.num_virtual_tokens == 4
    assert (IDSPAMConfig().num_virtual_tokens, IDSPAMConfig().bottleneck, IDSPAMConfig().up_activation) == (10, 34,
                                                                                                           "relu")
    for bad in ({"up_activation": "gelu"}, {"bottleneck": 0}, {"dropout": 1.0}, {"pooling": "max"},
                {"embed_source": "x"}, {"position": "end"}, {"dropout_site": "x"}, {"layer": -1}):
        with pytest.raises(ConfigError):
            IDSPAMConfig(**bad)
    with pytest.raises(ConfigError, match=r"layer must be in 0\.\.2"):
        sp.wrap(tiny("bert", "cls"), IDSPAMConfig(layer=3))
    assert IDSPAM(IDSPAMConfig(), info(64, layers=12)).layer == 6  # default: the middle layer


def test_sequence_limit_counts_prompt():
    model = wrapped("llama")  # max_position_embeddings = 128
    ids = torch.randint(3, 100, (1, 125))
    with pytest.raises(SequenceTooLongError):
        model(input_ids=ids)


def test_padding_invariance_end_to_end_bert():
    """Right padding does not change BERT's logits with ID-SPAM (positions of real tokens are unchanged)."""
    model = wrapped("bert").eval()
    torch.manual_seed(5)
    ids = torch.randint(3, 100, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :5]).logits
    assert (batch[1] - alone[0]).abs().max().item() < 1e-5


# ---- encoders: manual reference -----------------------------------------------------------------------------------
def encoder_reference(base, kind, ids, mask, prompt, m, at):
    """embeddings -> layers < m -> insert after position ``at`` -> layers >= m -> drop inserted rows -> head."""
    core = base.bert if kind == "bert" else base.roberta
    t = prompt.shape[1]
    h = core.embeddings(input_ids=ids)

    def mask4d(keys):  # bool [B, 1, Q, K]: every query sees the real keys
        return keys.bool()[:, None, None, :].expand(-1, 1, keys.shape[1], -1)

    grown = torch.cat([mask[:, :at], torch.ones(mask.shape[0], t, dtype=mask.dtype), mask[:, at:]], 1)
    for i, layer in enumerate(core.encoder.layer):
        if i == m:
            h = torch.cat([h[:, :at], prompt, h[:, at:]], 1)
        h = layer_out(layer(h, attention_mask=mask4d(mask if i < m else grown)))
    h = torch.cat([h[:, :at], h[:, at + t :]], 1)
    if kind == "bert":
        return base.classifier(core.pooler(h))
    return base.classifier(h)  # RobertaClassificationHead reads position 0


@pytest.mark.parametrize("kind", ENCODERS)
@pytest.mark.parametrize("position", ["after_cls", "front"])
def test_encoder_insertion_equals_manual_reference(kind, position, padded):
    ids, mask = padded
    logits = []
    for m in (0, 1, 2):
        model = wrapped(kind, layer=m, position=position).eval()
        prompt = prompt_of(model, ids, mask)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
            ref = encoder_reference(model.base_model, kind, ids, mask, prompt, m, 1 if position == "after_cls"
                                    else 0)
            plain = model.base_model(input_ids=ids, attention_mask=mask).logits  # no state: the frozen model
        assert (out - ref).abs().max().item() < 1e-5
        assert (out - plain).abs().max().item() > 1e-3  # the prompt matters
        logits.append(out)
    assert (logits[0] - logits[2]).abs().max().item() > 1e-4  # and so does the layer


def test_encoder_full_embedding_source(padded):
    """embed_source="full": the generator reads the embedding layer's output (positions + LayerNorm)."""
    ids, mask = padded
    model = wrapped("bert", embed_source="full").eval()
    core = model.base_model.bert
    with torch.no_grad():
        e = core.embeddings(input_ids=ids)
        prompt = model.method.generate_prompt(e, mask)
        out = model(input_ids=ids, attention_mask=mask).logits
        ref = encoder_reference(model.base_model, "bert", ids, mask, prompt, 1, 1)
        word = model.method.generate_prompt(core.embeddings.word_embeddings(ids), mask)
    assert (out - ref).abs().max().item() < 1e-5
    assert (prompt - word).abs().max().item() > 1e-3
    got = id_spam_explain.generator_inputs(model, ids, mask)
    assert torch.equal(got, e)


# ---- decoders: manual reference -----------------------------------------------------------------------------------
def decoder_reference(base, kind, ids, mask, prompt, m, head="lm"):
    """[S; hidden] through layers m..L-1 with one causal mask; RoPE positions 0..t-1 (prompt), 0..N-1 (tokens)."""
    batch, n = ids.shape
    t = prompt.shape[1]
    if kind == "llama":
        core = base.model
        h, layers, norm = core.embed_tokens(ids), core.layers, core.norm
    else:
        core = base.transformer
        h, layers, norm = core.wte(ids) + core.wpe(torch.arange(n))[None], core.h, core.ln_f

    def causal(keys):  # bool [B, 1, L, L]; the diagonal stays visible so fully padded rows do not produce NaN
        length = keys.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & keys.bool()[:, None, :]
        return (allowed | torch.eye(length, dtype=torch.bool)[None])[:, None]

    grown = torch.cat([torch.ones(batch, t, dtype=mask.dtype), mask], 1)
    for i, layer in enumerate(layers):
        if i == m:
            h = torch.cat([prompt, h], 1)
        pos = torch.arange(n) if i < m else torch.cat([torch.arange(t), torch.arange(n)])
        kw = {}
        if kind == "llama":
            pos = pos[None].expand(batch, -1)
            kw = {"position_ids": pos, "position_embeddings": core.rotary_emb(h, pos)}
        h = layer_out(layer(h, attention_mask=causal(mask if i < m else grown), **kw))
    h = norm(h)[:, t:]
    return base.lm_head(h) if head == "lm" else base.score(h)


@pytest.mark.parametrize("kind", DECODERS)
def test_decoder_insertion_equals_manual_reference(kind, padded):
    ids, mask = padded
    real = mask.bool()
    for m in (0, 1, 2):
        model = wrapped(kind, layer=m).eval()
        prompt = prompt_of(model, ids, mask)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
            ref = decoder_reference(model.base_model, kind, ids, mask, prompt, m)
            plain = model.base_model(input_ids=ids, attention_mask=mask).logits
        assert out.shape == (3, 9, 100)
        assert (out - ref)[real].abs().max().item() < 1e-5
        assert (out - plain)[real].abs().max().item() > 1e-3


def test_decoder_sequence_classification_reads_last_real_token():
    """LlamaForSequenceClassification pools the last non-pad token: unshifted, since decoders get prefixes."""
    torch.manual_seed(6)
    ids = torch.randint(3, 100, (2, 7))
    ids[1, 5:] = 0  # right padding with pad_token_id 0
    mask = (ids != 0).long()
    model = wrapped("llama", task="cls").eval()
    prompt = prompt_of(model, ids, mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        ref = decoder_reference(model.base_model, "llama", ids, mask, prompt, 1, head="score")
    last = torch.tensor([6, 4])
    assert (out - ref[torch.arange(2), last]).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", DECODERS)
def test_generate_same_tokens_with_and_without_cache(kind, padded):
    ids, mask = padded
    mask[2] = 1  # generate() wants left padding only
    model = wrapped(kind, layer=1).eval()
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with_cache = model.generate(ids, attention_mask=mask, use_cache=True, **kw)
    without = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    assert with_cache.shape == (3, 15)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, :9], ids)
    with torch.no_grad():  # the first new token is the forward's argmax (unpadded rows: same positions)
        first = model(input_ids=ids[1:], attention_mask=mask[1:]).logits[:, -1].argmax(-1)
    assert torch.equal(with_cache[1:, 9], first)
    plain = model.base_model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert not torch.equal(plain, with_cache)  # the prompt changes what is generated


# ---- training machinery -------------------------------------------------------------------------------------------
def loss_and_grads(model, ids, mask, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.trainable_parameters().items()}
    return loss.detach(), grads


@pytest.mark.parametrize("kind,source", [("bert", "word"), ("roberta", "word"), ("bert", "full"),
                                         ("llama", "word"), ("gpt2", "word"), ("gpt2", "full")])
def test_gradients_reach_generator_only_and_survive_checkpointing(kind, source, padded):
    ids, mask = padded
    labels = torch.tensor([0, 1, 2]) if kind in ENCODERS else ids.masked_fill(mask == 0, -100)
    runs = []
    for checkpointing in (False, True):
        model = wrapped(kind, embed_source=source)
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert all(block.gradient_checkpointing for block in model.injector.blocks)
        loss, grads = loss_and_grads(model, ids, mask, labels)
        for name, p in model.base_model.named_parameters():
            is_head = any(name.startswith(h + ".") for h in model.head_names)
            assert (p.grad is not None) == is_head, name
        for name, p in model.method.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        runs.append((loss, grads))
    (loss0, g0), (loss1, g1) = runs
    assert abs(loss0 - loss1) < 1e-6
    assert g0.keys() == g1.keys()
    for name in g0:
        assert (g0[name] - g1[name]).abs().max().item() < 1e-6, name


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_save_load_round_trip(kind, padded, tmp_path):
    ids, mask = padded
    model = wrapped(kind, up_activation="none", bottleneck=9).eval()
    model.save_pretrained(tmp_path / "adapter")
    loaded = sp.load(base_model(kind), tmp_path / "adapter")
    assert isinstance(loaded.method, IDSPAM) and loaded.method_config == model.method_config
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_bf16_autocast_forward_backward(kind, padded):
    ids, mask = padded
    model = wrapped(kind)
    labels = torch.tensor([0, 1, 2]) if kind in ENCODERS else ids
    with torch.no_grad():
        ref = model.eval()(input_ids=ids, attention_mask=mask).logits
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.method.parameters())
    real = mask.bool() if kind in DECODERS else slice(None)
    assert (out.logits.float() - ref)[real].abs().max().item() < 0.25  # bf16 rounding only


# ---- explanations -------------------------------------------------------------------------------------------------
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "great", "bad", "a", "<", ">", "b",
         "&", "##s", "film", "$", "x", "plot"]


@pytest.fixture
def tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def test_explain_weights(tokenizer):
    model = wrapped("bert").eval()
    pairs = id_spam_explain.explain(model, tokenizer, "the movies was great")
    tokens = [t for t, _ in pairs]
    assert tokens == ["[CLS]", "the", "movie", "##s", "was", "great", "[SEP]"]
    weights = torch.tensor([w for _, w in pairs])
    assert abs(weights.sum().item() - 1) < 1e-6 and (weights > 0).all()
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(tokens)])
    direct = model.method.token_weights(model.base_model.get_input_embeddings()(ids), torch.ones_like(ids))
    assert torch.allclose(weights, direct[0], atol=1e-7)
    # A batch: padding gets weight 0, and the padded row explains exactly like the text alone.
    rows = id_spam_explain.explain_batch(model, tokenizer, ["a film", "the movie was great"], keep_padding=True)
    short = rows[0]
    assert [t for t, _ in short][-2:] == ["[PAD]", "[PAD]"] and all(w == 0 for _, w in short[-2:])
    assert abs(sum(w for _, w in short) - 1) < 1e-6
    alone = id_spam_explain.explain(model, tokenizer, "a film")
    assert len(alone) == 4 and max(abs(a[1] - b[1]) for a, b in zip(alone, short)) < 1e-6
    pair = id_spam_explain.explain(model, tokenizer, "the plot", "a film")
    assert [t for t, _ in pair].count("[SEP]") == 2


def test_explain_rejects_other_methods(tokenizer):
    model = sp.wrap(tiny("bert", "cls"), sp.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(sp.ConfigError, match=r"ID-SPAM adapter .* method is 'prompt'"):
        id_spam_explain.explain(model, tokenizer, "the movie")


def test_html_and_png_writers(tokenizer, tmp_path):
    model = wrapped("bert").eval()
    pairs = id_spam_explain.explain(model, tokenizer, "the <b> movie & $x$ was great")
    page = id_spam_explain.write(pairs, tmp_path / "out" / "tokens.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "&lt;" in page and "&amp;" in page and "<script" not in page
    assert page.count('class="tok"') == len(pairs)
    png = id_spam_explain.write(pairs, tmp_path / "tokens.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    with pytest.raises(ValueError, match=r"html or \.png"):
        id_spam_explain.write(pairs, tmp_path / "tokens.txt")
