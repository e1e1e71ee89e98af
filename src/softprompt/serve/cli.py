"""``softprompt serve``: many adapters on one frozen model behind an HTTP JSON API (FastAPI + uvicorn).

    softprompt serve --model minilm --adapter sentiment=runs/sst2 --adapter paraphrase=runs/mrpc --port 8000

FastAPI and uvicorn are imported only when the command runs, so the rest of the CLI works without them.
"""

from __future__ import annotations

import argparse

DTYPES = ("float32", "bfloat16", "float16")


def parse_adapter_specs(specs: list[str] | None) -> dict[str, str]:
    """``["name=DIR", ...]`` -> {name: DIR}, with clear errors for malformed or repeated names."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise SystemExit(f"softprompt serve: --adapter takes NAME=DIR, got {spec!r}")
        if name in out:
            raise SystemExit(f"softprompt serve: adapter name {name!r} given twice")
        out[name] = path
    return out


def add_serve_parser(sub) -> None:
    """Register ``softprompt serve`` (called by the main CLI)."""
    p = sub.add_parser("serve", help="serve adapters over HTTP; requests of all adapters share batches",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="base model: alias (minilm, smollm2) or a transformers path")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="adapter folder to serve under NAME (repeatable; more can be added at run time)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all; mind --no-admin)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="most rows (text x adapter) per model call")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a lone row waits for company")
    p.add_argument("--max-inputs", type=int, default=64, help="most texts per request")
    p.add_argument("--max-text-chars", type=int, default=2000, help="longest text per input, in characters")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body")
    p.add_argument("--max-queue-rows", type=int, default=4096, help="rows waiting at most before 503")
    p.add_argument("--no-mixed", action="store_true",
                   help="run one adapter per model call (what PEFT must do for prompt methods; for comparison)")
    p.add_argument("--no-admin", action="store_true", help="disable POST/DELETE /adapters")
    p.add_argument("--adapter-root", help="POST /adapters may load folders inside this folder only")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--task-kind", help="head class of the base when no adapter is given (default classification)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def build_app(args):
    """The FastAPI app for parsed ``softprompt serve`` arguments (no server started)."""
    import torch

    from ..multi import MultiAdapterModel
    from .app import create_app
    from .config import ServeConfig

    adapters = parse_adapter_specs(args.adapter)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = MultiAdapterModel(args.model, adapters, dtype=getattr(torch, args.dtype), device=device,
                              task_kind=args.task_kind)
    config = ServeConfig(
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, mixed=not args.no_mixed,
        max_inputs=args.max_inputs, max_text_chars=args.max_text_chars, max_body_bytes=args.max_body_bytes,
        max_queue_rows=args.max_queue_rows, allow_admin=not args.no_admin, adapter_root=args.adapter_root,
    )
    return create_app(model, config)


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as exc:
        raise SystemExit(f"softprompt serve needs {exc.name}: pip install 'softprompt[serve]' "
                         "(fastapi, uvicorn)") from None
    app = build_app(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
