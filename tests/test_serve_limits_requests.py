"""Server requests that can never fit, a full queue, slow or oversized bodies, and failures within a batch."""

from __future__ import annotations

import contextlib
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_serve_helpers import AUTH, assert_refused

pytest.importorskip("fastapi")

from _helpers.serve_limits import add, serve

# one_thread: tiny models, intra-op threads only contend; only_prefix_a (conftest.py): each test starts from, and
# leaves, a model holding prefix_a only
pytestmark = pytest.mark.usefixtures("one_thread", "only_prefix_a")


# ---- requests that can never fit, and slow bodies ------------------------------------------------------------
def test_predict_all_that_can_never_fit_the_queue_is_413_not_503(tree, model):
    with serve(model, adapter_roots=(str(tree["root"]),), max_queue_rows=5, max_inputs=8) as url:
        r = httpx.post(f"{url}/predict_all", json={"inputs": ["a film"] * 6}, timeout=30)
        assert_refused(r, 413, "makes 6 rows", "can never succeed", "send at most 5 inputs per request")
        assert httpx.post(f"{url}/predict_all", json={"inputs": ["a film"] * 5}, timeout=30).status_code == 200
        assert add(url, "prompt_cls").status_code == 201
        r = httpx.post(f"{url}/predict_all", json={"inputs": ["a film"] * 3}, timeout=30)
        assert_refused(r, 413, "2 adapters x 3 inputs makes 6 rows", "send at most 2 inputs per request")
        r = httpx.post(f"{url}/predict", json={"adapter": "added", "inputs": ["a film"] * 6}, timeout=30)
        assert_refused(r, 413, "6 rows", "split it")
        assert httpx.delete(f"{url}/adapters/added", headers=AUTH, timeout=30).status_code == 200
    with serve(model, adapter_roots=(str(tree["root"]),), max_queue_rows=1) as url:
        assert add(url, "prompt_cls").status_code == 201
        r = httpx.post(f"{url}/predict_all", json={"inputs": ["a film"]}, timeout=30)
        assert_refused(r, 413, "call POST /predict per adapter")
        assert httpx.delete(f"{url}/adapters/added", headers=AUTH, timeout=30).status_code == 200


@contextlib.contextmanager
def _held_first_batch(model):
    """The batcher calls ``model.predict`` in its own thread: the first batch stays inside it until ``release`` is set
    (``inside`` says it got there), so that later requests queue behind it. Released and restored on exit."""
    inside, release = threading.Event(), threading.Event()
    real = model.predict

    def held(*args):
        inside.set()
        release.wait(timeout=60)
        return real(*args)

    model.predict = held
    try:
        yield inside, release
    finally:
        release.set()
        del model.predict


def _wait_until_queued(url: str, rows: int) -> None:
    for _ in range(10_000):
        if httpx.get(f"{url}/health", timeout=30).json()["queued_rows"] == rows:
            return
    raise AssertionError(f"{rows} rows were never queued")


def test_a_full_queue_is_503_retry_later(model):
    """The 503 stays for what a retry can fix: the queue is full now (the model is held inside a batch)."""
    with (serve(model, max_queue_rows=4, max_batch_size=1) as url, _held_first_batch(model) as (inside, release),
          ThreadPoolExecutor(2) as pool):
        first = pool.submit(httpx.post, f"{url}/predict", json={"adapter": "prefix_a", "inputs": ["a"]},
                            timeout=60)
        assert inside.wait(timeout=60)
        second = pool.submit(httpx.post, f"{url}/predict", json={"adapter": "prefix_a",
                                                                 "inputs": ["a"] * 4}, timeout=60)
        _wait_until_queued(url, 4)  # the second request's 4 rows wait behind the held batch
        r = httpx.post(f"{url}/predict", json={"adapter": "prefix_a", "inputs": ["a"]}, timeout=30)
        assert_refused(r, 503, "retry later")
        assert r.headers["retry-after"] == "1"
        release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200


