"""Issue 22, server: the admin endpoints are locked down by default. Each refused request is checked for its status,
its one-line message and that the adapter list did not change. Paths and size limits: test_serve_limits.py."""

from __future__ import annotations

import httpx
import pytest
from test_multi_helpers import make_adapters, make_tiny_base_dir
from test_serve_helpers import (
    AUTH,
    TOKEN,
    ServeProcess,
    ServerThread,
    adapter_names,
    assert_refused,
    run_serve,
)

from softprompt.errors import ConfigError
from softprompt.multi import MultiAdapterModel

pytest.importorskip("fastapi")

from softprompt.serve import ServeConfig, create_app
from softprompt.serve.security import is_loopback, startup_warnings

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only contend


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_admin")
    base = make_tiny_base_dir(tmp / "base")
    return base, make_adapters(base, tmp / "adapters", names=["prefix_a", "prompt_cls"])


@pytest.fixture(scope="module")
def model(dirs):
    base, adapters = dirs
    return MultiAdapterModel(base, {"prefix_a": adapters["prefix_a"]})


def serve(model, **options):
    return ServerThread(create_app(model, ServeConfig(**options)))


ADD = {"name": "added", "path": "prompt_cls"}


def test_admin_endpoints_are_off_by_default_and_say_how_to_turn_them_on(model):
    with serve(model) as url:
        before = adapter_names(url)
        for headers in ({}, AUTH):  # a token does not help when none is configured
            r = httpx.post(f"{url}/adapters", json=ADD, headers=headers, timeout=30)
            assert_refused(r, 403, "--admin-token", "SOFTPROMPT_ADMIN_TOKEN", "--allow-admin-without-auth")
            assert_refused(httpx.delete(f"{url}/adapters/prefix_a", headers=headers, timeout=30), 403, "--admin-token")
        # Refused before the body is parsed: a malformed body gets the same 403, not a 422 that describes the schema.
        r = httpx.post(f"{url}/adapters", content=b"{not json", headers={"content-type": "application/json"})
        assert_refused(r, 403, "--admin-token")
        assert adapter_names(url) == before == ["prefix_a"]
        assert httpx.get(f"{url}/adapters").status_code == 200  # reading stays open


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN,
    f"Bearer {TOKEN.upper()}", "Bearer \u00e9\u00e9",
])
def test_wrong_or_missing_token_gets_401_and_changes_nothing(model, authorization):
    with serve(model, admin_token=TOKEN) as url:
        before = adapter_names(url)
        headers = {} if authorization is None else {"Authorization": authorization.encode("latin-1")}
        r = httpx.post(f"{url}/adapters", json=ADD, headers=headers, timeout=30)
        assert_refused(r, 401, "Authorization: Bearer TOKEN", "--admin-token")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_refused(httpx.delete(f"{url}/adapters/prefix_a", headers=headers, timeout=30), 401, "admin token")
        assert adapter_names(url) == before == ["prefix_a"]


def test_the_right_token_adds_and_removes(model):
    with serve(model, admin_token=TOKEN) as url:
        for auth in (AUTH, {"Authorization": f"bearer  {TOKEN}"}):  # scheme case and spaces do not matter
            r = httpx.post(f"{url}/adapters", json=ADD, headers=auth, timeout=30)
            assert r.status_code == 201, r.text
            assert adapter_names(url) == ["prefix_a", "added"]
            assert httpx.delete(f"{url}/adapters/added", headers=auth, timeout=30).json() == {"removed": "added"}
            assert adapter_names(url) == ["prefix_a"]


def test_the_token_is_compared_in_constant_time(model, monkeypatch):
    from softprompt.serve import security

    calls = []
    real = security.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    with serve(model, admin_token=TOKEN) as url:
        r = httpx.delete(f"{url}/adapters/nothing", headers={"Authorization": "Bearer guess"}, timeout=30)
        assert_refused(r, 401, "admin token")
    assert (b"guess", TOKEN.encode()) in calls


