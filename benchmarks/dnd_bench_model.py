"""The model side of ``benchmarks/dnd_bench.py`` (split out of it, unchanged): the ``convert`` subcommand's GGUF ->
HF conversion, the ``Evaluator`` that scores the base model with LoRA deltas merged into its weights, and the
generator's condition texts (a record's instruction, optionally with its gold answer)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path


# ----------------------------------------------------------------------------------------------- GGUF conversion
def convert(gguf: Path, out: Path) -> Path:
    """GGUF -> HF folder (fp32, dequantised), as ``softprompt.resources.ensure_smollm2`` but from ``gguf``.
    Idempotent; written next to ``out`` and renamed, so an interrupted conversion leaves no half folder."""
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        print(f"{out} exists; nothing to do")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    ids = tok("The capital of Italy is", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        gen = lm.generate(**ids, max_new_tokens=3, do_sample=False)
    print(f"converted {gguf} -> {out} in {time.time() - t0:.1f} s; first token id {int(ids['input_ids'][0, 0])}; "
          f"'The capital of Italy is' -> {tok.decode(gen[0, ids['input_ids'].shape[1]:])!r}")
    return out


# ----------------------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """The base model, with LoRA deltas merged into its weights on demand (scale·B·A added to a kept copy of each
    touched weight and removed again), so every adapter is scored at the plain model's speed."""

    def __init__(self, model_dir: str, device: str, batch_size: int, measures: tuple[str, ...], max_new_tokens: int):
        from softprompt.dnd.harness import load_model

        self.model, self.tok = load_model(model_dir, device=device)
        self.device, self.batch_size, self.measures, self.max_new_tokens = device, batch_size, measures, max_new_tokens
        self.orig: dict = {}

    def clear(self) -> None:
        for name, w in self.orig.items():
            self.model.get_submodule(name).weight.data.copy_(w)

    def set_adapter(self, state: dict, scale: float) -> None:
        import torch

        from softprompt.dnd.tokenizer import lora_modules

        self.clear()
        for prefix in lora_modules(state):
            name = prefix.removeprefix("base_model.model.")
            w = self.model.get_submodule(name).weight
            if name not in self.orig:
                self.orig[name] = w.detach().clone()
            a = state[prefix + ".lora_A.weight"].to(self.device, torch.float32)
            b = state[prefix + ".lora_B.weight"].to(self.device, torch.float32)
            w.data.copy_((self.orig[name].float() + scale * (b @ a)).to(w.dtype))

    def score(self, items, state: dict | None = None, scale: float = 1.0, measures: tuple[str, ...] | None = None
              ) -> dict:
        from softprompt.dnd.harness import evaluate_items

        if state is None:
            self.clear()
        else:
            self.set_adapter(state, scale)
        res = evaluate_items(self.model, self.tok, items, self.batch_size, measures or self.measures,
                             self.max_new_tokens, progress=False)
        return {k: res[k] for k in ("n", "loglik_acc", "gen_acc", "gen_invalid") if k in res}


def answer_text(dataset: str, rec: dict) -> str:
    from softprompt.dnd.templates import LETTERS, YES_NO

    lab = int(rec["label"])
    if dataset == "superglue/boolq":
        return YES_NO[lab]
    return f"{LETTERS[lab]}. {str(rec['choices'][lab]).strip()}"


def condition_text(dataset: str, rec: dict, with_answer: bool) -> str:
    """The generator's condition for one record: the plain instruction text (no chat template), plus
    ``"\\nAnswer: <gold>"`` for the prompt+answer ablation."""
    from softprompt.dnd.templates import user_message

    text = user_message(dataset, rec)[0]
    return f"{text}\nAnswer: {answer_text(dataset, rec)}" if with_answer else text
