"""``softprompt serve``: many adapters on one frozen model behind an HTTP JSON API (FastAPI + uvicorn).

    softprompt serve --model minilm --adapter sentiment=runs/sst2 --adapter paraphrase=runs/mrpc --port 8000

Adapter management (POST /adapters, DELETE /adapters/NAME) is off unless enabled:

    SOFTPROMPT_ADMIN_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') softprompt serve ...
    softprompt serve --allow-admin-without-auth ...        # loopback --host only

Once listening, the server prints one line `softprompt serve: listening on http://HOST:PORT` (with --port 0 the
port is the one the system chose). FastAPI and uvicorn are imported only when the command runs, so the rest of the
CLI works without them.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConfigError, SoftPromptError
from .config import ADMIN_TOKEN_ENV

DTYPES = ("float32", "bfloat16", "float16")


def parse_adapter_specs(specs: list[str] | None) -> dict[str, str]:
    """``["name=DIR", ...]`` -> {name: DIR}, with clear errors for malformed or repeated names."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--adapter takes NAME=DIR, got {spec!r}")
        if name in out:
            raise ConfigError(f"adapter name {name!r} given twice: give each --adapter its own NAME")
        out[name] = path
    return out


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (the system picks one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {port}")
    return port


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _number(text: str, low: float, inclusive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    ok = value >= low if inclusive else value > low
    if not (ok and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if inclusive else '>'} {low:g}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, 0.0, inclusive=False)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(text, 0.0, inclusive=True)


def add_serve_parser(sub) -> None:
    """Register ``softprompt serve`` (called by the main CLI)."""
    p = sub.add_parser("serve", help="serve adapters over HTTP; requests of all adapters share batches",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="base model: alias (minilm, smollm2) or a transformers path")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="adapter folder to serve under NAME (repeatable; more can be added at run time)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--max-batch-size", type=positive_int, default=32, help="most rows (text x adapter) per model call")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=5.0, help="how long a lone row waits for company")
    p.add_argument("--max-inputs", type=positive_int, default=64, help="most texts per request")
    p.add_argument("--max-text-chars", type=positive_int, default=2000, help="longest text per input, in characters")
    p.add_argument("--max-body-bytes", type=positive_int, default=1_000_000, help="largest request body (else 413)")
    p.add_argument("--body-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                   help="the whole request body must arrive within this time (else 408)")
    p.add_argument("--max-queue-rows", type=positive_int, default=4096, help="rows waiting at most before 503")
    p.add_argument("--no-mixed", action="store_true",
                   help="run one adapter per model call (what PEFT must do for prompt methods; for comparison)")
    admin = p.add_argument_group("adapter management (POST /adapters, DELETE /adapters/NAME; off by default)")
    admin.add_argument("--admin-token", metavar="TOKEN",
                       help=f"enable them for requests with 'Authorization: Bearer TOKEN' (at least 16 characters); "
                            f"prefer the {ADMIN_TOKEN_ENV} environment variable, which `ps` does not show")
    admin.add_argument("--allow-admin-without-auth", action="store_true",
                       help="enable them without a token; only with a loopback --host (127.0.0.1, ::1, localhost)")
    admin.add_argument("--no-admin", action="store_true", help="keep them off (the default; kept for old scripts)")
    admin.add_argument("--adapter-root", action="append", metavar="DIR",
                       help="POST /adapters loads folders under DIR only, relative paths taken from DIR (repeatable; "
                            "default: the parent folders of the --adapter folders, or none)")
    admin.add_argument("--max-adapters", type=positive_int, default=64, help="most adapters loaded at once")
    admin.add_argument("--max-adapter-bytes", type=positive_int, default=256 * 2**20,
                       help="largest adapter loaded at run time (its tensors, and the modules its config builds)")
    admin.add_argument("--max-virtual-tokens", type=positive_int, default=1024,
                       help="longest prompt/prefix of an adapter loaded at run time (the model's limit applies too)")
    gen = p.add_argument_group("text generation (/v1, causal language models)")
    gen.add_argument("--decoding", choices=("auto", "dynamic", "static", "cuda_graphs"), default="auto",
                     help="decoding batch: a growing KV cache, fixed buffers, or fixed buffers replayed as CUDA graphs "
                          "(fastest for small models on a GPU); auto: CUDA graphs on a GPU where they apply and fit "
                          "half the free memory, else dynamic (printed at start)")
    gen.add_argument("--max-context", type=positive_int, default=2048,
                     help="columns per row of the fixed buffers: prompt + adapter positions + max_tokens must fit")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--task-kind", help="head class of the base when no adapter is given (default classification)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)

    def one_line_error(message: str):
        # argparse would print the whole usage block (20 lines) above the message; one line is easier to read.
        p.exit(2, f"{p.prog}: error: {message} (see {p.prog} --help)\n")

    p.error = one_line_error


