"""The HTTP service, over real HTTP on localhost: concurrent clients, shared batches, runtime adapter management,
4xx for bad requests (never a 500), and a schemathesis run against the OpenAPI schema. The admin lock-down, paths
and size limits are tested in test_serve_admin.py."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_multi_helpers import make_adapters, make_tiny_base_dir, texts
from test_serve_helpers import AUTH, TOKEN, ServeProcess, ServerThread

from softprompt.multi import MultiAdapterModel

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from softprompt.serve import ServeConfig, create_app  # noqa: E402

SERVED = ["prefix_a", "prefix_b", "apt", "prompt_front", "lpt", "score"]
JSON = {"content-type": "application/json"}
LIMITS = {"max_inputs": 8, "max_text_chars": 200, "max_body_bytes": 20_000}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only contend


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
    app = create_app(model, ServeConfig(max_batch_size=64, max_wait_ms=2, admin_token=TOKEN, **LIMITS))
    with ServerThread(app) as url:
        yield url, app


def test_concurrent_clients_get_their_own_answers_in_shared_batches(server, model):
    url, app = server
    batcher = app.state.batcher
    jobs = [(SERVED[i % len(SERVED)], texts(1 + i % 3, seed=i)) for i in range(12)]
    total_rows = sum(len(inputs) for _, inputs in jobs)
    before_batches, before_passes = batcher.stats.batches, model.stats.backbone_passes
    # Event-based, no timing: the first batch is held inside the model until every other row is queued behind it,
    # so the rest must form shared batches (at most 64 rows each).
    real, inside, release, first_rows = batcher.model, threading.Event(), threading.Event(), []

    class HoldFirst:
        def __contains__(self, name):
            return name in real

        def predict(self, texts_, *args):
            if not inside.is_set():
                first_rows.append(len(texts_))
                inside.set()
                release.wait(timeout=60)
            return real.predict(texts_, *args)

    def client(job):
        adapter, inputs = job
        with httpx.Client(base_url=url, timeout=60) as c:
            return c.post("/predict", json={"adapter": adapter, "inputs": inputs})

    batcher.model = HoldFirst()
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            pending = [pool.submit(client, job) for job in jobs]
            assert inside.wait(timeout=60)
            for _ in range(10_000):
                if httpx.get(f"{url}/health", timeout=30).json()["queued_rows"] == total_rows - first_rows[0]:
                    break
            else:
                raise AssertionError("the other requests were never queued")
            release.set()
            responses = [f.result() for f in pending]
    finally:
        release.set()
        batcher.model = real
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
    assert batches <= 2 < len(jobs)  # requests were grouped: the held batch, then everything queued behind it...
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
    # The served adapters' parent folder is the default adapter root; a relative path is taken from it.
    assert app.state.adapter_roots == (str(Path(adapters["prefix_a"]).resolve().parent),)
    with httpx.Client(base_url=url, timeout=30, headers=AUTH) as c:
        assert c.post("/predict", json={"adapter": "late", "inputs": ["a film"]}).status_code == 404
        r = c.post("/adapters", json={"name": "late", "path": "prompt_cls"})
        assert r.status_code == 201, r.text
        assert r.json()["method"] == "prompt" and r.json()["label_names"] == ["a", "b", "c"]
        assert "late" in [a["name"] for a in c.get("/adapters").json()["adapters"]]
        r = c.post("/predict", json={"adapter": "late", "inputs": ["the plot was good"]})
        assert r.status_code == 200
        assert r.json()["predictions"][0]["score"] == pytest.approx(
            model.predict(["the plot was good"], "late")[0]["score"], abs=1e-5)
        assert "late" in c.post("/predict_all", json={"inputs": ["a film"]}).json()["predictions"]
        r = c.post("/adapters", json={"name": "late", "path": adapters["prompt_cls"]})  # absolute, inside the root
        assert r.status_code == 409 and "already loaded" in r.json()["detail"]
        assert c.delete("/adapters/late").json() == {"removed": "late"}
        assert c.post("/predict", json={"adapter": "late", "inputs": ["a film"]}).status_code == 404
        assert c.delete("/adapters/late").status_code == 404
        r = c.post("/adapters", json={"name": "broken", "path": "no-such-folder"})
        assert r.status_code == 400 and "does not exist under the adapter root" in r.json()["detail"]
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


def test_the_body_limit_holds_for_chunked_bodies_and_admits_exactly_the_limit(server):
    """--max-body-bytes (20,000 here) counts the bytes read, so a chunked body without Content-Length is refused as
    well; a body of exactly 20,000 bytes is read and answered, one byte more is 413."""
    url, _ = server
    r = httpx.post(f"{url}/predict", content=(b"a" * 10_000 for _ in range(3)), headers=JSON, timeout=30)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413 and "over 20000 bytes" in r.json()["detail"], r.text
    body = json.dumps({"adapter": "prefix_a", "inputs": ["a film"]}).encode()
    body += b" " * (20_000 - len(body))
    r = httpx.post(f"{url}/predict", content=body, headers=JSON, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/predict", content=body + b" ", headers=JSON, timeout=30)
    assert r.status_code == 413 and "over 20000 bytes" in r.json()["detail"], r.text


def test_non_finite_model_outputs_are_answered_as_valid_json(server):
    """JSON has no NaN or infinity: a prediction whose score is NaN is answered 200 with score null, and an infinite
    entry of ``scores`` as 0.0 (the schema's scores are numbers), never a 500 from the JSON encoder."""
    url, app = server
    batcher = app.state.batcher
    real = batcher.model

    class NonFinite:
        def __contains__(self, name):
            return name in real

        def predict(self, *args):
            rows = real.predict(*args)
            return [{**r, "score": float("nan"), "scores": {k: float("inf") for k in r["scores"]}} for r in rows]

    batcher.model = NonFinite()
    try:
        r = httpx.post(f"{url}/predict", json={"adapter": "prefix_a", "inputs": ["a film"]}, timeout=30)
    finally:
        batcher.model = real
    assert r.status_code == 200, r.text
    (prediction,) = r.json()["predictions"]
    assert prediction["score"] is None and set(prediction["scores"].values()) == {0.0}, prediction


def test_other_bad_calls(server):
    url, _ = server
    assert httpx.get(f"{url}/predict").status_code == 405
    assert httpx.get(f"{url}/nothing").status_code == 404
    r = httpx.post(f"{url}/adapters", json={"name": "../x", "path": "/tmp"}, headers=AUTH)
    assert r.status_code == 422 and "pattern" in r.text
    r = httpx.post(f"{url}/adapters", json={"name": "x", "path": "/tmp/\u0000"}, headers=AUTH)
    assert r.status_code == 400 and "NUL" in r.json()["detail"]


def test_health_answers_while_the_model_computes(server):
    """The model runs in its own thread: /health answers while a batch is held inside the model (event-based: the
    model blocks until the test has its /health answer, so no timing is involved)."""
    url, app = server
    batcher = app.state.batcher
    real = batcher.model
    inside, release = threading.Event(), threading.Event()

    class Blocked:
        def __contains__(self, name):
            return name in real

        def predict(self, *args):
            inside.set()
            release.wait(timeout=60)
            return real.predict(*args)

    batcher.model = Blocked()
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/predict", json={"adapter": "apt", "inputs": ["good"]},
                                  timeout=60)
            assert inside.wait(timeout=60)
            r = httpx.get(f"{url}/health", timeout=30)  # would time out if the event loop waited for the model
            assert r.status_code == 200 and r.json()["status"] == "ok"
            assert not pending.done()  # the batch is still inside the model
            release.set()
            assert pending.result().status_code == 200
    finally:
        release.set()
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
    app = create_app(fuzz_model, ServeConfig(max_batch_size=16, max_wait_ms=0, adapter_roots=(str(base),),
                                             admin_token=TOKEN, **LIMITS))
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
                    # With the token: the admin endpoints get past the gate and their bodies are fuzzed too.
                    response = case.call(base_url=url, timeout=30, headers=AUTH)
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
    """``softprompt serve`` end to end in a subprocess: flags parsed, adapters loaded, HTTP answered, admin off by
    default. The server binds port 0 and prints the port it got."""
    from softprompt.errors import ConfigError
    from softprompt.serve.cli import parse_adapter_specs

    assert parse_adapter_specs(["a=/x", "b = /y"]) == {"a": "/x", "b": "/y"}
    for bad in (["a"], ["=/x"], ["a=/x", "a=/y"]):
        with pytest.raises(ConfigError, match=r"NAME=DIR|twice"):
            parse_adapter_specs(bad)
    base, adapters = dirs
    args = ["--model", base, "--adapter", f"pos={adapters['prefix_a']}", "--adapter",
            f"prompt={adapters['prompt_front']}", "--max-batch-size", "8", "--max-wait-ms", "1", "--max-inputs", "4"]
    with ServeProcess(args, tmp_path) as url:
        assert httpx.get(f"{url}/health", timeout=30).json()["adapters"] == 2
        r = httpx.post(f"{url}/predict", json={"adapter": "pos", "inputs": ["the film was good"]}, timeout=30)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("neg", "pos")
        assert httpx.post(f"{url}/predict", json={"adapter": "pos", "inputs": ["a"] * 5}).status_code == 422
        r = httpx.delete(f"{url}/adapters/pos")  # no admin flag: off
        assert r.status_code == 403 and "--admin-token" in r.json()["detail"]
        assert [a["name"] for a in httpx.get(f"{url}/adapters").json()["adapters"]] == ["pos", "prompt"]
