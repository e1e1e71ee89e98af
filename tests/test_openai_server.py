"""The OpenAI-compatible API, called with the official ``openai`` package: each completion equals the offline
generation of its adapter, streamed or not, chat or plain, with two adapters' requests in flight at once."""

import asyncio
import json

import httpx
import pytest
import torch
from conftest import tiny
from test_serve_helpers import ServeProcess, ServerThread

import softprompt as sp
from softprompt.multi import MultiAdapterModel
from softprompt.serve import ServeConfig, create_app

openai = pytest.importorskip("openai")

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


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    base = root / "base"
    lm().save_pretrained(base)
    tokenizer().save_pretrained(base)
    paths = {}
    for name, config in ADAPTERS.items():
        sp.wrap(lm(), config).save_pretrained(root / name)
        paths[name] = str(root / name)
    return str(base), paths


@pytest.fixture(scope="module")
def url(folders):
    base, paths = folders
    model = MultiAdapterModel(lm(), paths, tokenizer=tokenizer())
    with ServerThread(create_app(model, ServeConfig(max_batch_size=4))) as address:
        yield address


def offline(folders, name, ids, max_tokens):
    """The adapter's own generate(), greedy, decoded the way the server decodes (EOS not part of the text)."""
    model = sp.load(lm(), folders[1][name]) if name in ADAPTERS else lm()
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=0)[0, len(ids):].tolist()
    if 2 in out:
        out = out[: out.index(2)]
    return tokenizer().decode(out, skip_special_tokens=True)


PROMPT = "w5 w17 w33 w8 w60"


def test_completions_and_chat_equal_offline_generation(folders, url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    ids = tokenizer()(PROMPT)["input_ids"]
    for name in ("a", "b"):
        want = offline(folders, name, ids, 6)
        r = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0)
        assert r.choices[0].text == want
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= 6
        streamed = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == want
    assert offline(folders, "a", ids, 6) != offline(folders, None, ids, 6)  # the adapters matter
    messages = [{"role": "user", "content": "w40 w41 w42"}]
    chat_ids = tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    want = offline(folders, "b", chat_ids, 5)
    r = client.chat.completions.create(model="b", messages=messages, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = client.chat.completions.create(model="b", messages=messages, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    parts, usage = [], None
    for c in chunks:
        usage = c.usage or usage
        parts += [c.choices[0].delta.content or ""] if c.choices else []
    assert "".join(parts) == want and usage.prompt_tokens == len(chat_ids)


def test_two_adapters_in_flight_at_once(folders, url):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
        jobs = [client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
                for name in ("a", "b", "a", "b")]
        return await asyncio.gather(*jobs)

    ids = tokenizer()(PROMPT)["input_ids"]
    results = asyncio.run(main())
    for name, r in zip(("a", "b", "a", "b"), results):
        assert r.choices[0].text == offline(folders, name, ids, 8)


def test_fixed_decoding_buffers_serve_the_same_text_and_refuse_what_does_not_fit(folders):
    """``ServeConfig(decoding="static")``: the decoding batch CUDA graphs replay, run eagerly here. Same text as the
    offline generation; a request whose prompt + adapter positions + max_tokens pass ``max_context`` gets a 400
    naming max_tokens, before anything runs."""
    model = MultiAdapterModel(lm(), folders[1], tokenizer=tokenizer())
    ids = tokenizer()(PROMPT)["input_ids"]
    with ServerThread(create_app(model, ServeConfig(max_batch_size=4, decoding="static", max_context=16))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        for name in ("a", "b"):
            r = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0)
            assert r.choices[0].text == offline(folders, name, ids, 6)
        # "b" prompts with 3 virtual tokens: 5 + 3 + 9 = 17 columns > 16
        r = httpx.post(f"{url}/v1/completions", json={"model": "b", "prompt": PROMPT, "max_tokens": 9}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        assert "max_context of 16" in r.json()["error"]["message"]


def test_models_lists_the_base_and_every_adapter(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    ids = [m.id for m in client.models.list().data]
    assert ids[1:] == ["a", "b"] and len(ids) == 3


@pytest.mark.parametrize("body, status, needle", [
    ({"model": "nope", "prompt": "w5"}, 404, "does not exist"),
    ({"model": "a", "prompt": "w5", "max_tokens": 500}, 400, "context"),
    ({"model": "a", "prompt": ""}, 400, "empty"),
    ({"model": "a", "prompt": "w5", "max_tokens": "many"}, 400, "must be int"),
    ({"model": "a", "prompt": "w5", "temperature": 9}, 400, "temperature"),
    ({"model": "a", "prompt": ["w5", "w6"]}, 400, "one request each"),
    ({"prompt": "w5"}, 400, "'model' is required"),
    ({"model": "a", "prompt": [5, 10_000]}, 400, "outside the vocabulary"),
])
def test_bad_requests_get_openai_errors(url, body, status, needle):
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and "\n" not in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_not_json_and_wrong_messages(url):
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "a", "messages": [{"role": "robot"}]}, timeout=60)
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]


def test_cli_serves_softprompt_and_peft_folders(folders, tmp_path):
    """``softprompt serve --adapter name=PATH`` takes a PEFT prompt-learning folder as well."""
    from peft import PromptTuningConfig, get_peft_model

    base, paths = folders
    torch.manual_seed(0)
    pm = get_peft_model(lm(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    pm.save_pretrained(tmp_path / "peft")
    args = ["--model", base, "--dtype", "float32", "--adapter", f"a={paths['a']}", "--adapter",
            f"p={tmp_path / 'peft'}", "--decoding", "static", "--max-context", "64"]
    with ServeProcess(args, tmp_path) as address:
        models = httpx.get(f"{address}/v1/models", timeout=60).json()["data"]
        assert [m["id"] for m in models][1:] == ["a", "p"]
        r = httpx.post(f"{address}/v1/completions", json={"model": "p", "prompt": PROMPT, "max_tokens": 3,
                                                           "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        assert json.loads(r.text)["choices"][0]["finish_reason"] in ("stop", "length")


def test_fixed_decoding_buffers_that_cannot_fit_are_one_line(folders):
    """Fixed decoding buffers larger than the free memory are refused at startup in one line that gives the size
    and the fix, before any buffer exists (``--max-context`` beyond the model's positions is cut to them: no request
    can use more)."""
    from test_serve_helpers import run_serve

    limit = lm().config.max_position_embeddings
    result = run_serve(["--model", folders[0], "--task-kind", "causal_lm", "--dtype", "float32", "--decoding",
                        "cuda_graphs", "--max-context", str(10**9), "--max-batch-size", str(10**12)])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-500:]
    assert len(lines) == 1 and f"fixed decoding buffers of {10**12} rows x {limit} columns need" in lines[0], lines
    assert "lower max_context" in lines[0]