def serve_config(args):
    """The :class:`ServeConfig` of parsed arguments (raises ConfigError for contradictory or unsafe settings)."""
    from ..errors import ConfigError
    from .config import ServeConfig

    token = args.admin_token if args.admin_token is not None else (os.environ.get(ADMIN_TOKEN_ENV) or None)
    if args.no_admin and (args.admin_token is not None or args.allow_admin_without_auth):
        raise ConfigError("--no-admin contradicts --admin-token / --allow-admin-without-auth; give one or the other")
    if args.no_admin:
        token = None
    return ServeConfig(
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, mixed=not args.no_mixed,
        max_inputs=args.max_inputs, max_text_chars=args.max_text_chars, max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout, max_queue_rows=args.max_queue_rows, admin_token=token,
        allow_admin_without_auth=args.allow_admin_without_auth,
        adapter_roots=tuple(args.adapter_root) if args.adapter_root else None, max_adapters=args.max_adapters,
        max_adapter_bytes=args.max_adapter_bytes, max_virtual_tokens=args.max_virtual_tokens,
        decoding=args.decoding, max_context=args.max_context,
    )


def build_app(args, config=None):
    """The FastAPI app for parsed ``softprompt serve`` arguments (no server started)."""
    import torch

    from ..errors import ConfigError
    from ..multi import MultiAdapterModel
    from .app import create_app
    from .limits import safetensors_bytes

    config = config or serve_config(args)
    adapters = parse_adapter_specs(args.adapter)
    if len(adapters) > config.max_adapters:
        raise ConfigError(f"{len(adapters)} adapters given, more than --max-adapters {config.max_adapters}")
    for name, folder in adapters.items():
        # The same byte cap as adapters added at run time, read from the safetensors header before any tensor
        # exists (virtual-token counts are bounded by the model when each method is built).
        file = os.path.join(folder, "adapter_model.safetensors")
        if os.path.isfile(file) and safetensors_bytes(file) > config.max_adapter_bytes:
            raise ConfigError(f"adapter {name!r} ({folder}) holds {safetensors_bytes(file):,} bytes of tensors, "
                              f"over --max-adapter-bytes {config.max_adapter_bytes:,}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = MultiAdapterModel(args.model, adapters, dtype=getattr(torch, args.dtype), device=device,
                              task_kind=args.task_kind)
    return create_app(model, config)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, printing the address it bound (the real port when asked for port 0)."""

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            for server in getattr(self, "servers", []):
                for sock in server.sockets or []:
                    host, port = sock.getsockname()[:2]
                    host = f"[{host}]" if ":" in host else host
                    print(f"softprompt serve: listening on http://{host}:{port}", flush=True)

    return Server


def cmd_serve(args) -> int:
    """Run the server until interrupted. Startup problems raise ``SoftPromptError``s, which ``softprompt``'s main
    prints as one line (exit 2 for a configuration error, 1 otherwise) before anything listens."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as exc:
        raise SoftPromptError(f"serving needs {exc.name}: pip install 'softprompt[serve]' (fastapi, uvicorn)") from None
    from .security import startup_warnings

    config = serve_config(args)
    warnings = startup_warnings(config, args.host)  # before the model loads: an unsafe setup fails at once
    app = build_app(args, config)
    for line in warnings:
        print(f"softprompt serve: {line}", file=sys.stderr, flush=True)
    if app.state.generation is not None:
        reason = app.state.generation.engine.decoding_reason
        print(f"softprompt serve: text generation decodes with {reason}", file=sys.stderr, flush=True)
    if config.admin_enabled:
        roots = ", ".join(app.state.adapter_roots) or "none (no folder is loadable)"
        auth = "bearer token" if config.admin_token else "no authentication (loopback only)"
        print(f"softprompt serve: admin endpoints on ({auth}); adapter roots: {roots}", file=sys.stderr, flush=True)
    server = _server_class()(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    server.run()
    return 0
