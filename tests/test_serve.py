"""The HTTP service, over real HTTP on localhost: concurrent clients, shared batches, runtime adapter management,
4xx for bad requests (never a 500), and a schemathesis run against the OpenAPI schema."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from test_multi_helpers import make_adapters, make_tiny_base_dir, texts

from softprompt.multi import MultiAdapterModel

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from softprompt.serve import ServeConfig, create_app  # noqa: E402

SERVED = ["prefix_a", "prefix_b", "apt", "prompt_front", "lpt", "score"]
JSON = {"content-type": "application/json"}
LIMITS = dict(max_inputs=8, max_text_chars=200, max_body_bytes=20_000)


class ServerThread:
    """uvicorn in a background thread on a free port (port 0: the OS picks; no race with other tests)."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only contend (see test_multi.py)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = make_tiny_base_dir(root / "base")
    return base, make_adapters(base, root / "adapters", names=SERVED + ["prompt_cls"])


@pytest.fixture(scope="module")
def model(dirs):
    base, adapters = dirs
    return MultiAdapterModel(base, {n: adapters[n] for n in SERVED})


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, ServeConfig(max_batch_size=64, max_wait_ms=2, **LIMITS))
    with ServerThread(app) as url:
        yield url, app


def test_concurrent_clients_get_their_own_answers_in_shared_batches(server, model):
    url, app = server
    batcher = app.state.batcher
    batcher.max_wait = 0.25  # long enough that simultaneous clients surely meet in one batch, even on a busy box
    jobs = [(SERVED[i % len(SERVED)], texts(1 + i % 3, seed=i)) for i in range(12)]
    barrier = threading.Barrier(len(jobs))
    before_batches, before_passes = batcher.stats.batches, model.stats.backbone_passes

    def client(job):
        adapter, inputs = job
        with httpx.Client(base_url=url, timeout=30) as c:
            barrier.wait()
            return c.post("/predict", json={"adapter": adapter, "inputs": inputs})

    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(client, jobs))
    finally:
        batcher.max_wait = 0.002
    batches = batcher.stats.batches - before_batches
    passes = model.stats.backbone_passes - before_passes
    for (adapter, inputs), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"] == adapter and len(body["predictions"]) == len(inputs)
        direct = model.predict(inputs, adapter)  # the same rows alone, without the server
        for got, ref in zip(body["predictions"], direct):
            assert got["score"] == pytest.approx(ref["score"], abs=1e-5)
            assert got.get("label") == ref.get("label")
    assert batches < len(jobs)  # requests were grouped...
    assert batcher.stats.mixed_batches >= 1  # ...across adapters
    # 6 adapters fall into 3 compatible groups (4-token prefixes incl. APT and the regression head | prompt | LPT).
    assert passes <= 3 * batches
    stats = httpx.get(f"{url}/stats").json()
    assert stats["batcher"]["mixed_batches"] >= 1 and stats["model"]["backbone_passes"] >= passes


def test_predict_all_answers_with_every_adapter(server, model):
    url, _ = server
    inputs = texts(3, seed=40) + [{"text": "the film", "text_pair": "the movie"}]
    r = httpx.post(f"{url}/predict_all", json={"inputs": inputs}, timeout=30)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert set(preds) == set(model.adapter_names)
    plain = [x if isinstance(x, str) else x["text"] for x in inputs]
    pairs = [None if isinstance(x, str) else x["text_pair"] for x in inputs]
    for name, rows in preds.items():
        direct = model.predict(plain, name, pairs)
        assert [p["score"] for p in rows] == pytest.approx([d["score"] for d in direct], abs=1e-5)