def test_allow_admin_without_auth_needs_no_token(model):
    with serve(model, allow_admin_without_auth=True) as url:
        assert httpx.post(f"{url}/adapters", json=ADD, timeout=30).status_code == 201
        assert httpx.delete(f"{url}/adapters/added", timeout=30).status_code == 200
        assert adapter_names(url) == ["prefix_a"]


def test_the_config_never_shows_the_token():
    cfg = ServeConfig(admin_token=TOKEN)
    assert TOKEN not in repr(cfg) and cfg.admin_enabled
    for bad in ("short", "x" * 15, " " + TOKEN, TOKEN + "\n", TOKEN + "\u00e9"):
        with pytest.raises(ConfigError, match="at least 16 visible ASCII characters"):
            ServeConfig(admin_token=bad)
    assert ServeConfig(admin_token="x" * 16).admin_enabled  # 16 is enough


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False),
    ("localhost.example.org", False), ("", False),
])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_startup_checks_of_host_and_admin_flags():
    with pytest.raises(ConfigError, match="--allow-admin-without-auth needs a loopback --host"):
        startup_warnings(ServeConfig(allow_admin_without_auth=True), "0.0.0.0")
    assert startup_warnings(ServeConfig(allow_admin_without_auth=True), "::1") == []
    (warning,) = startup_warnings(ServeConfig(admin_token=TOKEN), "0.0.0.0")
    assert "admin endpoints" in warning and "0.0.0.0" in warning and "\n" not in warning
    assert startup_warnings(ServeConfig(admin_token=TOKEN), "127.0.0.1") == []
    assert startup_warnings(ServeConfig(), "0.0.0.0") == []  # admin off: nothing to warn about


def _serve_args(argv):
    import argparse

    from softprompt.serve.cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="softprompt")
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_no_admin_keeps_admin_off_even_with_the_token_in_the_environment(monkeypatch):
    """--no-admin wins over SOFTPROMPT_ADMIN_TOKEN (a token left in the environment must not turn admin on)."""
    from softprompt.serve.cli import serve_config

    monkeypatch.setenv("SOFTPROMPT_ADMIN_TOKEN", TOKEN)
    assert serve_config(_serve_args([])).admin_token == TOKEN
    cfg = serve_config(_serve_args(["--no-admin"]))
    assert cfg.admin_token is None and not cfg.admin_enabled


# flags whose values argparse's types refuse while parsing (argparse exits with status 2 for any command)
ARGPARSE_CHECKED = {"--port", "--max-queue-rows", "--max-adapter-bytes", "--body-timeout", "--max-wait-ms"}


@pytest.mark.parametrize("args,env,needle", [
    (["--port", "99999"], {}, "argument --port: a port is a number from 0 to 65535, got 99999"),
    (["--port", "-1"], {}, "from 0 to 65535"),
    (["--port", "http"], {}, "from 0 to 65535, got 'http'"),
    (["--max-queue-rows", "0"], {}, "argument --max-queue-rows: expected a whole number >= 1, got 0"),
    (["--max-adapter-bytes", "1e9"], {}, "expected a whole number >= 1, got '1e9'"),
    (["--body-timeout", "nan"], {}, "argument --body-timeout: expected a finite number > 0"),
    (["--max-wait-ms", "-5"], {}, "argument --max-wait-ms"),
    # Refused before the model loads: the model named here does not exist, and the message is about the flags.
    (["--allow-admin-without-auth", "--host", "0.0.0.0"], {}, "--allow-admin-without-auth needs a loopback --host"),
    (["--allow-admin-without-auth", "--host", "example.org"], {}, "needs a loopback --host"),
    (["--admin-token", "short"], {}, "at least 16 visible ASCII characters"),
    ([], {"SOFTPROMPT_ADMIN_TOKEN": "short"}, "at least 16 visible ASCII characters"),
    (["--no-admin", "--admin-token", TOKEN], {}, "--no-admin contradicts"),
    (["--adapter-root", "/no/such/folder"], {}, "--adapter-root '/no/such/folder' is not a folder"),
])
def test_cli_startup_errors_are_one_line(args, env, needle, monkeypatch, capsys):
    """From Python too: ``main`` returns the exit status with one line on stderr; only argparse's own refusals of a
    flag's value exit (status 2), as argparse does for every command."""
    from softprompt.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["serve", *args, "--model", "no-such-model"]
    if args and args[0] in ARGPARSE_CHECKED:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
    else:
        assert main(argv) == 2
    message = capsys.readouterr().err
    lines = message.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], message


