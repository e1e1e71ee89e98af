"""Issue 22, server: Hypothesis fuzzing of the admin endpoints (POST /adapters, DELETE /adapters/{name}) on three
servers: admin off, admin with a token, and admin without auth (loopback). Requests mix good and bad tokens, names,
paths (traversals, symlinks out of the root, oversized adapters) and bodies (valid, ill-typed, not JSON).

Properties: never a 5xx; every error is JSON with a message; without permission the answer is 403 (off) or 401 (wrong
token) and the adapter list does not change; an adapter is only ever loaded from a folder whose files all lie under
the adapter root, within the size limits; any other answer leaves the list as it was."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve_helpers import TOKEN, ServerThread, adapter_tree

from softprompt.multi import MultiAdapterModel

pytest.importorskip("fastapi")

from softprompt.serve import ServeConfig, create_app

LOADABLE = ["prompt_cls", "prefix_b", "link_in"]  # inside the root, within the limits
HOSTILE = ["link_out", "files_out", "huge_tokens", "../outside/prompt_cls", "/etc", "/etc/passwd", "/", "", "."]
PARTS = ["..", ".", "prompt_cls", "outside", "root", "link_out", "link_in", "files_out", "adapter_config.json"]


def fuzz(n: int):
    """Deterministic and bounded; no per-example deadline (each example is an HTTP round trip, some load a model)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only contend


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    names = ["prefix_a", "prefix_b", "prompt_cls"]
    base, root, outside = adapter_tree(tmp_path_factory.mktemp("serve_fuzz"), names)
    return base, root.resolve(), outside.resolve()


@pytest.fixture(scope="module")
def servers(tree):
    base, root, _ = tree
    model = MultiAdapterModel(base, {"prefix_a": root / "prefix_a"})
    common = {"adapter_roots": (str(root),), "max_adapters": 4, "max_body_bytes": 5000}
    apps = {"off": create_app(model, ServeConfig(**common)),
            "token": create_app(model, ServeConfig(admin_token=TOKEN, **common)),
            "open": create_app(model, ServeConfig(allow_admin_without_auth=True, **common))}
    threads = {k: ServerThread(app) for k, app in apps.items()}
    urls = {k: t.__enter__() for k, t in threads.items()}
    yield model, urls
    for t in threads.values():
        t.__exit__(None, None, None)


# Header values a client can send at all (h11 refuses control characters and surrounding spaces).
_header_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
_auth = st.one_of(
    st.none(), st.just(f"Bearer {TOKEN}"), st.just(f"bearer {TOKEN}"), st.just(f"Basic {TOKEN}"),
    st.just(f"Bearer {TOKEN[:-1]}"), st.builds(lambda t: f"Bearer {t}", _header_text), _header_text,
)
_names = st.one_of(st.sampled_from(["added", "prefix_a", "x.y-z_1", "A"]), st.text(max_size=12))
_paths = st.one_of(
    st.sampled_from(LOADABLE + HOSTILE),
    st.lists(st.sampled_from(PARTS), min_size=1, max_size=5).map("/".join),
    st.lists(st.sampled_from(PARTS), min_size=1, max_size=5).map(lambda p: "/" + "/".join(p)),
    st.text(max_size=20),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6,
)
_bodies = st.one_of(
    st.builds(lambda n, p: json.dumps({"name": n, "path": p}).encode(), _names, _paths),
    st.builds(lambda n, p, x: json.dumps({"name": n, "path": p, "extra": x}).encode(), _names, _paths, _json),
    _json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=100),
)


def _inside(path: str, root: Path) -> bool:
    real = Path(os.path.realpath(path))
    return real == root or root in real.parents


def _check_one(model, url: str, server: str, root: Path, method: str, auth, body: bytes, name: str) -> int:
    """Send one admin request, check the properties, return the status."""
    headers = {"content-type": "application/json"}
    if auth is not None:
        headers["authorization"] = auth
    before = model.adapter_names
    if method == "POST":
        r = httpx.post(f"{url}/adapters", content=body, headers=headers, timeout=60)
    else:
        r = httpx.delete(f"{url}/adapters/{quote(name, safe='')}", headers=headers, timeout=60)
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        detail = r.json()["detail"]
        assert detail and (isinstance(detail, list) or "\n" not in detail), r.text
    allowed = server == "open" or (server == "token" and auth is not None and auth.split(" ")[0].lower() == "bearer"
                                   and auth.split(" ", 1)[1].strip() == TOKEN)
    if server == "off":
        assert r.status_code == 403 and "--admin-token" in r.json()["detail"], r.text
    elif not allowed:
        assert r.status_code == 401 and "admin token" in r.json()["detail"], r.text
    after = model.adapter_names
    if r.status_code == 201:
        added = r.json()["name"]
        assert after == [*before, added]
        folder = model.adapter(added).path
        assert all(_inside(os.path.join(folder, f), root)
                   for f in ("adapter_config.json", "adapter_model.safetensors")), folder
        assert Path(os.path.realpath(folder)).name in ("prompt_cls", "prefix_b", "prefix_a"), folder
        model.remove_adapter(added)  # back to the start for the next example
    elif r.status_code == 200 and method == "DELETE":
        assert r.json()["removed"] == name and after == [n for n in before if n != name]
        if name == "prefix_a":  # restore the starting state
            model.add_adapter("prefix_a", root / "prefix_a")
    else:
        assert after == before, (r.status_code, r.text)
    return r.status_code


# Statuses each run must have produced: proof that the generated requests get past the gate and load adapters
# (the paths test below covers the path and size refusals).
EXPECTED = {"off": {403}, "token": {201, 401, 404, 422}, "open": {201, 404, 422}}


@pytest.mark.parametrize("server", ["off", "token", "open"])
def test_admin_endpoints_fuzzed(servers, tree, server):
    model, urls = servers
    seen = collections.Counter()

    @fuzz(150)
    @given(method=st.sampled_from(["POST", "DELETE"]), auth=_auth, body=_bodies, name=_names)
    def run(method, auth, body, name):
        seen[_check_one(model, urls[server], server, tree[1], method, auth, body, name)] += 1

    run()
    assert EXPECTED[server] <= set(seen), seen


def test_admin_paths_fuzzed_with_the_token(servers, tree):
    """Well-formed bodies with the right token: only the paths and the names vary."""
    model, urls = servers
    seen = collections.Counter()

    @fuzz(100)
    @given(path=_paths, name=_names)
    def run(path, name):
        body = json.dumps({"name": name, "path": path}).encode()
        seen[_check_one(model, urls["token"], "token", tree[1], "POST", f"Bearer {TOKEN}", body, name)] += 1

    run()
    assert {201, 400, 403, 413, 422} <= set(seen), seen
