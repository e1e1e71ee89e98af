"""The admin endpoints, ``POST /adapters`` and ``DELETE /adapters/{name}``, and the gate in front of them.

The gate is ASGI middleware: a request to an admin endpoint is refused (403 admin off, 401 wrong token) before its
body is read or parsed, so a client without the token learns nothing and costs nothing. Loading then goes through
:func:`~softprompt.serve.security.resolve_adapter_path` (roots, symlinks), the adapter count and
:func:`~softprompt.serve.limits.check_adapter_size` (sizes from the config and the safetensors header), all before
:meth:`MultiAdapterModel.add_adapter` allocates anything.
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures at run time.
import asyncio
import os
import threading
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import SoftPromptError
from ..multi import MultiAdapterModel
from .body import send_json
from .config import ServeConfig
from .errors import BadAdapterPathError, ConflictError, ServeError
from .limits import check_adapter_size
from .schemas import AdapterInfo, RemovedResponse, responses
from .security import check_admin, default_roots, resolve_adapter_path


def is_admin_request(method: str, path: str) -> bool:
    """Whether a request may change the adapters (every non-reading method under ``/adapters``)."""
    return (path == "/adapters" or path.startswith("/adapters/")) and method not in ("GET", "HEAD", "OPTIONS")


class AdminGate:
    """ASGI middleware: admin requests without permission are answered 403/401 before anything else happens."""

    def __init__(self, app, config: ServeConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send):
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a prefix (uvicorn --root-path): match the app's own path
            path = path[len(root):]
        if scope["type"] == "http" and is_admin_request(scope.get("method", ""), path):
            auth = dict(scope.get("headers") or []).get(b"authorization")
            try:
                check_admin(self.config, auth.decode("latin-1") if auth is not None else None)
            except ServeError as exc:
                # Connection: close, as the unread body must not be taken for the next request.
                return await send_json(send, exc.status, {"detail": str(exc)}, {**exc.headers, "connection": "close"})
        return await self.app(scope, receive, send)


def add_admin_routes(app: FastAPI, model: MultiAdapterModel, cfg: ServeConfig, add_request: type) -> None:
    """Register the admin endpoints. ``add_request``: the pydantic model of the ``POST /adapters`` body."""
    roots = cfg.adapter_roots
    if roots is None:  # default: where the adapters served from the start live
        roots = default_roots(model.adapter(n).path for n in model.adapter_names)
    # Resolved once, now: a later change of the working directory must not move the roots.
    roots = tuple(os.path.realpath(r) for r in roots)
    app.state.adapter_roots = roots
    app.add_middleware(AdminGate, config=cfg)
    # One load at a time, held in the loading thread: the count check and the registration cannot interleave, and
    # concurrent requests cannot stack several large loads in memory. (A lock held by the thread also survives the
    # cancellation of the request that started it.)
    load_lock = threading.Lock()
    bearer = HTTPBearer(auto_error=False, description="the token given to --admin-token")

    def authorize(request: Request,
                  _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None) -> None:
        # The gate has checked already; checked again here so that the routes stay safe without the middleware.
        check_admin(cfg, request.headers.get("authorization"))

    def load(name: str, path: str) -> Any:
        folder = resolve_adapter_path(path, roots)
        with load_lock:
            if name in model:
                raise ConflictError(f"adapter {name!r} is already loaded; DELETE /adapters/{name} first")
            if len(model.adapter_names) >= cfg.max_adapters:
                raise ConflictError(
                    f"this server holds {len(model.adapter_names)} adapters, its limit (--max-adapters "
                    f"{cfg.max_adapters}); DELETE /adapters/NAME one first"
                )
            check_adapter_size(folder, model.info, max_virtual_tokens=cfg.max_virtual_tokens,
                               max_bytes=cfg.max_adapter_bytes)
            try:
                return model.add_adapter(name, folder)
            except SoftPromptError as exc:
                raise BadAdapterPathError(f"cannot load adapter from {path!r}: {exc}") from None
            except Exception as exc:  # any unusable folder (odd config, odd tensors) is a 400, never a 500
                raise BadAdapterPathError(f"cannot load adapter from {path!r}: {type(exc).__name__}: {exc}") from None

    @app.post("/adapters", status_code=201, response_model=AdapterInfo, dependencies=[Depends(authorize)],
              responses=responses(400, 401, 403, 408, 409, 413))
    async def add_adapter(body: add_request) -> dict:  # type: ignore[valid-type]
        """Load an adapter folder under a new name, without a restart. Needs the admin token; the folder must lie
        under the server's adapter root and within its size limits."""
        # Reading files and building modules happens off the event loop (and off the model thread).
        entry = await asyncio.to_thread(load, body.name, body.path)
        return entry.describe()

    @app.delete("/adapters/{name}", response_model=RemovedResponse, dependencies=[Depends(authorize)],
                responses=responses(401, 403, 404))
    async def remove_adapter(name: str) -> dict:
        """Unload an adapter (needs the admin token); queued rows naming it get 404, running batches finish."""
        # In a thread: removal waits for the model lock, which a running batch holds.
        await asyncio.to_thread(model.remove_adapter, name)
        return {"removed": name}
