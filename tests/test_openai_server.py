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
    _, paths = folders
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


@pytest.mark.parametrize("body, status, needle, param", [
    ({"model": "nope", "prompt": "w5"}, 404, "does not exist", "model"),
    ({"model": "a", "prompt": "w5", "max_tokens": 500}, 400, "context", "max_tokens"),
    ({"model": "a", "prompt": ""}, 400, "empty", "prompt"),
    ({"model": "a", "prompt": "w5", "max_tokens": "many"}, 400, "must be int", "max_tokens"),
    ({"model": "a", "prompt": "w5", "max_tokens": True}, 400, "'max_tokens' must be int, got bool", "max_tokens"),
    ({"model": "a", "prompt": "w5", "max_tokens": 0}, 400, "'max_tokens' must be >= 1, got 0", "max_tokens"),
    ({"model": "a", "prompt": "w5", "temperature": 9}, 400, "temperature", "temperature"),
    ({"model": "a", "prompt": "w5", "top_p": 0}, 400, "'top_p' must be in (0, 1]", "top_p"),
    ({"model": "a", "prompt": "w5", "top_p": 1.5}, 400, "'top_p' must be in (0, 1]", "top_p"),
    ({"model": "a", "prompt": "w5", "n": 2}, 400, "only n=1 is supported", "n"),
    ({"model": "a", "prompt": "w5", "logprobs": 1}, 400, "logprobs and best_of are not supported", "logprobs"),
    ({"model": "a", "prompt": "w5", "best_of": 2}, 400, "logprobs and best_of are not supported", "logprobs"),
    ({"model": "a", "prompt": "w5", "stop": ["w6", "w7", "w8", "w9", "w10"]}, 400, "at most 4 non-empty", "stop"),
    ({"model": "a", "prompt": "w5", "stop": [""]}, 400, "at most 4 non-empty strings", "stop"),
    ({"model": "a", "prompt": ["w5", "w6"]}, 400, "one request each", "prompt"),
    ({"prompt": "w5"}, 400, "'model' is required", "model"),
    ({"model": "a", "prompt": [5, 10_000]}, 400, "outside the vocabulary", None),
])
def test_bad_requests_get_openai_errors(url, body, status, needle, param):
    """Each client mistake is a 4xx in OpenAI's error format, one line, naming the offending field in ``param``."""
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and "\n" not in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error", error


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
    server = ServeProcess(args, tmp_path)
    with server as address:
        models = httpx.get(f"{address}/v1/models", timeout=60).json()["data"]
        assert [m["id"] for m in models][1:] == ["a", "p"]
        r = httpx.post(f"{address}/v1/completions", json={"model": "p", "prompt": PROMPT, "max_tokens": 3,
                                                           "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        assert json.loads(r.text)["choices"][0]["finish_reason"] in ("stop", "length")
        # The startup line says how text generation decodes (here as asked; `auto` names its reason).
        assert "softprompt serve: text generation decodes with decoding='static' (as asked)" in server.stderr()


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


def offline_tokens(folders, name, ids, max_tokens):
    """The token ids the adapter's own greedy generate() produces, through the first EOS (which counts as a
    completion token, as on the server)."""
    model = sp.load(lm(), folders[1][name]) if name in ADAPTERS else lm()
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=0)[0, len(ids):].tolist()
    return out[: out.index(2) + 1] if 2 in out else out


def sse(response) -> list[str]:
    """The ``data:`` payloads of a server-sent event stream, in order (every event is one data line)."""
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), response.text
    return [e.removeprefix("data: ") for e in events]