def test_adapters_are_added_and_removed_at_run_time(server, dirs, model):
    url, app = server
    _, adapters = dirs
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/predict", json={"adapter": "late", "inputs": ["a film"]}).status_code == 404
        r = c.post("/adapters", json={"name": "late", "path": adapters["prompt_cls"]})
        assert r.status_code == 201, r.text
        assert r.json()["method"] == "prompt" and r.json()["label_names"] == ["a", "b", "c"]
        assert "late" in [a["name"] for a in c.get("/adapters").json()["adapters"]]
        r = c.post("/predict", json={"adapter": "late", "inputs": ["the plot was good"]})
        assert r.status_code == 200
        assert r.json()["predictions"][0]["score"] == pytest.approx(
            model.predict(["the plot was good"], "late")[0]["score"], abs=1e-5)
        assert "late" in c.post("/predict_all", json={"inputs": ["a film"]}).json()["predictions"]
        r = c.post("/adapters", json={"name": "late", "path": adapters["prompt_cls"]})
        assert r.status_code == 409 and "already loaded" in r.json()["detail"]
        assert c.delete("/adapters/late").json() == {"removed": "late"}
        assert c.post("/predict", json={"adapter": "late", "inputs": ["a film"]}).status_code == 404
        assert c.delete("/adapters/late").status_code == 404
        r = c.post("/adapters", json={"name": "broken", "path": "/nonexistent/folder"})
        assert r.status_code == 400 and "adapter_config.json is missing" in r.json()["detail"]
        # Restrictions: a root folder for loadable adapters, and admin endpoints switched off.
        cfg = app.state.config
        cfg.adapter_root = "/nonexistent"
        r = c.post("/adapters", json={"name": "late", "path": adapters["prompt_cls"]})
        assert r.status_code == 403 and "adapter root" in r.json()["detail"]
        cfg.adapter_root, cfg.allow_admin = None, False
        try:
            assert c.post("/adapters", json={"name": "late", "path": adapters["prompt_cls"]}).status_code == 403
            assert c.delete("/adapters/prefix_a").status_code == 403
        finally:
            cfg.allow_admin = True
    assert model.adapter_names == SERVED


@pytest.mark.parametrize("case,status,needle", [
    ({"json": {"adapter": "nope", "inputs": ["a"]}}, 404, "unknown adapter 'nope'"),
    ({"json": {"adapter": "prefix_a", "inputs": []}}, 422, "at least 1"),
    ({"json": {"adapter": "prefix_a", "inputs": ["a"] * 9}}, 422, "at most 8"),
    ({"json": {"adapter": "prefix_a", "inputs": ["a" * 201]}}, 422, "at most 200 characters"),
    ({"json": {"adapter": "prefix_a", "inputs": "a film"}}, 422, "list"),
    ({"json": {"adapter": "prefix_a", "inputs": [3]}}, 422, "string"),
    ({"json": {"inputs": ["a"]}}, 422, "adapter"),
    ({"json": {"adapter": "prefix_a", "inputs": ["a"], "extra": 1}}, 422, "extra"),
    ({"json": {"adapter": "prefix_a", "inputs": [{"text": "a", "pair": "b"}]}}, 422, "extra"),
    ({"content": b'{"adapter": "prefix_a", "inputs": ["\\ud800"]}', "headers": JSON}, 422, "unicode"),
    ({"content": b'{"adapter": "prefix_a", "inputs": [', "headers": JSON}, 422, "JSON"),
    ({"content": b"a" * 20_001}, 413, "over 20000 bytes"),
    ({"content": b"not json", "headers": {"content-type": "text/plain"}}, 422, ""),
])
def test_bad_requests_get_4xx_with_a_message(server, case, status, needle):
    url, _ = server
    r = httpx.post(f"{url}/predict", timeout=30, **case)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert detail
    assert needle.lower() in json.dumps(detail).lower()


def test_other_bad_calls(server):
    url, _ = server
    assert httpx.get(f"{url}/predict").status_code == 405
    assert httpx.get(f"{url}/nothing").status_code == 404
    r = httpx.post(f"{url}/adapters", json={"name": "../x", "path": "/tmp"})
    assert r.status_code == 422 and "pattern" in r.text
    r = httpx.post(f"{url}/adapters", json={"name": "x", "path": "/tmp/\u0000"})
    assert r.status_code == 400 and "NUL" in r.json()["detail"]


