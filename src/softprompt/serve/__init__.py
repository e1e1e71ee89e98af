"""HTTP serving of many adapters on one frozen model (``softprompt serve``).

Importing this package is light (the main CLI imports ``softprompt.serve.cli`` to list the command): the batcher,
torch and FastAPI load only when something is used. Install the web stack with ``pip install 'softprompt[serve]'``.

    from softprompt.multi import MultiAdapterModel
    from softprompt.serve import ServeConfig, create_app

    app = create_app(MultiAdapterModel("minilm", {"sentiment": "runs/sst2"}), ServeConfig(max_batch_size=64))
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ServeConfig": ".config", "DynamicBatcher": ".batcher", "BatcherStats": ".batcher",
    "OverloadedError": ".batcher", "create_app": ".app",
}

# A literal list so that static tools can read it; keep it equal to sorted(_EXPORTS).
__all__ = [
    "BatcherStats", "DynamicBatcher", "OverloadedError", "ServeConfig", "create_app",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'softprompt.serve' has no attribute {name!r}")
