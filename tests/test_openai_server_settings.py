"""OpenAI API servers started with their own settings: the CLI, fixed buffers, full queue, failed step, body limit."""

import json

import httpx
import pytest
import torch
from _helpers.openai_server import PROMPT, lm, sse, tokenizer
from test_serve_helpers import ServeProcess, ServerThread

from softprompt.multi import MultiAdapterModel
from softprompt.serve import ServeConfig, create_app

openai = pytest.importorskip("openai")


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
    assert result.returncode == 2, result.stderr[-500:]
    assert len(lines) == 1 and f"fixed decoding buffers of {10**12} rows x {limit} columns need" in lines[0], lines
    assert "lower max_context" in lines[0]


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
