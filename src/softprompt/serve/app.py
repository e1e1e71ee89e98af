"""The FastAPI app: predictions under one adapter or all of them, runtime adapter management, health and stats.

Every request body is a pydantic model whose limits (texts per request, characters per text) come from
:class:`ServeConfig`, so they appear in the OpenAPI schema and are enforced before any work is queued. Errors are
JSON ``{"detail": "..."}``: 404 unknown adapter, 409 name taken, 400 adapter folder unusable, 403 admin disabled or
path outside ``adapter_root``, 413 body too large, 422 invalid request, 503 queue full.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures at run time, and the request
# models are built per app (their limits come from the config), so string annotations could not be resolved.
import asyncio
import json
import logging
import math
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .. import __version__
from ..errors import SoftPromptError
from ..multi import MultiAdapterModel, UnknownAdapterError
from .batcher import DynamicBatcher, OverloadedError
from .config import ServeConfig

log = logging.getLogger("softprompt.serve")

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class _Conflict(SoftPromptError):
    """An adapter of that name is already loaded (409)."""


class _Forbidden(SoftPromptError):
    """Admin endpoints disabled, or a path outside ``adapter_root`` (403)."""


# ---- response models (documentation and schema) -----------------------------------------------------------------
class Prediction(BaseModel):
    """One row: the winning label and its probability (classification), or the predicted value (regression)."""

    label: str | None = None
    score: float | None = Field(None, description="probability of the label, or the regression value")
    scores: dict[str, float] | None = Field(None, description="probability of every label")


class PredictResponse(BaseModel):
    adapter: str
    predictions: list[Prediction]


class PredictAllResponse(BaseModel):
    predictions: dict[str, list[Prediction]] = Field(description="adapter name -> one prediction per input")


class AdapterInfo(BaseModel):
    name: str
    method: str
    task_kind: str
    label_names: list[str]
    num_labels: int | None = None
    max_length: int
    task: str | None = None
    prompt_length: int = 0
    prefix_lengths: list[int] = []
    insertion: list[int] | None = None


class AdaptersResponse(BaseModel):
    adapters: list[AdapterInfo]


class RemovedResponse(BaseModel):
    removed: str


class Health(BaseModel):
    status: str
    adapters: int
    queued_rows: int
    model: str | None = None


class ErrorResponse(BaseModel):
    detail: Any


_ERRORS = {
    400: {"model": ErrorResponse, "description": "the adapter folder cannot be used"},
    403: {"model": ErrorResponse, "description": "admin endpoints disabled, or path outside the adapter root"},
    404: {"model": ErrorResponse, "description": "unknown adapter"},
    409: {"model": ErrorResponse, "description": "an adapter of that name is already loaded"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    503: {"model": ErrorResponse, "description": "queue full, retry later"},
}


def _responses(*codes: int) -> dict:
    return {c: _ERRORS[c] for c in codes}


def _request_models(cfg: ServeConfig):
    """Request bodies with this server's limits built in (they show up in /openapi.json)."""
    # pydantic rejects strings with lone surrogates ("\ud800" is valid JSON but no tokenizer takes it): a 422.
    Text = Annotated[str, StringConstraints(min_length=1, max_length=cfg.max_text_chars)]

    class TextPair(BaseModel):
        """A text with an optional second segment (sentence-pair tasks such as paraphrase or entailment)."""

        model_config = ConfigDict(extra="forbid")
        text: Text
        text_pair: Text | None = None

    Inputs = Annotated[
        list[Union[Text, TextPair]],
        Field(min_length=1, max_length=cfg.max_inputs,
              description=f"1 to {cfg.max_inputs} texts (each 1 to {cfg.max_text_chars} characters) or text pairs"),
    ]

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "examples": [{"adapter": "sentiment", "inputs": ["a gripping, beautifully shot film"]}]})
        adapter: Annotated[str, StringConstraints(min_length=1, max_length=128)]
        inputs: Inputs

    class PredictAllRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "examples": [{"inputs": ["a gripping, beautifully shot film"]}]})
        inputs: Inputs

    class AddAdapterRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "examples": [{"name": "sentiment", "path": "runs/sst2-prefix"}]})
        name: Annotated[str, StringConstraints(pattern=ADAPTER_NAME_PATTERN)]
        path: Annotated[str, StringConstraints(min_length=1, max_length=4096)]

    return PredictRequest, PredictAllRequest, AddAdapterRequest, TextPair