def test_usage_counts_every_token_exactly(folders, url):
    """usage: prompt_tokens is the prompt's length, completion_tokens the number of generated tokens (the same in the
    final chunk of a stream with include_usage), total_tokens their sum."""
    ids = tokenizer()(PROMPT)["input_ids"]
    for name, max_tokens in (("a", 6), ("b", 12)):
        generated = len(offline_tokens(folders, name, ids, max_tokens))
        want = {"prompt_tokens": len(ids), "completion_tokens": generated, "total_tokens": len(ids) + generated}
        body = {"model": name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"] == want
        r = httpx.post(f"{url}/v1/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}}, timeout=60)
        (usage,) = [json.loads(d)["usage"] for d in sse(r)[:-1] if "usage" in json.loads(d)]
        assert usage == want


def test_streams_end_with_one_done_after_the_finish_reason(url):
    """A stream is JSON chunks, the last choice chunk carrying the finish reason, then exactly one ``[DONE]``, last;
    a chat stream opens with the assistant role."""
    for path, body in (("completions", {"prompt": PROMPT}), ("chat/completions",
                                                            {"messages": [{"role": "user", "content": "w40"}]})):
        r = httpx.post(f"{url}/v1/{path}", json={"model": "a", "max_tokens": 4, "temperature": 0, "stream": True,
                                                  **body}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        data = sse(r)
        assert data[-1] == "[DONE]" and data.count("[DONE]") == 1, data
        chunks = [json.loads(d) for d in data[:-1]]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks]
        assert reasons[-1] == "length" and set(reasons[:-1]) == {None}, reasons
        if path == "chat/completions":
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_stop_strings_end_the_text_before_them_streamed_or_not(folders, url):
    """A stop string (here two tokens long, so its first token alone could be a false start) ends the completion with
    finish_reason "stop"; the text ends just before it, and a stream never releases a part of it."""
    ids = tokenizer()(PROMPT)["input_ids"]
    full = offline(folders, "a", ids, 8)
    stop = " ".join(full.split()[1:3])  # the 2nd and 3rd words
    want = full[: full.find(stop)]
    assert len(stop.split()) == 2 and want and want != full
    for stop_field in (stop, ["zzz", stop]):
        body = {"model": "a", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop": stop_field}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        choice = r.json()["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (want, "stop"), r.text
        chunks = [json.loads(d) for d in sse(httpx.post(f"{url}/v1/completions", json={**body, "stream": True},
                                                        timeout=60))[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == want
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                                   "stop": ["zzz"]}, timeout=60)
    assert r.json()["choices"][0]["text"] == full  # a stop string that never occurs cuts nothing


def test_a_full_generation_queue_is_503_retry_later_in_openai_format(folders):
    """With --max-queue-rows 1 and one request held inside its decoding step, the next gets 503, OpenAI's error JSON
    and Retry-After; once the first finishes, requests are accepted again (event-based: the model lock is held)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    model = MultiAdapterModel(lm(), folders[1], tokenizer=tokenizer())
    inside, release = threading.Event(), threading.Event()
    real = model._lock

    class HeldLock:
        """The model lock; the generation thread's first step waits inside it until released."""

        def __enter__(self):
            if threading.current_thread().name == "softprompt-generate" and not release.is_set():
                inside.set()
                release.wait(timeout=60)
            return real.__enter__()

        def __exit__(self, *exc):
            return real.__exit__(*exc)

    model._lock = HeldLock()
    body = {"model": "a", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    with ServerThread(create_app(model, ServeConfig(max_queue_rows=1))) as address, ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(httpx.post, f"{address}/v1/completions", json=body, timeout=60)
            assert inside.wait(timeout=60)
            r = httpx.post(f"{address}/v1/completions", json=body, timeout=60)
            assert r.status_code == 503 and r.headers.get("retry-after") == "1", r.text
            error = r.json()["error"]
            assert (error["code"], error["type"]) == ("overloaded", "server_error"), error
            assert "retry later" in error["message"]
            release.set()
            assert first.result().status_code == 200
            assert httpx.post(f"{address}/v1/completions", json=body, timeout=60).status_code == 200
        finally:
            release.set()  # before the pool waits for the first request


def test_a_failed_decoding_step_is_503_and_the_server_keeps_serving(folders):
    """A decoding step that fails (here: the first time the generation thread takes the model lock) ends the running
    request: 503 "retry" in OpenAI's format, or an error event then ``[DONE]`` in a stream; the next request works."""
    import threading

    model = MultiAdapterModel(lm(), folders[1], tokenizer=tokenizer())
    real, failures = model._lock, [2]

    class FailingLock:
        """The model lock; the generation thread's first two steps fail inside it."""

        def __enter__(self):
            if threading.current_thread().name == "softprompt-generate" and failures[0] > 0:
                failures[0] -= 1
                raise RuntimeError("simulated failure of a decoding step")
            return real.__enter__()

        def __exit__(self, *exc):
            return real.__exit__(*exc)

    model._lock = FailingLock()
    body = {"model": "a", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    with ServerThread(create_app(model, ServeConfig())) as address:
        r = httpx.post(f"{address}/v1/completions", json=body, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "aborted" and "retry" in r.json()["error"]["message"]
        data = sse(httpx.post(f"{address}/v1/completions", json={**body, "stream": True}, timeout=60))
        assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["type"] == "server_error", data
        r = httpx.post(f"{address}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text


def test_a_seed_out_of_range_is_a_400_not_a_503(url):
    """A sampling seed the random generator cannot take (outside -2**63 .. 2**64 - 1) is the client's mistake: 400
    naming ``seed``, not a 503 "interrupted, retry" that no retry can fix. Seeds in the range work."""
    body = {"model": "a", "prompt": PROMPT, "max_tokens": 2, "temperature": 0.7}
    for seed in (2**64, -(2**63) - 1, 10**30):
        r = httpx.post(f"{url}/v1/completions", json={**body, "seed": seed}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "seed" and "seed must be between" in r.json()["error"]["message"]
    for seed in (0, -1, 2**64 - 1):
        r = httpx.post(f"{url}/v1/completions", json={**body, "seed": seed}, timeout=60)
        assert r.status_code == 200, r.text


def test_a_body_over_the_limit_is_413_in_openai_format_under_v1_only(folders):
    """A body larger than --max-body-bytes is refused before it is parsed, declared (Content-Length) or streamed in
    chunks: under /v1 with OpenAI's error JSON, which its clients parse, and FastAPI's {"detail": ...} elsewhere;
    the official client raises its own error type with the message. A body exactly at the limit is read."""
    model = MultiAdapterModel(lm(), folders[1], tokenizer=tokenizer())
    small = {"model": "a", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    limit = len(json.dumps(small).encode())
    with ServerThread(create_app(model, ServeConfig(max_body_bytes=limit))) as address:
        big = json.dumps({**small, "prompt": PROMPT + " w5" * 50}).encode()

        def chunked():
            yield big[:40]
            yield big[40:]

        for content in (big, chunked()):
            r = httpx.post(f"{address}/v1/completions", content=content, timeout=60,
                           headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.headers["connection"] == "close"
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
            assert f"request body over {limit} bytes" in error["message"] and "--max-body-bytes" in error["message"]
        r = httpx.post(f"{address}/predict", content=big, timeout=60, headers={"content-type": "application/json"})
        assert r.status_code == 413 and set(r.json()) == {"detail"}
        r = httpx.post(f"{address}/v1/completions", content=json.dumps(small).encode(), timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
        client = openai.OpenAI(base_url=f"{address}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError, match="--max-body-bytes") as info:
            client.completions.create(model="a", prompt=PROMPT + " w5" * 50, max_tokens=1)
        assert info.value.status_code == 413
