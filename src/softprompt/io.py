"""Adapter files: safetensors + JSON only, written atomically, validated on load. Loading never unpickles."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import __version__
from .errors import AdapterFormatError, AdapterMismatchError
from .peft_format import is_peft_config, read_peft_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
# The base-model fields an adapter must agree with.
SHAPE_FIELDS = ("model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved adapter gets the mode of any new file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The tensors that make up an adapter: ``method.*`` and ``head.<module>.*``."""
    out = {f"method.{k}": v for k, v in model.method.export_state_dict().items()}
    for name in model.head_names:
        out.update({f"head.{name}.{k}": v.detach() for k, v in getattr(model.base_model, name).state_dict().items()})
    return out


def save_adapter(model, path: str | os.PathLike, **metadata) -> None:
    """Save ``model`` (a SoftPromptModel) to folder ``path``. Extra keyword metadata goes into the config JSON."""
    path = Path(path)
    base_cfg = model.base_model.config
    config = {
        "library": "softprompt",
        "library_version": __version__,
        "format_version": FORMAT_VERSION,
        "method": model.method_config.method,
        "config": model.method_config.to_dict(),
        "base_model": {
            "name_or_path": getattr(base_cfg, "_name_or_path", "") or "",
            "architecture": type(model.base_model).__name__,
            **{k: getattr(model.info, k) for k in SHAPE_FIELDS},
        },
        "head_modules": list(model.head_names),
        "num_labels": getattr(base_cfg, "num_labels", None) if model.head_names else None,
        **metadata,
    }
    tensors = adapter_tensors(model)
    atomic_save_tensors(path / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    atomic_write_json(path / CONFIG_NAME, config)
    n = sum(v.numel() for v in tensors.values())
    card = (
        f"# softprompt adapter\n\n- method: `{config['method']}`\n"
        f"- base model: `{config['base_model']['name_or_path']}`"
        f" ({config['base_model']['architecture']})\n- tensors: {len(tensors)}, values: {n:,}\n\n"
        "Load with:\n\n```python\nimport softprompt as sp\nmodel = sp.load(base_model, PATH)\n```\n"
    )
    atomic_write_bytes(path / CARD_NAME, card.encode())


def _raw_config(path: str | os.PathLike) -> dict:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise AdapterFormatError(f"{file} is missing: {path} is not a softprompt adapter folder")
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deeply nested
        raise AdapterFormatError(f"{file} is not valid JSON ({str(exc)[:200]}); re-save the adapter") from exc


def read_adapter_config(path: str | os.PathLike) -> dict:
    """Read and check ``adapter_config.json`` with errors that name the file and the fix. A PEFT prompt-learning
    folder reads as the equivalent softprompt adapter (see ``peft_format``)."""
    file = Path(path) / CONFIG_NAME
    config = _raw_config(path)
    if is_peft_config(config):
        return read_peft_adapter(path, config, lambda: _load_tensors(path))[0]
    if not isinstance(config, dict) or "method" not in config or "config" not in config:
        raise AdapterFormatError(f"{file} lacks the 'method'/'config' fields of a softprompt adapter")
    expected = {"method": (str,), "config": (dict,), "base_model": (dict,), "head_modules": (list, type(None))}
    for key, types in expected.items():
        if key in config and not isinstance(config[key], types):
            raise AdapterFormatError(
                f"{file}: field {key!r} is {config[key]!r} ({type(config[key]).__name__}), expected "
                + " or ".join(t.__name__ for t in types) + "; re-save the adapter"
            )
    if not all(isinstance(h, str) for h in config.get("head_modules") or []):
        raise AdapterFormatError(f"{file}: field 'head_modules' must list module names, got {config['head_modules']!r}")
    version = config.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFormatError(
            f"{file} has format_version {version!r}, written by softprompt {config.get('library_version')}; this is "
            f"softprompt {__version__} (format {FORMAT_VERSION}). Upgrade softprompt to load it."
        )
    return config


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the safetensors file (never a pickle), mapping corruption to AdapterFormatError; a PEFT folder's
    tensors come back under softprompt's names and layout."""
    config = _raw_config(path) if (Path(path) / CONFIG_NAME).is_file() else {}
    if is_peft_config(config):
        return read_peft_adapter(path, config, lambda: _load_tensors(path))[1]
    return _load_tensors(path)


def _load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise AdapterFormatError(f"{file} is missing; the adapter folder is incomplete (re-save or re-train it)")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{file} is corrupt or truncated ({exc}); re-save or re-train the adapter") from exc


def check_base_model(config: dict, info, path) -> None:
    """Raise AdapterMismatchError naming both values when the adapter was made for another base model."""
    saved = config.get("base_model", {})
    diffs = [
        f"{k}: adapter {saved[k]!r} vs model {getattr(info, k)!r}"
        for k in SHAPE_FIELDS
        if k in saved and saved[k] != getattr(info, k)
    ]
    if diffs:
        raise AdapterMismatchError(
            f"adapter {path} was saved for base model {saved.get('name_or_path')!r} "
            f"({saved.get('architecture')}), which differs from this model: " + "; ".join(diffs)
            + ". Load it onto the base model it was trained with."
        )


def split_adapter_tensors(tensors: dict[str, torch.Tensor], head_names, path, method_state: dict
                          ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Split an adapter file's tensors into the method's (checked against ``method_state``, the names and shapes
    this config expects) and each task head's (``head.<name>.*``; their shapes are the head's to check)."""
    method = {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")}
    check_shapes(method_state, method, path, "method")
    heads = {}
    for name in head_names:
        prefix = f"head.{name}."
        heads[name] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return method, heads


def check_shapes(expected: dict, found: dict, path, what: str) -> None:
    """Raise AdapterFormatError unless ``found`` has the names, shapes and a float dtype of ``expected``."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    # Projection-MLP adapters may be loaded in folded form (tables only): the module decides.
    if missing and not all(k.startswith("mlp_state.") for k in missing):
        raise AdapterFormatError(f"{path}: {what} tensors missing from {WEIGHTS_NAME}: {missing[:5]}")
    if extra and not all(k.startswith("mlp_state.") for k in extra):
        raise AdapterFormatError(f"{path}: unexpected {what} tensors in {WEIGHTS_NAME}: {extra[:5]}")
    for k in set(expected) & set(found):
        e, f = expected[k], found[k]
        if tuple(e.shape) != tuple(f.shape):
            raise AdapterFormatError(
                f"{path}: tensor {k} has shape {tuple(f.shape)}, expected {tuple(e.shape)} for this config"
            )
        if not f.is_floating_point() and e.is_floating_point():
            raise AdapterFormatError(f"{path}: tensor {k} has dtype {f.dtype}, expected a floating-point tensor")
        if not torch.isfinite(f).all() if f.is_floating_point() else False:
            raise AdapterFormatError(f"{path}: tensor {k} contains NaN or inf values")