def _safe(value: Any) -> Any:
    """Strings as valid UTF-8 (lone surrogates escaped), numbers as they are."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _split(inputs: list) -> tuple[list[str], list[str | None]]:
    texts, pairs = [], []
    for item in inputs:
        if isinstance(item, str):
            texts.append(item)
            pairs.append(None)
        else:
            texts.append(item.text)
            pairs.append(item.text_pair)
    return texts, pairs


def _clean(row: dict) -> dict:
    """A model prediction as JSON-safe fields (non-finite numbers become null: JSON has no NaN)."""
    def num(x):
        return x if x is None or math.isfinite(x) else None

    out = {"label": row.get("label"), "score": num(row.get("score"))}
    if row.get("scores") is not None:
        out["scores"] = {k: (v if math.isfinite(v) else 0.0) for k, v in row["scores"].items()}
    return out


class _BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413 before the app parses anything.

    Bodies are read here (also chunked ones without Content-Length) and replayed to the app.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                return await _send_json(send, 400, {"detail": "invalid Content-Length header"})
            if too_big:
                return await _send_json(send, 413, {"detail": f"request body over {self.limit} bytes"})
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_json(send, 413, {"detail": f"request body over {self.limit} bytes"})
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


async def _send_json(send, status: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(model: MultiAdapterModel, config: ServeConfig | None = None) -> FastAPI:
    """Build the app serving ``model``. The batcher starts and stops with the app (ASGI lifespan)."""
    cfg = config or ServeConfig()
    batcher = DynamicBatcher(model, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
                             mixed=cfg.mixed, max_queue_rows=cfg.max_queue_rows)
    PredictRequest, PredictAllRequest, AddAdapterRequest, _ = _request_models(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="softprompt", version=__version__, lifespan=lifespan,
        description="Many prompt/prefix adapters on one frozen model; requests of all adapters share batches.",
    )
    app.state.model, app.state.batcher, app.state.config = model, batcher, cfg
    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes)

    # ---- errors: always JSON with a message; client mistakes are 4xx ----------------------------------------
    def error(status: int, exc: BaseException) -> JSONResponse:
        return JSONResponse(status_code=status, content={"detail": _safe(exc)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # FastAPI's own handler echoes each bad input back; an input holding a lone surrogate cannot be encoded as
        # JSON and turned the 422 into a 500. Report type, location and message only, as valid UTF-8.
        detail = [{"type": str(e.get("type")), "loc": [_safe(x) for x in e.get("loc", ())], "msg": _safe(e.get("msg"))}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(UnknownAdapterError)
    async def _unknown(request: Request, exc: UnknownAdapterError):
        return error(404, exc)

    @app.exception_handler(OverloadedError)
    async def _overloaded(request: Request, exc: OverloadedError):
        return JSONResponse(status_code=503, content={"detail": _safe(exc)}, headers={"Retry-After": "1"})

    @app.exception_handler(_Conflict)
    async def _conflict(request: Request, exc: _Conflict):
        return error(409, exc)

    @app.exception_handler(_Forbidden)
    async def _forbidden(request: Request, exc: _Forbidden):
        return error(403, exc)

    @app.exception_handler(SoftPromptError)
    async def _bad_adapter(request: Request, exc: SoftPromptError):
        return error(400, exc)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content={"detail": _safe(f"internal error: {type(exc).__name__}: {exc}")})

    # ---- prediction ----------------------------------------------------------------------------------------
    @app.post("/predict", response_model=PredictResponse, responses=_responses(404, 413, 503))
    async def predict(body: PredictRequest) -> dict:
        """Predict every input under one adapter. Rows join shared batches with other requests."""
        model.adapter(body.adapter)  # 404 before queueing
        texts, pairs = _split(body.inputs)
        rows = await batcher.submit([body.adapter] * len(texts), texts, pairs)
        return {"adapter": body.adapter, "predictions": [_clean(r) for r in rows]}

    @app.post("/predict_all", response_model=PredictAllResponse, responses=_responses(413, 503))
    async def predict_all(body: PredictAllRequest) -> dict:
        """Predict every input under every loaded adapter (one text, every task's answer)."""
        names = model.adapter_names
        texts, pairs = _split(body.inputs)
        k = len(texts)
        rows = await batcher.submit([n for n in names for _ in range(k)], texts * len(names), pairs * len(names))
        return {"predictions": {n: [_clean(r) for r in rows[j * k:(j + 1) * k]] for j, n in enumerate(names)}}

    # ---- adapters ------------------------------------------------------------------------------------------
    @app.get("/adapters", response_model=AdaptersResponse)
    async def list_adapters() -> dict:
        """The loaded adapters and what they predict."""
        return {"adapters": [model.adapter(n).describe() for n in model.adapter_names]}

    @app.post("/adapters", status_code=201, response_model=AdapterInfo, responses=_responses(400, 403, 409, 413))
    async def add_adapter(body: AddAdapterRequest) -> dict:
        """Load an adapter folder (on the server's disk) under a new name, without a restart."""
        if not cfg.allow_admin:
            raise _Forbidden("adapter management is disabled on this server (started with --no-admin)")
        path = _allowed_path(body.path, cfg.adapter_root)
        if body.name in model:
            raise _Conflict(f"adapter {body.name!r} is already loaded; DELETE /adapters/{body.name} first")
        try:
            # Reading files and building modules happens off the event loop (and off the model thread).
            entry = await asyncio.to_thread(model.add_adapter, body.name, path)
        except Exception as exc:  # noqa: BLE001 - any unusable folder (missing, corrupt, odd config) is a 400
            if isinstance(exc, SoftPromptError) and "already loaded" in str(exc):
                raise _Conflict(str(exc)) from None
            raise _BadPath(f"cannot load adapter from {body.path!r}: {type(exc).__name__}: {exc}") from None
        return entry.describe()

    @app.delete("/adapters/{name}", response_model=RemovedResponse, responses=_responses(403, 404))
    async def remove_adapter(name: str) -> dict:
        """Unload an adapter; queued rows naming it get 404, running batches finish."""
        if not cfg.allow_admin:
            raise _Forbidden("adapter management is disabled on this server (started with --no-admin)")
        model.remove_adapter(name)
        return {"removed": name}

    # ---- health --------------------------------------------------------------------------------------------
    @app.get("/health", response_model=Health)
    async def health() -> dict:
        """Liveness: answers while the model computes (the model runs in its own thread)."""
        return {"status": "ok", "adapters": len(model.adapter_names), "queued_rows": batcher.queued_rows,
                "model": model.model_name}

    @app.get("/stats")
    async def stats() -> dict:
        """Batching counters: batches, rows, batch sizes, batches that mixed adapters, backbone passes."""
        return {"batcher": batcher.stats.to_dict(), "model": model.stats.to_dict(),
                "config": {"max_batch_size": cfg.max_batch_size, "max_wait_ms": cfg.max_wait_ms,
                           "mixed": cfg.mixed}}

    return app


class _BadPath(SoftPromptError):
    """The adapter folder cannot be read (400)."""


def _allowed_path(path: str, root: str | None) -> str:
    if "\x00" in path:
        raise _BadPath("adapter path contains a NUL character")
    if root is None:
        return path
    resolved = Path(os.path.realpath(path))
    base = Path(os.path.realpath(root))
    if resolved != base and base not in resolved.parents:
        raise _Forbidden(f"adapter paths must lie inside the server's adapter root ({root})")
    return str(resolved)
