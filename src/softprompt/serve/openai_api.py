"""OpenAI-compatible text generation: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``.

The request's ``model`` names an adapter (vLLM's convention for LoRA) or the base model. Requests of every adapter
share decoding batches (:class:`~softprompt.serve.generation.GenerationService`). Errors use OpenAI's error JSON,
``{"error": {"message", "type", "param", "code"}}``, with a 4xx for every client mistake.
"""

# No ``from __future__ import annotations``: FastAPI reads route signatures at run time.
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import SoftPromptError
from ..multi import UnknownAdapterError
from ..multi.generation import SamplingParams
from .generation import GenerationService

MAX_STOPS = 4


class OpenAIError(Exception):
    """A client error reported in OpenAI's format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(status_code=self.status, content=body, headers=headers)


def _field(body: dict, name: str, types: tuple, default: Any = None, *, required: bool = False) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise OpenAIError(400, f"'{name}' is required", name, "missing_required_parameter")
        return default
    value = body[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise OpenAIError(400, f"'{name}' must be {names}, got {type(value).__name__}", name, "invalid_type")
    return value


def sampling_params(body: dict, context: int | None) -> SamplingParams:
    """Read OpenAI's sampling fields, with their defaults (temperature 1, top_p 1, max_tokens 16)."""
    max_tokens = _field(body, "max_tokens", (int,), None)
    if max_tokens is None:
        max_tokens = _field(body, "max_completion_tokens", (int,), 16)
    temperature = float(_field(body, "temperature", (int, float), 1.0))
    top_p = float(_field(body, "top_p", (int, float), 1.0))
    seed = _field(body, "seed", (int,), None)
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise OpenAIError(400, f"'stop' takes at most {MAX_STOPS} non-empty strings", "stop")
    if _field(body, "n", (int,), 1) != 1:
        raise OpenAIError(400, "only n=1 is supported: send one request per completion", "n")
    if body.get("logprobs") not in (None, False) or body.get("best_of") not in (None, 1):
        raise OpenAIError(400, "logprobs and best_of are not supported", "logprobs")
    if max_tokens < 1:
        raise OpenAIError(400, f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")
    if not 0 <= temperature <= 2:
        raise OpenAIError(400, f"'temperature' must be between 0 and 2, got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise OpenAIError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)


def add_openai_routes(app: FastAPI, model, service: GenerationService, *, max_pending: int) -> None:
    """Register the /v1 routes for ``model`` (a MultiAdapterModel on a causal LM)."""
    base_name = model.model_name or str(getattr(model.base_model.config, "_name_or_path", "") or "base")
    tokenizer = model.tokenizer

    def adapter_for(name: str) -> str | None:
        if name == base_name:
            return None
        try:
            model.adapter(name)
        except UnknownAdapterError:
            known = [base_name, *model.adapter_names]
            raise OpenAIError(404, f"The model '{name}' does not exist; served models: {known}", "model",
                              "model_not_found") from None
        return name

    async def read(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise OpenAIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        return body

    def check(ids: list[int], adapter: str | None, params: SamplingParams) -> None:
        if service.outstanding >= max_pending:
            raise OpenAIError(503, f"{service.outstanding} generation requests are running or queued (limit "
                              f"{max_pending}); retry later", code="overloaded", kind="server_error")
        try:
            service.check(ids, adapter, params)
        except SoftPromptError as exc:
            # The engine's one-line errors name the field they refuse (a seed out of range: GenerationEngine.check).
            param = next((p for p in ("max_tokens", "seed") if p in str(exc)), None)
            raise OpenAIError(400, str(exc), param) from None

    async def run(request: Request, chat: bool):
        try:
            body = await read(request)
            name = _field(body, "model", (str,), required=True)
            adapter = adapter_for(name)
            params = sampling_params(body, model.info.max_positions)
            ids = _chat_ids(body, tokenizer) if chat else _prompt_ids(body, tokenizer)
            check(ids, adapter, params)
            stream = bool(_field(body, "stream", (bool,), False))
            usage_in_stream = bool((_field(body, "stream_options", (dict,), {}) or {}).get("include_usage"))
        except OpenAIError as exc:
            return exc.response()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if stream:
            chunks = _stream(service, ids, adapter, params, rid, created, name, chat, usage_in_stream)
            return StreamingResponse(chunks, media_type="text/event-stream")
        done = await service.complete(ids, adapter, params)
        if done.finish_reason == "abort":
            return OpenAIError(503, "generation was interrupted on the server; retry", code="aborted",
                               kind="server_error").response()
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                      "finish_reason": done.finish_reason, "logprobs": None}
            return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                    "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}
        return {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [choice],
                "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: Request):
        """Complete a prompt under the adapter named by ``model``."""
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        """Answer a conversation (the tokenizer's chat template) under the adapter named by ``model``."""
        return await run(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        """The base model and every adapter, each usable as ``model``."""
        created = int(time.time())
        data = [{"id": base_name, "object": "model", "created": created, "owned_by": "softprompt", "root": base_name,
                 "parent": None}]
        for n in model.adapter_names:
            data.append({"id": n, "object": "model", "created": created, "owned_by": "softprompt",
                         "root": base_name, "parent": base_name, "method": model.adapter(n).method_name})
        return {"object": "list", "data": data}


def _prompt_ids(body: dict, tokenizer) -> list[int]:
    prompt = _field(body, "prompt", (str, list), required=True)
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        else:
            raise OpenAIError(400, "'prompt' must be a string, a list of one string, or a list of token ids "
                              "(batches of prompts: send one request each)", "prompt")
    if not prompt:
        raise OpenAIError(400, "'prompt' is empty", "prompt")
    return tokenizer(prompt)["input_ids"]


def _chat_ids(body: dict, tokenizer) -> list[int]:
    messages = _field(body, "messages", (list,), required=True)
    if not messages:
        raise OpenAIError(400, "'messages' is empty", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise OpenAIError(400, f"messages[{i}] needs a role of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise OpenAIError(400, f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise OpenAIError(400, f"messages[{i}].content must be a string", "messages")
        clean.append({"role": m["role"], "content": content})
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
    ids = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5


async def _stream(service, ids, adapter, params, rid, created, name, chat, usage_in_stream):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta_text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": delta_text} if delta_text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": name,
                                      "choices": [choice]}) + "\n\n"

    if chat:
        yield chunk(None, None, role=True)
    tokens = 0
    async for delta, finish, count in service.stream(ids, adapter, params):
        tokens = count
        if finish == "abort":
            error = {"message": "generation was interrupted on the server; retry", "type": "server_error"}
            yield "data: " + json.dumps({"error": error}) + "\n\n"
            break
        if delta or finish:
            yield chunk(delta, finish)
    if usage_in_stream:
        usage = {"prompt_tokens": len(ids), "completion_tokens": tokens, "total_tokens": len(ids) + tokens}
        yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": name, "choices": [],
                                     "usage": usage}) + "\n\n"
    yield "data: [DONE]\n\n"
