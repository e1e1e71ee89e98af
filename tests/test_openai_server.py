"""The OpenAI-compatible API, called with the official ``openai`` package: each completion equals the offline
generation of its adapter, streamed or not, chat or plain, with two adapters' requests in flight at once (servers
started with their own settings: test_openai_server_settings.py)."""

import asyncio
import json

import httpx
import pytest
import torch
from _helpers.openai_server import ADAPTERS, PROMPT, lm, sse, tokenizer
from test_serve_helpers import ServerThread

import softprompt as sp
from softprompt.multi import MultiAdapterModel
from softprompt.serve import ServeConfig, create_app

openai = pytest.importorskip("openai")


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


def offline_tokens(folders, name, ids, max_tokens):
    """The token ids the adapter's own greedy generate() produces, through the first EOS (which counts as a
    completion token, as on the server)."""
    model = sp.load(lm(), folders[1][name]) if name in ADAPTERS else lm()
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=0)[0, len(ids):].tolist()
    return out[: out.index(2) + 1] if 2 in out else out


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
