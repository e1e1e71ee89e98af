"""The FastAPI app: predictions under one adapter or all of them, runtime adapter management, health and stats.

Every request body is a pydantic model whose limits (texts per request, characters per text) come from
:class:`ServeConfig`, so they appear in the OpenAPI schema and are enforced before any work is queued. Errors are
JSON ``{"detail": "..."}``, never a 5xx for bad input: 400 adapter folder unusable, 401 wrong admin token, 403 admin
endpoints off or path outside the adapter roots, 404 unknown adapter, 408 body too slow, 409 name taken or adapter
limit reached, 413 body, request or adapter over a limit, 422 invalid request, 503 queue full (retry later).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures at run time, and the request
# models are built per app (their limits come from the config), so string annotations could not be resolved.
import logging
import math
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import __version__
from ..errors import SoftPromptError
from ..multi import MultiAdapterModel, UnknownAdapterError
from .admin import add_admin_routes
from .batcher import DynamicBatcher, OverloadedError
from .body import BodyLimit
from .config import ServeConfig
from .errors import ServeError, TooLargeError
from .generation import GenerationService
from .openai_api import add_openai_routes
from .schemas import (
    AdaptersResponse,
    Health,
    PredictAllResponse,
    PredictResponse,
    request_models,
    responses,
)

log = logging.getLogger("softprompt.serve")


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
    """A model prediction as JSON-safe fields (JSON has no NaN): a non-finite ``score`` becomes null, and a
    non-finite entry of ``scores``, a table of probabilities (floats by schema), becomes 0.0."""
    def num(x):
        return x if x is None or math.isfinite(x) else None

    out = {"label": row.get("label"), "score": num(row.get("score"))}
    if row.get("scores") is not None:
        out["scores"] = {k: (v if math.isfinite(v) else 0.0) for k, v in row["scores"].items()}
    return out


def create_app(model: MultiAdapterModel, config: ServeConfig | None = None) -> FastAPI:
    """Build the app serving ``model``. The batcher starts and stops with the app (ASGI lifespan)."""
    cfg = config or ServeConfig()
    batcher = DynamicBatcher(model, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
                             mixed=cfg.mixed, max_queue_rows=cfg.max_queue_rows)
    PredictRequest, PredictAllRequest, AddAdapterRequest, _ = request_models(cfg)
    # A language model also serves text generation (OpenAI's API), its requests sharing decoding batches.
    generation = (GenerationService(model, max_rows=cfg.max_batch_size, decoding=cfg.decoding,
                                    max_context=cfg.max_context) if _generates(model) else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        if generation is not None:
            generation.start()
        try:
            yield
        finally:
            if generation is not None:
                generation.stop()
            await batcher.stop()

    app = FastAPI(
        title="softprompt", version=__version__, lifespan=lifespan,
        description="Many prompt/prefix adapters on one frozen model; requests of all adapters share batches.",
    )
    app.state.model, app.state.batcher, app.state.config = model, batcher, cfg
    app.state.generation = generation
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes, timeout=cfg.body_timeout_s)

    # ---- errors: always JSON with a message; client mistakes are 4xx ----------------------------------------
    def error(status: int, exc: BaseException, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(status_code=status, content={"detail": _safe(exc)}, headers=headers)

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
        return error(503, exc, {"Retry-After": "1"})

    @app.exception_handler(ServeError)
    async def _refused(request: Request, exc: ServeError):
        return error(exc.status, exc, exc.headers or None)

    @app.exception_handler(SoftPromptError)
    async def _bad_adapter(request: Request, exc: SoftPromptError):
        return error(400, exc)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content={"detail": _safe(f"internal error: {type(exc).__name__}: {exc}")})

    # ---- prediction ----------------------------------------------------------------------------------------
    @app.post("/predict", response_model=PredictResponse, responses=responses(404, 408, 413, 503))
    async def predict(body: PredictRequest) -> dict:
        """Predict every input under one adapter. Rows join shared batches with other requests."""
        model.adapter(body.adapter)  # 404 before queueing
        texts, pairs = _split(body.inputs)
        rows = await batcher.submit([body.adapter] * len(texts), texts, pairs)
        return {"adapter": body.adapter, "predictions": [_clean(r) for r in rows]}

    @app.post("/predict_all", response_model=PredictAllResponse, responses=responses(408, 413, 503))
    async def predict_all(body: PredictAllRequest) -> dict:
        """Predict every input under every loaded adapter (one text, every task's answer)."""
        names = model.adapter_names
        texts, pairs = _split(body.inputs)
        k = len(texts)
        if k * len(names) > cfg.max_queue_rows:  # 503 "retry later" would be a lie: it can never fit
            raise TooLargeError(_never_fits(k, len(names), cfg.max_queue_rows))
        rows = await batcher.submit([n for n in names for _ in range(k)], texts * len(names), pairs * len(names))
        return {"predictions": {n: [_clean(r) for r in rows[j * k:(j + 1) * k]] for j, n in enumerate(names)}}

    # ---- adapters ------------------------------------------------------------------------------------------
    @app.get("/adapters", response_model=AdaptersResponse)
    async def list_adapters() -> dict:
        """The loaded adapters and what they predict."""
        return {"adapters": [model.adapter(n).describe() for n in model.adapter_names]}

    add_admin_routes(app, model, cfg, AddAdapterRequest)
    if generation is not None:
        add_openai_routes(app, model, generation, max_pending=cfg.max_queue_rows)

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


def _generates(model: MultiAdapterModel) -> bool:
    """Whether the served base model is a causal language model (then /v1 text generation is on)."""
    return model.info.is_causal and hasattr(model.base_model, "lm_head") and model.tokenizer is not None


def _never_fits(inputs: int, adapters: int, limit: int) -> str:
    """Why a predict_all request can never be queued, and how to split it."""
    rows = inputs * adapters
    head = (f"predict_all over {adapters} adapters x {inputs} inputs makes {rows} rows, more than this server ever "
            f"queues (--max-queue-rows {limit}), so it can never succeed: ")
    if limit >= adapters:
        return head + f"send at most {limit // adapters} inputs per request"
    return head + "call POST /predict per adapter instead"
