"""ASGI middleware that reads every request body under a size limit and a time limit before the app sees it."""

from __future__ import annotations

import asyncio
import json


async def send_json(send, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
    """Answer with a JSON body straight from ASGI (no app involved)."""
    data = json.dumps(obj).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def error_body(scope, message: str, code: str) -> dict:
    """An error body in the format of the API the request addressed: OpenAI's error JSON under ``/v1`` (what its
    clients parse), FastAPI's ``{"detail": ...}`` elsewhere."""
    path = scope.get("path") or ""
    root = scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root):]
    if path == "/v1" or path.startswith("/v1/"):
        return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return {"detail": message}


class BodyLimit:
    """Refuse bodies over ``limit`` bytes (413) or not complete within ``timeout`` seconds (408).

    The body is read here (chunked ones without Content-Length too) and replayed to the app, so nothing is parsed
    before the whole body is known to be small. The time limit covers the whole body, not each chunk: a client that
    trickles one byte at a time cannot hold the connection and the buffer open for longer than ``timeout``.
    """

    def __init__(self, app, limit: int, timeout: float = 10.0):
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = error_body(scope, f"request body over {self.limit} bytes (this server's --max-body-bytes); send "
                                    "fewer or shorter inputs per request", "request_too_large")
        if declared is not None:
            try:
                over = int(declared) > self.limit
            except ValueError:
                return await send_json(send, 400, error_body(scope, "invalid Content-Length header",
                                                             "invalid_content_length"))
            if over:
                return await send_json(send, 413, too_big, {"connection": "close"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                # 408 and close: the rest of the body may still come, and it must not be read as a next request.
                return await send_json(send, 408, error_body(
                    scope, f"request body not received within {self.timeout:g} s (this server's --body-timeout); "
                           "send the whole body at once", "request_timeout"), {"connection": "close"})
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await send_json(send, 413, too_big, {"connection": "close"})
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
