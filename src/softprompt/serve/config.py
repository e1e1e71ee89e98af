"""Settings of the serving endpoint (limits, batching, admin endpoints)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """Everything ``softprompt serve`` can be told (CLI flags map 1:1 onto these fields).

    max_batch_size: most rows (one text under one adapter) in one model call; requests are split across calls.
    max_wait_ms: how long the first queued row waits for company before its batch runs. Rows that arrive while the
        model is busy are batched anyway, so under load batches fill up without waiting at all.
    mixed: True groups rows of all adapters into shared batches; False runs one adapter at a time (PEFT's only
        option for prompt methods), kept for comparison (``benchmarks/serve_bench.py``).
    max_inputs: most texts per request. max_text_chars: longest text, in characters (tokens are truncated to each
        adapter's ``max_length`` anyway; this bounds tokenizer work and memory per request).
    max_body_bytes: largest request body; larger ones get 413 before anything is parsed.
    max_queue_rows: rows waiting at most; beyond it requests get 503 (back-pressure instead of unbounded memory).
    allow_admin: serve ``POST /adapters`` and ``DELETE /adapters/{name}`` (runtime add/remove).
    adapter_root: if set, ``POST /adapters`` loads only folders inside it (paths are resolved first).
    """

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    mixed: bool = True
    max_inputs: int = 64
    max_text_chars: int = 2000
    max_body_bytes: int = 1_000_000
    max_queue_rows: int = 4096
    allow_admin: bool = True
    adapter_root: str | None = None

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        for name in ("max_batch_size", "max_inputs", "max_text_chars", "max_body_bytes", "max_queue_rows"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
