"""Builders shared by the serving tests (no tests here): servers that report the port they bound, in a thread or as
a ``softprompt serve`` subprocess, and the admin token they are started with."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

uvicorn = pytest.importorskip("uvicorn")

TOKEN = "test-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class ServerThread:
    """uvicorn in a background thread on port 0; the port the OS chose is read back from the bound socket (no
    bind-release-rebind race with other processes)."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.ready = threading.Event()
        startup = self.server.startup

        async def startup_then_signal(sockets=None):
            await startup(sockets=sockets)
            self.ready.set()

        self.server.startup = startup_then_signal

    def __enter__(self) -> str:
        self.thread.start()
        # Wait for the event; the loop only notices a server thread that died during startup (and bounds the wait
        # generously: this is a guard, not a timing assertion).
        for _ in range(1200):
            if self.ready.wait(timeout=0.1):
                break
            if not self.thread.is_alive():
                break
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ServeProcess:
    """``softprompt serve ... --port 0`` in a subprocess; the URL comes from the line it prints once listening.

    stderr goes to a file (read it with :meth:`stderr`), so a chatty server cannot block on a full pipe.
    """

    def __init__(self, args: list[str], tmp_path, env: dict[str, str] | None = None):
        self.args = [sys.executable, "-m", "softprompt", "serve", "--port", "0", "--log-level", "warning", *args]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.err_path = tmp_path / f"serve-stderr-{id(self)}.txt"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=subprocess.PIPE, stderr=self.err, text=True)
        for line in self.proc.stdout:  # blocks until the line comes, or EOF if the server exits
            if line.startswith("softprompt serve: listening on "):
                return line.split(" on ", 1)[1].strip()
        self.proc.wait(timeout=30)
        raise AssertionError(f"server exited with {self.proc.returncode} before listening:\n{self.stderr()}")

    def stderr(self) -> str:
        self.err.flush()
        return self.err_path.read_text()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.err.close()


def run_serve(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``softprompt serve ARGS`` expected to stop at startup: its exit status and output."""
    cmd = [sys.executable, "-m", "softprompt", "serve", *args]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
                          check=False)


def adapter_names(url: str) -> list[str]:
    """The adapters a server lists (to check that a refused request changed nothing)."""
    import httpx

    return [a["name"] for a in httpx.get(f"{url}/adapters", timeout=30).json()["adapters"]]


def assert_refused(response, status: int, *needles: str) -> str:
    """``response`` has ``status`` and a JSON message containing every needle; returns the message."""
    assert response.status_code == status, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail, detail  # one line
    for needle in needles:
        assert needle in detail, (needle, detail)
    return detail


def edit_config(folder, **options) -> None:
    """Set method options in a saved adapter's ``adapter_config.json``."""
    import json
    from pathlib import Path

    file = Path(folder) / "adapter_config.json"
    meta = json.loads(file.read_text())
    meta["config"].update(options)
    file.write_text(json.dumps(meta))


def adapter_tree(tmp, names: list[str] | None = None) -> tuple:
    """``(base, root, outside)``: a tiny base model, an adapter root holding ``names`` (every test adapter by default)
    plus hostile entries, and a valid adapter outside the root. Hostile entries: ``link_out`` (a folder symlink that
    leaves the root), ``link_in`` (one that stays inside: allowed), ``files_out`` (a folder inside whose weights file
    links outside), ``huge_tokens`` (a prefix config asking for 100,000 virtual tokens)."""
    import shutil

    from test_multi_helpers import make_adapters, make_tiny_base_dir

    base = make_tiny_base_dir(tmp / "base")
    root, outside = tmp / "root", tmp / "outside"
    make_adapters(base, root, **({"names": names} if names else {}))
    make_adapters(base, outside, names=["prompt_cls"])
    (root / "link_out").symlink_to(outside / "prompt_cls", target_is_directory=True)
    (root / "link_in").symlink_to(root / "prompt_cls", target_is_directory=True)
    (root / "files_out").mkdir()
    shutil.copy(root / "prompt_cls" / "adapter_config.json", root / "files_out")
    (root / "files_out" / "adapter_model.safetensors").symlink_to(outside / "prompt_cls" / "adapter_model.safetensors")
    shutil.copytree(root / "prefix_a", root / "huge_tokens")
    edit_config(root / "huge_tokens", num_virtual_tokens=100_000)
    return base, root, outside