def test_health_answers_while_the_model_computes(server):
    """The model runs in its own thread: /health must not wait for a slow batch."""
    url, app = server
    batcher = app.state.batcher
    real = batcher.model

    class Slow:
        def __contains__(self, name):
            return name in real

        def predict(self, *args):
            time.sleep(1.0)
            return real.predict(*args)

    batcher.model = Slow()
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/predict", json={"adapter": "apt", "inputs": ["good"]},
                                  timeout=30)
            time.sleep(0.2)
            start = time.perf_counter()
            r = httpx.get(f"{url}/health", timeout=30)
            elapsed = time.perf_counter() - start
            assert r.status_code == 200 and r.json()["status"] == "ok"
            assert elapsed < 0.5, elapsed
            assert pending.result().status_code == 200
    finally:
        batcher.model = real


def test_openapi_schema_lists_the_limits(server):
    url, _ = server
    schema = httpx.get(f"{url}/openapi.json").json()
    assert {"/predict", "/predict_all", "/adapters", "/adapters/{name}", "/health"} <= set(schema["paths"])
    text = json.dumps(schema)
    assert '"maxItems": 8' in text and '"maxLength": 200' in text


# ---- schemathesis: generated requests (valid and invalid) against the schema; no response may be a 5xx ----------
# Driven through schemathesis' Python API (its pytest plugin does not work with pytest 9 yet): one Hypothesis run per
# operation and generation mode, 25 examples each.
def test_schemathesis_finds_no_server_error(dirs):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error

    base, adapters = dirs
    # A server of its own: generated DELETE/POST calls must not disturb the other tests' adapters.
    fuzz_model = MultiAdapterModel(base, {"prefix_a": adapters["prefix_a"], "prompt_front": adapters["prompt_front"]})
    app = create_app(fuzz_model, ServeConfig(max_batch_size=16, max_wait_ms=0, adapter_root=str(base), **LIMITS))
    calls, statuses, unsatisfiable = [0], set(), []
    with ServerThread(app) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 7  # predict, predict_all, adapters (GET, POST, DELETE), health, stats
        for op in operations:
            for mode in schemathesis.GenerationMode:
                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
                def run(case):
                    response = case.call(base_url=url, timeout=30)
                    calls[0] += 1
                    statuses.add(response.status_code)
                    case.validate_response(response, checks=[not_a_server_error])

                try:
                    run()
                except Unsatisfiable:  # negative mode with nothing to break (no body, a free-form path string)
                    assert mode == schemathesis.GenerationMode.NEGATIVE
                    unsatisfiable.append(op.label)
    assert calls[0] > 150
    assert not {"POST /predict", "POST /predict_all", "POST /adapters"} & set(unsatisfiable)
    assert max(statuses) < 500 and {200, 404, 422} <= statuses


def test_cli_serves_named_adapters(dirs, tmp_path):
    """``softprompt serve`` end to end in a subprocess: flags parsed, adapters loaded, HTTP answered."""
    import os
    import socket
    import subprocess
    import sys

    from softprompt.serve.cli import parse_adapter_specs

    assert parse_adapter_specs(["a=/x", "b = /y"]) == {"a": "/x", "b": "/y"}
    for bad in (["a"], ["=/x"], ["a=/x", "a=/y"]):
        with pytest.raises(SystemExit, match="NAME=DIR|twice"):
            parse_adapter_specs(bad)
    base, adapters = dirs
    with socket.socket() as s:  # a free port for the child (it cannot report port 0's choice back)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "softprompt", "serve", "--model", base, "--adapter", f"pos={adapters['prefix_a']}",
           "--adapter", f"prompt={adapters['prompt_front']}", "--port", str(port), "--max-batch-size", "8",
           "--max-wait-ms", "1", "--max-inputs", "4", "--no-admin", "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).json()["adapters"] == 2:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log = proc.stdout.read() if proc.poll() is not None else ""
                raise AssertionError(f"server did not come up:\n{log}")
            time.sleep(0.2)
        r = httpx.post(f"{url}/predict", json={"adapter": "pos", "inputs": ["the film was good"]}, timeout=30)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("neg", "pos")
        assert httpx.post(f"{url}/predict", json={"adapter": "pos", "inputs": ["a"] * 5}).status_code == 422
        assert httpx.delete(f"{url}/adapters/pos").status_code == 403  # --no-admin
    finally:
        proc.terminate()
        proc.wait(timeout=20)