def _raw_request(url: str, head: bytes, body: bytes) -> bytes:
    """Send a request head and a partial body, then read whatever the server answers (until it closes)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head + body)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:  # a server that closes with part of the body unread resets: what came is kept
            pass
        return data


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes(model):
    with serve(model, body_timeout_s=0.5) as url:
        head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n")
        answer = _raw_request(url, head, b'{"adapter": ')  # 12 of 100 bytes, then silence
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"--body-timeout" in answer and b"\r\nconnection: close\r\n" in answer.lower()


def test_admin_requests_are_refused_before_their_body_is_read(model):
    """The gate answers at once: the test never sends the announced body, and the body timeout is long."""
    with serve(model, body_timeout_s=300) as url:
        head = b"POST /adapters HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        answer = _raw_request(url, head, b"")
        assert answer.startswith(b"HTTP/1.1 401"), answer
        assert b"admin token" in answer and b"\r\nconnection: close\r\n" in answer.lower()


def test_a_declared_body_over_the_limit_is_413_before_it_is_read(model):
    """A Content-Length over --max-body-bytes is answered 413 at once, the connection closed: the test never sends
    the body, and the body timeout is long."""
    with serve(model, max_body_bytes=1000, body_timeout_s=300) as url:
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1001\r\n\r\n"
        answer = _raw_request(url, head, b"")
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert b"over 1000 bytes" in answer and b"\r\nconnection: close\r\n" in answer.lower()


def test_rows_of_an_adapter_removed_while_queued_get_404(tree, model):
    """DELETE /adapters/NAME while a request for NAME waits in the queue: that request gets 404, the running batch
    finishes (event-based: the first batch is held inside the model while the second request is queued)."""
    with serve(model, adapter_roots=(str(tree["root"]),), max_batch_size=1) as url:
        assert add(url, "prompt_cls").status_code == 201
        with _held_first_batch(model) as (inside, release), ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}/predict", json={"adapter": "prefix_a", "inputs": ["a"]},
                                timeout=60)
            assert inside.wait(timeout=60)
            second = pool.submit(httpx.post, f"{url}/predict", json={"adapter": "added", "inputs": ["a"]},
                                 timeout=60)
            _wait_until_queued(url, 1)
            assert httpx.delete(f"{url}/adapters/added", headers=AUTH, timeout=30).status_code == 200
            release.set()
            assert first.result().status_code == 200
            assert_refused(second.result(), 404, "unknown adapter 'added'")


def test_a_failing_request_does_not_fail_the_others_in_its_batch():
    """Failure isolation in the batcher: two requests share one batch, the model fails on one of them; only that
    request gets the error, the other its predictions."""
    import asyncio

    from softprompt.serve import DynamicBatcher

    class Model:
        def __contains__(self, name):
            return True

        def predict(self, texts, adapters, pairs):
            if "boom" in texts:
                raise ValueError("the model failed on 'boom'")
            return [{"label": t} for t in texts]

    async def main():
        batcher = DynamicBatcher(Model(), max_batch_size=4, max_wait_ms=1000)
        await batcher.start()
        try:
            # Both requests are queued before the batching task runs again: their 4 rows fill one batch.
            good = asyncio.create_task(batcher.submit(["x", "x"], ["a", "b"]))
            bad = asyncio.create_task(batcher.submit(["y", "y"], ["c", "boom"]))
            return await asyncio.gather(good, bad, return_exceptions=True), batcher.stats.batches
        finally:
            await batcher.stop()

    (good, bad), batches = asyncio.run(main())
    assert good == [{"label": "a"}, {"label": "b"}]
    assert isinstance(bad, ValueError) and str(bad) == "the model failed on 'boom'"
    assert batches == 1


def test_the_body_timeout_covers_the_whole_body_not_each_chunk(model):
    """A client that trickles its body one byte every 0.1 s (each gap well under the 0.5 s limit) still gets 408 once
    0.5 s have passed since the request head. The trickle would take 10 s: the 408 cannot come from a slow machine
    (a gap over 0.5 s only makes a per-chunk limit answer 408 as well), and no duration is asserted."""
    import select

    with serve(model, body_timeout_s=0.5) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n")
            for _ in range(100):
                if select.select([s], [], [], 0.1)[0]:  # the server answered
                    break
                try:
                    s.sendall(b" ")
                except (BrokenPipeError, ConnectionResetError):  # it answered and closed since the select
                    break
            answer = b""
            try:
                while chunk := s.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                # A byte sent after the server closed makes its kernel answer with a reset; the answer read before
                # that is complete (Linux hands out queued data before the reset's error).
                pass
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"--body-timeout" in answer and b"\r\nconnection: close\r\n" in answer.lower()
