"""Settings of the serving endpoint (limits, batching, admin endpoints)."""

from __future__ import annotations

from dataclasses import dataclass, field

# The environment variable the CLI reads the admin token from (a flag value shows in `ps` and shell history).
ADMIN_TOKEN_ENV = "SOFTPROMPT_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16


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
    body_timeout_s: the whole request body must arrive within this many seconds of the request head (else 408), so
        a client that trickles its body cannot hold a connection and its buffer open.
    max_queue_rows: rows waiting at most; beyond it requests get 503 (back-pressure instead of unbounded memory). A
        request that alone makes more rows gets 413: it could never be queued.
    admin_token: bearer token that enables ``POST /adapters`` and ``DELETE /adapters/{name}`` (compared in constant
        time). allow_admin_without_auth: enable them without a token (the CLI allows it on a loopback host only).
        With neither, both endpoints answer 403.
    adapter_roots: folders ``POST /adapters`` may load from (a relative path is resolved against them; symlinks that
        leave them are refused). None: the parent folders of the adapters the model holds when the app is created;
        an empty tuple: no folder is loadable.
    max_adapters: most adapters loaded at once (``POST /adapters`` beyond it gets 409).
    max_adapter_bytes: largest adapter, both the tensors in its safetensors file (read from the header) and the
        modules its ``adapter_config.json`` would build (sized without allocating); checked before loading.
    max_virtual_tokens: most virtual tokens (prompt or prefix length) of an adapter loaded at run time; the model's
        position limit applies too.
    decoding: text generation's decoding batch (``multi.generation.GenerationEngine``): "auto" (the default: CUDA
        graphs on a GPU where they apply and their buffers take at most half the free memory, else "dynamic"; the
        server prints its choice), "dynamic" (a KV cache that grows step by step), "static" (fixed buffers of
        ``max_context`` columns per row) or "cuda_graphs" (the same buffers, each decoding step replayed as a CUDA
        graph: several times faster for small models, whose eager steps wait on the host). With fixed buffers, a
        request's prompt, adapter positions and max_tokens must fit ``max_context`` (else 400).
    """

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    mixed: bool = True
    max_inputs: int = 64
    max_text_chars: int = 2000
    max_body_bytes: int = 1_000_000
    body_timeout_s: float = 10.0
    max_queue_rows: int = 4096
    admin_token: str | None = field(default=None, repr=False)  # repr=False: a logged config must not leak it
    allow_admin_without_auth: bool = False
    adapter_roots: tuple[str, ...] | None = None
    max_adapters: int = 64
    max_adapter_bytes: int = 256 * 2**20
    max_virtual_tokens: int = 1024
    decoding: str = "auto"
    max_context: int = 2048

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        for name in ("max_batch_size", "max_inputs", "max_text_chars", "max_body_bytes", "max_queue_rows",
                     "max_adapters", "max_adapter_bytes", "max_virtual_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decoding not in ("auto", "dynamic", "static", "cuda_graphs"):
            raise ConfigError(f"decoding must be 'auto', 'dynamic', 'static' or 'cuda_graphs', got {self.decoding!r}")
        if int(self.max_context) < 1:
            raise ConfigError(f"max_context must be >= 1, got {self.max_context}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if not self.body_timeout_s > 0:
            raise ConfigError(f"body_timeout_s must be > 0, got {self.body_timeout_s}")
        if self.admin_token is not None:
            token = self.admin_token
            # Visible ASCII only: it travels in an HTTP header, where other characters do not survive intact.
            if len(token) < MIN_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
                raise ConfigError(
                    f"the admin token must be at least {MIN_TOKEN_CHARS} visible ASCII characters (no spaces); "
                    "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        if isinstance(self.adapter_roots, str):  # one folder given as a plain string
            self.adapter_roots = (self.adapter_roots,)
        elif self.adapter_roots is not None:
            self.adapter_roots = tuple(str(r) for r in self.adapter_roots)

    @property
    def admin_enabled(self) -> bool:
        """Whether ``POST /adapters`` and ``DELETE /adapters/{name}`` do anything (else they answer 403)."""
        return self.admin_token is not None or self.allow_admin_without_auth