@pytest.mark.parametrize("args,needle", [
    (["--port", "99999"], "argument --port: a port is a number from 0 to 65535, got 99999"),
    (["--allow-admin-without-auth", "--host", "0.0.0.0"], "--allow-admin-without-auth needs a loopback --host"),
])
def test_cli_startup_errors_end_to_end(args, needle):
    """The same through ``python -m softprompt``: exit status, one line on stderr, no traceback."""
    result = run_serve([*args, "--model", "no-such-model"])
    assert result.returncode == 2, result  # argparse and the startup checks alike
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "OverflowError" not in result.stderr


def test_cli_token_from_the_environment_and_warning_on_all_interfaces(dirs, tmp_path):
    """The token comes from SOFTPROMPT_ADMIN_TOKEN (not in the process arguments); listening on all interfaces with
    admin on prints a one-line warning. The server reports the port it bound (port 0)."""
    base, adapters = dirs
    args = ["--model", base, "--adapter", f"prefix_a={adapters['prefix_a']}", "--host", "0.0.0.0"]
    server = ServeProcess(args, tmp_path, env={"SOFTPROMPT_ADMIN_TOKEN": TOKEN})
    assert TOKEN not in " ".join(server.args)
    with server as url:
        url = url.replace("0.0.0.0", "127.0.0.1")
        assert_refused(httpx.post(f"{url}/adapters", json=ADD, timeout=30), 401, "admin token")
        r = httpx.post(f"{url}/adapters", json=ADD, headers=AUTH, timeout=60)  # relative to the default root
        assert r.status_code == 201, r.text
        assert adapter_names(url) == ["prefix_a", "added"]
        warnings = [line for line in server.stderr().splitlines() if "warning" in line]
    assert len(warnings) == 1 and "admin endpoints" in warnings[0] and "0.0.0.0" in warnings[0], warnings


@pytest.mark.parametrize("method,path,root_path,gated", [
    ("POST", "/adapters", "", True), ("DELETE", "/adapters/x", "", True), ("PUT", "/adapters/", "", True),
    ("POST", "/api/adapters", "/api", True), ("DELETE", "/api/adapters/x", "/api", True),
    ("GET", "/adapters", "", False), ("HEAD", "/api/adapters", "/api", False), ("POST", "/predict", "", False),
    ("POST", "/adapters_x", "", False),
])
def test_the_gate_covers_every_changing_request_under_adapters(method, path, root_path, gated):
    """The ASGI gate alone (no app behind it that could refuse as well), also under a mount prefix."""
    import asyncio

    from softprompt.serve.admin import AdminGate

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": root_path, "headers": []}
    asyncio.run(AdminGate(app, ServeConfig())(scope, None, send))
    assert (reached == []) is gated
    if gated:
        assert sent[0]["status"] == 403 and b"--admin-token" in sent[1]["body"]
        # The body was not read: the connection must close, or its bytes would be read as the next request.
        assert (b"connection", b"close") in sent[0]["headers"]


@pytest.mark.parametrize("options,status", [({}, 403), ({"admin_token": TOKEN}, 401)])
def test_the_routes_refuse_by_themselves_without_the_gate(model, options, status):
    """The admin routes check permission again (defence in depth): with the ASGI gate taken out of the app, a request
    without the token is still refused with the same status, and nothing changes."""
    from softprompt.serve.admin import AdminGate

    app = create_app(model, ServeConfig(**options))
    app.user_middleware = [m for m in app.user_middleware if m.cls is not AdminGate]  # before the stack is built
    with ServerThread(app) as url:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
            assert_refused(httpx.post(f"{url}/adapters", json=ADD, headers=headers, timeout=30), status, "admin")
            assert_refused(httpx.delete(f"{url}/adapters/prefix_a", headers=headers, timeout=30), status, "admin")
        assert adapter_names(url) == ["prefix_a"]
