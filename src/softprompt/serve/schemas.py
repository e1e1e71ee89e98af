"""Request and response bodies of the HTTP service (pydantic models; they make the OpenAPI schema)."""

# No ``from __future__ import annotations``: pydantic and FastAPI read these annotations at run time, and the
# request models are built per app (their limits come from the config).
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .config import ServeConfig

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


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


ERRORS = {
    400: {"model": ErrorResponse, "description": "the adapter folder cannot be used"},
    401: {"model": ErrorResponse, "description": "missing or wrong admin token (Authorization: Bearer TOKEN)"},
    403: {"model": ErrorResponse, "description": "admin endpoints off, or a path outside the adapter root"},
    404: {"model": ErrorResponse, "description": "unknown adapter"},
    408: {"model": ErrorResponse, "description": "request body not received in time"},
    409: {"model": ErrorResponse, "description": "an adapter of that name is loaded, or the adapter limit is reached"},
    413: {"model": ErrorResponse, "description": "request body, request or adapter larger than this server's limits"},
    503: {"model": ErrorResponse, "description": "queue full, retry later"},
}


def responses(*codes: int) -> dict:
    """The OpenAPI ``responses`` entry for these error statuses."""
    return {c: ERRORS[c] for c in codes}


def request_models(cfg: ServeConfig):
    """Request bodies with this server's limits built in (they show up in /openapi.json): PredictRequest,
    PredictAllRequest, AddAdapterRequest, TextPair."""
    # pydantic rejects strings with lone surrogates ("\ud800" is valid JSON but no tokenizer takes it): a 422.
    Text = Annotated[str, StringConstraints(min_length=1, max_length=cfg.max_text_chars)]

    class TextPair(BaseModel):
        """A text with an optional second segment (sentence-pair tasks such as paraphrase or entailment)."""

        model_config = ConfigDict(extra="forbid")
        text: Text
        text_pair: Text | None = None

    Inputs = Annotated[
        list[Text | TextPair],
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
