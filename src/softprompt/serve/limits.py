"""Size checks of an adapter folder before anything is loaded: ``POST /adapters`` must not let a hostile or mistaken
adapter grow the server's memory.

Three numbers are checked, each without allocating a tensor:

* the prompt/prefix lengths in ``adapter_config.json`` (``num_virtual_tokens``, ``layer_lengths``) against the
  model's position limit and ``max_virtual_tokens``;
* the bytes of the modules the config would build, measured by building them on PyTorch's ``meta`` device (shapes
  only, no storage), so every option that sizes a module (MLP widths, bottlenecks, ...) is covered by one rule;
* the bytes of the tensors in ``adapter_model.safetensors``, summed from the file's header (8-byte little-endian
  length + JSON), which is read on its own.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from ..errors import SoftPromptError
from .errors import BadAdapterPathError, TooLargeError

MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json files are a few kB; do not read a huge one into memory
MAX_HEADER_BYTES = 8 << 20  # a safetensors header lists names, dtypes and shapes: small for a few hundred tensors
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def safetensors_bytes(file: str) -> int:
    """Total bytes of the tensors a safetensors file declares, from its header alone (raises BadAdapterPathError
    for a header that is malformed or does not match the file's size)."""
    name = os.path.basename(file)
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadAdapterPathError(f"{name} is truncated (no header); re-save the adapter")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise BadAdapterPathError(f"{name} declares a header of {n} bytes in a file of {size}; re-save the adapter")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise BadAdapterPathError(f"{name} has a corrupt header ({str(exc)[:100]}); re-save the adapter") from None
    if not isinstance(header, dict):
        raise BadAdapterPathError(f"{name} has a corrupt header (not a JSON object); re-save the adapter")
    total, end = 0, 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            shape, (lo, hi) = [int(d) for d in entry["shape"]], entry["data_offsets"]
            nbytes = math.prod(shape) * DTYPE_BYTES[entry["dtype"]]
            ok = min(shape, default=0) >= 0 and 0 <= int(lo) <= int(hi) and int(hi) - int(lo) == nbytes
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise BadAdapterPathError(f"{name}: tensor {str(key)[:80]!r} has a corrupt header entry; re-save it")
        total += nbytes
        end = max(end, int(hi))
    if 8 + n + end > size:
        raise BadAdapterPathError(f"{name} is truncated ({size} bytes, the header needs {8 + n + end}); re-save it")
    return total


def _lengths(options: dict[str, Any]) -> list[tuple[str, int]]:
    """The virtual-token counts a method config asks for (field name, value)."""
    out = []
    if isinstance(options.get("num_virtual_tokens"), int):
        out.append(("num_virtual_tokens", options["num_virtual_tokens"]))
    for n in options.get("layer_lengths") or []:
        if isinstance(n, int):
            out.append(("layer_lengths", n))
    return out


def module_bytes(method: str, options: dict, info) -> int:
    """Bytes of the parameters and buffers the method's modules would hold, built on the ``meta`` device (shapes
    only: nothing is allocated, whatever the sizes)."""
    import torch

    from ..methods import config_from_dict, method_classes

    config = config_from_dict(method, dict(options))
    if hasattr(config, "validate"):
        config.validate(info)  # model-dependent checks: layer indices, one length per layer
    _, module_cls = method_classes(config.method)
    # The device context is thread-local (a torch function mode), so the model thread's forwards are unaffected.
    with torch.device("meta"):
        module = module_cls(config, info)
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _read_config(folder: str) -> dict:
    """The adapter's config as softprompt reads it, without loading tensors (a PEFT config is converted alone)."""
    from ..io import read_adapter_config

    try:
        from ..peft_format import convert_config, is_peft_config
    except ImportError:  # a softprompt without PEFT folder support: read_adapter_config refuses them anyway
        return read_adapter_config(folder)
    file = os.path.join(folder, "adapter_config.json")
    try:
        with open(file, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except (ValueError, RecursionError):
        raw = None  # read_adapter_config raises the usual error with the file name
    if is_peft_config(raw):
        return convert_config(raw, Path(file))
    return read_adapter_config(folder)


def check_adapter_size(folder: str, info, *, max_virtual_tokens: int, max_bytes: int) -> None:
    """Refuse an adapter folder whose config or weights exceed the limits, before any tensor exists.

    ``info``: the model's :class:`ModelInfo` (its position limit bounds the virtual tokens). Raises TooLargeError
    (413) for a size over a limit, BadAdapterPathError (400) for files that cannot be read or sized.
    """
    config_file = os.path.join(folder, "adapter_config.json")
    if os.path.getsize(config_file) > MAX_CONFIG_BYTES:
        raise TooLargeError(f"adapter_config.json is over {MAX_CONFIG_BYTES} bytes; a real one is a few kB")
    # The header first: reading a PEFT folder's config reads its tensors too, and they must be known to be small.
    stored = safetensors_bytes(os.path.join(folder, "adapter_model.safetensors"))
    if stored > max_bytes:
        raise TooLargeError(f"adapter_model.safetensors holds {_mib(stored)} of tensors, over this server's limit "
                            f"of {_mib(max_bytes)} (--max-adapter-bytes)")
    meta = _read_config(folder)  # AdapterFormatError (400) for invalid JSON or fields
    method, options = meta["method"], meta["config"]
    positions = getattr(info, "max_positions", None)
    limit = min(max_virtual_tokens, positions) if positions else max_virtual_tokens
    for field, value in _lengths(options):
        if value > limit:
            which = "--max-virtual-tokens" if limit == max_virtual_tokens else "the model's position limit"
            raise TooLargeError(f"adapter config {field} = {value} is over {limit} ({which}); this adapter cannot "
                                "be loaded on this server")
    try:
        needed = module_bytes(method, options, info)
    except SoftPromptError:
        raise
    except Exception as exc:  # an option of the wrong type that a constructor used: a 400, not a 500
        raise BadAdapterPathError(f"adapter config {method!r} {json.dumps(options)[:200]} cannot be built: "
                                  f"{type(exc).__name__}: {exc}") from None
    if needed > max_bytes:
        raise TooLargeError(f"adapter config ({method}) would build modules of {_mib(needed)}, over this server's "
                            f"limit of {_mib(max_bytes)} (--max-adapter-bytes)")
