"""HTTP serving of many adapters on one frozen model (``softprompt serve``).

Importing this package stays light: FastAPI and uvicorn are imported only when an app is built or served, so the
main CLI can list ``softprompt serve`` without them installed. Install with ``pip install 'softprompt[serve]'``.

    from softprompt.multi import MultiAdapterModel
    from softprompt.serve import ServeConfig, create_app

    app = create_app(MultiAdapterModel("minilm", {"sentiment": "runs/sst2"}), ServeConfig(max_batch_size=64))
"""

from __future__ import annotations

from .batcher import BatcherStats, DynamicBatcher, OverloadedError
from .config import ServeConfig

__all__ = ["ServeConfig", "DynamicBatcher", "BatcherStats", "OverloadedError", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # needs FastAPI: import on first use
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'softprompt.serve' has no attribute {name!r}")
