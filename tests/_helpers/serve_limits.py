"""Builders of test_serve_limits*.py: a server thread with the admin token, and an adapter added over HTTP."""

from __future__ import annotations

import httpx
from test_serve_helpers import AUTH, TOKEN, ServerThread

from softprompt.serve import ServeConfig, create_app


def serve(model, **options):
    return ServerThread(create_app(model, ServeConfig(admin_token=TOKEN, **options)))


def add(url, path, name="added"):
    return httpx.post(f"{url}/adapters", json={"name": name, "path": str(path)}, headers=AUTH, timeout=60)
