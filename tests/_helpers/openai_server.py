"""Builders of test_openai_server*.py: a word-level tokenizer with a chat template, the tiny LM, adapters, SSE."""

from conftest import tiny

import softprompt as sp

WORDS = [f"w{i}" for i in range(4, 96)] + ["system", "user", "assistant", ":"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")
ADAPTERS = {
    "a": sp.PrefixConfig(num_virtual_tokens=4, init="random", init_std=1.0, seed=1),
    "b": sp.PromptTuningConfig(num_virtual_tokens=3, init="random", init_range=1.0, seed=2),
}


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = TEMPLATE
    return tok


def lm():
    assert len(WORDS) + 4 == 100  # the tiny models' vocabulary
    return tiny("llama").double().eval()


PROMPT = "w5 w17 w33 w8 w60"


def sse(response) -> list[str]:
    """The ``data:`` payloads of a server-sent event stream, in order (every event is one data line)."""
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), response.text
    return [e.removeprefix("data: ") for e in events]
